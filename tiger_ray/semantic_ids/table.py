"""The Semantic-ID table: item_id -> (c0, c1, c2, c3), one-to-one, checked on write and on read.

    RUN/semantic_ids/semantic_ids.parquet   item_id, c0, c1, c2, c3 (int64)

c0..c2 are RQ-VAE codes in [0, codebook_size); c3 separates items sharing the same c0..c2
(0 when unique, 0, 1, 2, ... within a collision group).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tiger_ray import atomic
from tiger_ray.runs import RunDir

FILENAME = "semantic_ids.parquet"
CODE_COLUMNS = ("c0", "c1", "c2", "c3")


@dataclass(frozen=True)
class SemanticIds:
    item_ids: np.ndarray  # [N] int64, ascending
    codes: np.ndarray  # [N, 4] int64, row i belongs to item_ids[i]
    codebook_sizes: tuple[int, ...]  # vocabulary size per position; the last is max(c3) + 1

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def by_item_id(self) -> np.ndarray:
        """[max_item_id + 1, 4] lookup table; row 0 (padding) and missing ids are -1."""
        table = np.full((int(self.item_ids.max()) + 1, self.codes.shape[1]), -1, dtype=np.int64)
        table[self.item_ids] = self.codes
        return table


def check_one_to_one(item_ids: np.ndarray, codes: np.ndarray, where: str) -> None:
    if len(np.unique(item_ids)) != len(item_ids):
        raise ValueError(f"{where}: item_id is not unique")
    _, first, counts = np.unique(codes, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = codes[first[counts > 1][0]].tolist()
        clashing = item_ids[(codes == dup).all(axis=1)][:5].tolist()
        raise ValueError(f"{where}: {int((counts > 1).sum())} Semantic IDs are shared by several items, "
                         f"e.g. {dup} by item_id {clashing}")


def write_semantic_ids(run: RunDir, item_ids: np.ndarray, codes: np.ndarray) -> Path:
    item_ids = np.asarray(item_ids, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape != (len(item_ids), len(CODE_COLUMNS)):
        raise ValueError(f"codes must be [{len(item_ids)}, {len(CODE_COLUMNS)}], got {codes.shape}")
    path = run.semantic_ids / FILENAME
    check_one_to_one(item_ids, codes, str(path))
    order = np.argsort(item_ids, kind="stable")
    table = pa.table({"item_id": item_ids[order],
                      **{c: codes[order, j] for j, c in enumerate(CODE_COLUMNS)}})
    atomic.write_parquet(path, table)
    return path


def read_semantic_ids(run: RunDir, codebook_size: int | None = None) -> SemanticIds:
    """Load and re-check the table. ``codebook_size`` (c0..c2) defaults to max code + 1."""
    path = run.require(run.semantic_ids / FILENAME, "tiger train-rqvae")
    table = pq.read_table(path)
    missing = [c for c in ("item_id", *CODE_COLUMNS) if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    item_ids = table.column("item_id").to_numpy().astype(np.int64)
    codes = np.stack([table.column(c).to_numpy() for c in CODE_COLUMNS], axis=1).astype(np.int64)
    if (codes < 0).any():
        raise ValueError(f"{path}: negative code values")
    check_one_to_one(item_ids, codes, str(path))
    order = np.argsort(item_ids, kind="stable")
    item_ids, codes = item_ids[order], codes[order]
    size = codebook_size or int(codes[:, :3].max()) + 1
    if codes[:, :3].max() >= size:
        raise ValueError(f"{path}: code {int(codes[:, :3].max())} out of range for codebook size {size}")
    sizes = (size, size, size, int(codes[:, 3].max()) + 1)
    return SemanticIds(item_ids=item_ids, codes=codes, codebook_sizes=sizes)
