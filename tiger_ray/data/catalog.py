"""From any input format to the canonical tables: dense ids, metadata checks, item text.

Every reader (shared format, raw McAuley, generic) produces ``UserSequence``s keyed by the
input's own user and item ids (strings) and ``ItemRecord``s keyed the same way; together they are
a ``RawDataset``. ``build_tables`` turns it into ``items.parquet`` / ``sequences.parquet`` rows:

- users are numbered 1..U in input order; items 1..N in order of first appearance when walking
  the users' sequences in that order (the convention of the S3-Rec preprocessing, so the shared
  data keeps its original ids);
- every item in a sequence must have a metadata row, and every user must be long enough for
  the leave-one-out split; otherwise a ``ValueError`` names how many and which.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa

from tiger_ray.data.item_text import item_text
from tiger_ray.data.schema import ITEMS_SCHEMA, SEQUENCES_SCHEMA
from tiger_ray.data.split import MIN_SEQUENCE_LENGTH

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5  # how many offending ids an error message lists


@dataclass
class ItemRecord:
    """One item's cleaned metadata (see ``item_text.clean_*``), keyed by the input's item id."""

    key: str
    asin: str | None = None
    title: str | None = None
    brand: str | None = None
    categories: list[list[str]] = field(default_factory=list)
    price: float | None = None
    short_text: str | None = None  # used as the title in the text only when title is missing
    source: str = ""  # "path:line" of the row, for error messages

    def text(self) -> str:
        return item_text(self.title or self.short_text, self.price, self.brand, self.categories,
                         fallback=self.asin or self.key)


@dataclass
class UserSequence:
    key: str
    items: list[str]  # input item ids, chronological
    source: str = ""  # "path:line" (or the reviews file) for error messages


@dataclass
class RawDataset:
    users: list[UserSequence]
    items: dict[str, ItemRecord]


@dataclass
class CanonicalTables:
    items: pa.Table  # ITEMS_SCHEMA
    sequences: pa.Table  # SEQUENCES_SCHEMA
    dropped_items: int  # metadata rows with no interaction (not kept unless asked)


def _examples(values: list[str]) -> str:
    return ", ".join(values[:MAX_EXAMPLES])


def short_users_error(count: int, total: int, examples: list[tuple[str, int, str]],
                      min_length: int = MIN_SEQUENCE_LENGTH) -> ValueError:
    """``count`` of ``total`` users are too short; ``examples`` are (user, length, source)."""
    shown = _examples([f"{key} ({length} items, {source})" for key, length, source in examples])
    return ValueError(
        f"{count} of {total} users have fewer than {min_length} items and cannot be "
        f"split leave-one-out (last item test, second-to-last validation, at least one train "
        f"item): {shown}. Remove them or pass --k-core {min_length} to filter them out."
    )


def missing_metadata_error(count: int, examples: list[tuple[str, str]]) -> ValueError:
    """``count`` item ids lack a metadata row; ``examples`` are (item, source of first use)."""
    shown = _examples([f"{key} (first in {source})" for key, source in examples])
    return ValueError(f"{count} item ids in the sequences have no metadata row: {shown}")


def check_sequence_lengths(users: list[UserSequence],
                           min_length: int = MIN_SEQUENCE_LENGTH) -> None:
    short = [u for u in users if len(u.items) < min_length]
    if short:
        raise short_users_error(len(short), len(users),
                                [(u.key, len(u.items), u.source) for u in short[:MAX_EXAMPLES]],
                                min_length)


def check_metadata(users: list[UserSequence], items: dict[str, ItemRecord]) -> None:
    missing: dict[str, str] = {}
    for user in users:
        for key in user.items:
            if key not in items and key not in missing:
                missing[key] = user.source
    if missing:
        raise missing_metadata_error(len(missing), list(missing.items())[:MAX_EXAMPLES])


def dense_item_ids(users: list[UserSequence]) -> dict[str, int]:
    """Input item id -> 1..N in order of first appearance."""
    ids: dict[str, int] = {}
    for user in users:
        for key in user.items:
            if key not in ids:
                ids[key] = len(ids) + 1
    return ids


def build_tables(raw: RawDataset, keep_cold_items: bool = False) -> CanonicalTables:
    """Validate ``raw`` and build the canonical Arrow tables."""
    if not raw.users:
        raise ValueError("no user sequences left to prepare")
    check_sequence_lengths(raw.users)
    check_metadata(raw.users, raw.items)
    ids = dense_item_ids(raw.users)
    cold = [key for key in raw.items if key not in ids]
    if keep_cold_items:
        # Items nobody interacted with still get semantic ids (TIGER can recommend them cold).
        for key in cold:
            ids[key] = len(ids) + 1
    elif cold:
        log.info("dropping %d metadata rows of items without interactions", len(cold))

    records = [raw.items[key] for key in ids]  # dict order is id order
    items = pa.table({
        "item_id": pa.array(range(1, len(records) + 1), pa.int64()),
        "asin": pa.array([r.asin if r.asin is not None else r.key for r in records], pa.string()),
        "title": pa.array([r.title for r in records], pa.string()),
        "brand": pa.array([r.brand for r in records], pa.string()),
        "categories": pa.array([r.categories for r in records], ITEMS_SCHEMA.field("categories").type),
        "price": pa.array([r.price for r in records], pa.float64()),
        "text": pa.array([r.text() for r in records], pa.string()),
    }, schema=ITEMS_SCHEMA)
    sequences = pa.table({
        "user_id": pa.array(range(1, len(raw.users) + 1), pa.int64()),
        "item_ids": pa.array([[ids[key] for key in u.items] for u in raw.users], pa.list_(pa.int64())),
    }, schema=SEQUENCES_SCHEMA)
    return CanonicalTables(items=items, sequences=sequences,
                           dropped_items=0 if keep_cold_items else len(cold))
