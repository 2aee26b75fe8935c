"""The k-core filter: keep only users and items with at least k interactions.

Removing a sparse user can push an item below k (and the other way round), so the filter repeats
until nothing changes. Interactions are counted with repeats, as in the S3-Rec preprocessing the
TIGER paper's datasets come from; the order of each user's items is kept.
"""

from __future__ import annotations

from collections import Counter

from tiger_ray.data.catalog import UserSequence


def k_core_filter(users: list[UserSequence], k: int) -> tuple[list[UserSequence], int]:
    """Return the k-core of ``users`` (same user order) and how many passes it took."""
    if k <= 1:
        return users, 0
    passes = 0
    while True:
        passes += 1
        item_counts = Counter(key for user in users for key in user.items)
        rare_items = {key for key, count in item_counts.items() if count < k}
        kept: list[UserSequence] = []
        changed = bool(rare_items)
        for user in users:
            items = [key for key in user.items if key not in rare_items] if rare_items else user.items
            if len(items) >= k:
                kept.append(UserSequence(user.key, items, user.source) if rare_items else user)
            else:
                changed = True
        users = kept
        if not changed:
            return users, passes
