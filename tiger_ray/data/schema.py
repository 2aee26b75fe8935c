"""The canonical tables `tiger prepare` / `tiger synth` write and every later stage reads.

items.parquet      one row per item, item_id dense 1..N (0 is reserved for padding)
sequences.parquet  one row per user, item_ids in chronological order

Each is either one Parquet file (small catalogs) or a directory of parts ``part-00000.parquet``,
... in id order (large catalogs, written by Ray Data). The readers below accept both:
``count_rows`` and ``iter_batches`` stream with bounded memory, ``read_dataset`` gives a Ray
Dataset, and ``read_items`` / ``read_sequences`` load everything (small catalogs and tests only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

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


def parquet_files(path: str | Path) -> list[Path]:
    """The Parquet files of a table: ``path`` itself, or the parts of a directory in name order.

    Names starting with "." or "_" are skipped: they are temporary files of a writer that has not
    finished (tiger_ray.atomic) or metadata files, never rows of the table.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    parts = sorted(p for p in path.iterdir()
                   if p.suffix == ".parquet" and p.is_file() and not p.name.startswith((".", "_")))
    if not parts:
        raise ValueError(f"{path}: a directory without Parquet parts (*.parquet)")
    return parts


def open_dataset(path: str | Path) -> pads.Dataset:
    """A pyarrow Dataset over the file or the parts; nothing is read until it is scanned."""
    return pads.dataset([str(p) for p in parquet_files(path)], format="parquet")


def count_rows(path: str | Path) -> int:
    """Number of rows, from the Parquet footers only (no column is read)."""
    return sum(fragment.metadata.num_rows for fragment in open_dataset(path).get_fragments())


def count_list_values(path: str | Path, column: str) -> int:
    """Total number of elements of a list column (e.g. interactions in sequences.parquet), from
    the footers: Parquet stores a list's elements as one leaf column whose value count is that
    total (exact when no list is null or empty, which the canonical tables guarantee)."""
    total = 0
    for fragment in open_dataset(path).get_fragments():
        meta = fragment.metadata
        leaf = [i for i in range(meta.num_columns)
                if meta.schema.column(i).path.split(".")[0] == column]
        if len(leaf) != 1:
            raise ValueError(f"{fragment.path}: no list column {column!r}")
        total += sum(meta.row_group(g).column(leaf[0]).num_values for g in range(meta.num_row_groups))
    return total


def iter_batches(path: str | Path, columns: list[str] | None = None,
                 batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """Record batches of at most ``batch_rows`` rows in file order (ids ascending), holding only
    a few batches in memory at a time."""
    scanner = open_dataset(path).scanner(columns=columns, batch_size=batch_rows)
    for batch in scanner.to_batches():
        if batch.num_rows:
            yield batch


def read_dataset(path: str | Path, columns: list[str] | None = None):
    """The table as a streaming ``ray.data.Dataset`` (parts in name order); starts a
    loopback-only Ray if none is running."""
    import ray.data

    from tiger_ray.ray_env import init_ray

    files = [str(p) for p in parquet_files(path)]
    init_ray()
    ds = ray.data.read_parquet(files)
    # select_columns is pushed down into the read: unread columns are never loaded.
    return ds.select_columns(columns) if columns is not None else ds


def read_sequences(path: str | Path) -> Sequences:
    table = open_dataset(path).to_table(columns=["user_id", "item_ids"])
    items = table.column("item_ids").combine_chunks()
    return Sequences(
        user_ids=table.column("user_id").to_numpy().astype(np.int64),
        offsets=items.offsets.to_numpy().astype(np.int64) - int(items.offsets[0].as_py()),
        flat=items.flatten().to_numpy().astype(np.int64),
    )


def read_items(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return open_dataset(path).to_table(columns=columns)
