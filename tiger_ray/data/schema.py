"""The canonical tables `tiger prepare` writes and every later stage reads.

items.parquet      one row per item, item_id dense 1..N (0 is reserved for padding)
sequences.parquet  one row per user, item_ids in chronological order
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ITEMS_SCHEMA = pa.schema([
    pa.field("item_id", pa.int64(), nullable=False),
    pa.field("asin", pa.string()),
    pa.field("title", pa.string()),
    pa.field("brand", pa.string()),
    # category paths as in the original metadata, e.g. [["Beauty", "Makeup", "Eyes"]]
    pa.field("categories", pa.list_(pa.list_(pa.string()))),
    pa.field("price", pa.float64()),
    pa.field("text", pa.string(), nullable=False),  # what the sentence encoder reads
])

SEQUENCES_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("item_ids", pa.list_(pa.int64()), nullable=False),
])


@dataclass(frozen=True)
class Sequences:
    """All users' chronological item sequences, held as one flat array plus offsets."""

    user_ids: np.ndarray  # [U] int64
    offsets: np.ndarray  # [U+1] int64, user u's items are flat[offsets[u]:offsets[u+1]]
    flat: np.ndarray  # [sum of lengths] int64

    def __len__(self) -> int:
        return len(self.user_ids)

    def __getitem__(self, u: int) -> np.ndarray:
        return self.flat[self.offsets[u]:self.offsets[u + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def read_sequences(path: str | Path) -> Sequences:
    table = pq.read_table(path, columns=["user_id", "item_ids"])
    items = table.column("item_ids").combine_chunks()
    return Sequences(
        user_ids=table.column("user_id").to_numpy().astype(np.int64),
        offsets=items.offsets.to_numpy().astype(np.int64) - int(items.offsets[0].as_py()),
        flat=items.flatten().to_numpy().astype(np.int64),
    )


def read_items(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)
