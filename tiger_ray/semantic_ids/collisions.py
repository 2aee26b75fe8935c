"""The 4th Semantic-ID token: tell apart items whose 3 RQ-VAE codes are the same (TIGER 3.1).

Items sharing a prefix (c0, c1, c2) get c3 = 0, 1, 2, ... in the order they appear (item_id order
when called on the sorted catalog); an item alone with its prefix gets c3 = 0. The result is
deterministic given the row order, and the 4-tuples are unique by construction.
"""

from __future__ import annotations

import numpy as np


class CollisionCapError(ValueError):
    """More items share one prefix than the 4th token's range allows."""


def _group_ranks(prefixes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, rank-in-group along that order): rows sorted by prefix, ties kept in row order."""
    # lexsort is stable and sorts by the last key first: pass columns last-to-first.
    order = np.lexsort(prefixes.T[::-1])
    sorted_prefixes = prefixes[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (sorted_prefixes[1:] != sorted_prefixes[:-1]).any(axis=1)
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
    return order, np.arange(len(order)) - group_start


def collision_tokens(prefixes: np.ndarray, max_token: int | None = None,
                     item_ids: np.ndarray | None = None) -> np.ndarray:
    """c3 for every row of ``prefixes`` [N, L]; raise ``CollisionCapError`` if c3 would reach ``max_token``."""
    prefixes = np.asarray(prefixes, dtype=np.int64)
    if prefixes.ndim != 2:
        raise ValueError(f"prefixes must be [N, levels], got shape {prefixes.shape}")
    tokens = np.zeros(len(prefixes), dtype=np.int64)
    if len(prefixes) == 0:
        return tokens
    order, ranks = _group_ranks(prefixes)
    tokens[order] = ranks
    if max_token is not None and tokens.max() >= max_token:
        worst = int(np.argmax(tokens))
        prefix = prefixes[worst]
        members = np.flatnonzero((prefixes == prefix).all(axis=1))
        names = (item_ids[members] if item_ids is not None else members)[:5].tolist()
        label = "item_id" if item_ids is not None else "row"
        raise CollisionCapError(
            f"{len(members)} items share the Semantic-ID prefix {prefix.tolist()} (e.g. {label} {names}), "
            f"but the collision token is capped at {max_token} values (max_collision_token); "
            f"raise the cap, or train the RQ-VAE longer / with larger codebooks")
    return tokens


def collision_stats(prefixes: np.ndarray) -> dict:
    """How the 3-code prefixes collide: the numbers the report and the logs show."""
    prefixes = np.asarray(prefixes, dtype=np.int64)
    n = len(prefixes)
    if n == 0:
        return {"items": 0, "unique_prefixes": 0, "unique_prefix_rate": 1.0, "largest_collision_group": 0,
                "items_in_collisions": 0, "collision_groups": 0, "fraction_c3_positive": 0.0,
                "group_size_counts": {}}
    _, counts = np.unique(prefixes, axis=0, return_counts=True)
    sizes, how_many = np.unique(counts, return_counts=True)
    return {
        "items": n,
        "unique_prefixes": int(len(counts)),
        "unique_prefix_rate": len(counts) / n,  # = fraction of items with c3 == 0
        "largest_collision_group": int(counts.max()),
        "items_in_collisions": int(counts[counts > 1].sum()),
        "collision_groups": int((counts > 1).sum()),
        "fraction_c3_positive": (n - len(counts)) / n,
        "group_size_counts": {int(s): int(c) for s, c in zip(sizes, how_many)},
    }
