"""What a `tiger embed` run has to encode: each distinct text once, minus what is already on disk.

Identical texts must get identical vectors, but encoders are not batch-invariant: the same text can
come out a few ULPs different next to other batch neighbours (measured on all-MiniLM-L6-v2, CPU).
So each distinct text is encoded once, for its *canonical* item (the smallest item_id with that
text), and the vector is copied to the other items with the same text (*aliases*). An alias is
always written in the same shard as its canonical item, so a shard holds whole text groups.

Everything here is per-item integers (a few bytes per item); texts are streamed and hashed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


@dataclass(frozen=True)
class IdRanges:
    """A set of item ids stored as sorted inclusive ranges: compact for the id runs shards cover."""

    starts: np.ndarray  # int64, ascending
    ends: np.ndarray  # int64, inclusive, ends[i] < starts[i + 1] - 1

    @classmethod
    def from_ids(cls, ids: np.ndarray) -> "IdRanges":
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if len(ids) == 0:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))
        breaks = np.flatnonzero(np.diff(ids) != 1)
        return cls(np.concatenate([ids[:1], ids[breaks + 1]]), np.concatenate([ids[breaks], ids[-1:]]))

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.starts) == 0:
            return np.zeros(ids.shape, dtype=bool)
        slot = np.searchsorted(self.starts, ids, side="right") - 1
        return (slot >= 0) & (ids <= self.ends[np.maximum(slot, 0)])

    def __len__(self) -> int:
        return int((self.ends - self.starts + 1).sum())


@dataclass(frozen=True)
class AliasMap:
    """Items whose text equals an earlier item's: they take a copy of that item's vector."""

    alias: np.ndarray  # int64 item ids
    canonical: np.ndarray  # int64, the smallest item id with the same text, ascending

    def expand(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Aliases of the canonical items in ``ids``: (alias ids, index into ``ids`` of their source)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.alias) == 0 or len(ids) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        lo = np.searchsorted(self.canonical, sorted_ids[0], side="left")
        hi = np.searchsorted(self.canonical, sorted_ids[-1], side="right")
        canonical, alias = self.canonical[lo:hi], self.alias[lo:hi]
        pos = np.minimum(np.searchsorted(sorted_ids, canonical), len(sorted_ids) - 1)
        hit = sorted_ids[pos] == canonical
        return alias[hit], order[pos[hit]]


@dataclass(frozen=True)
class TextGroups:
    """Every catalog item with the canonical item of its text."""

    item_ids: np.ndarray  # [N] int64, ascending
    canonical: np.ndarray  # [N] int64, canonical[i] <= item_ids[i]

    @property
    def aliases(self) -> AliasMap:
        mask = self.canonical != self.item_ids
        order = np.argsort(self.canonical[mask], kind="stable")
        return AliasMap(alias=self.item_ids[mask][order], canonical=self.canonical[mask][order])

    @property
    def num_texts(self) -> int:
        return int((self.canonical == self.item_ids).sum())

    def partial_groups(self, done: np.ndarray) -> np.ndarray:
        """Done item ids whose text group is only partly done (not written by one shard)."""
        is_done = np.isin(self.item_ids, done)
        size = np.bincount(self.canonical, minlength=int(self.item_ids.max(initial=0)) + 1)
        done_size = np.bincount(self.canonical[is_done], minlength=len(size))
        partial = (done_size > 0) & (done_size < size)
        return self.item_ids[is_done & partial[self.canonical]]


def text_groups(items_path: str | Path, batch_rows: int = 65536) -> TextGroups:
    """Stream (item_id, text) from items.parquet and group items by identical text (128-bit hash)."""
    file = pq.ParquetFile(items_path)
    ids_parts, hash_parts = [], []
    for batch in file.iter_batches(batch_size=batch_rows, columns=["item_id", "text"]):
        ids_parts.append(batch.column(0).to_numpy().astype(np.int64))
        texts = batch.column(1).to_pylist()
        digests = b"".join(hashlib.blake2b((t or "").encode("utf-8"), digest_size=16).digest()
                           for t in texts)
        hash_parts.append(np.frombuffer(digests, dtype="V16"))
    if not ids_parts:
        return TextGroups(np.zeros(0, np.int64), np.zeros(0, np.int64))
    ids, hashes = np.concatenate(ids_parts), np.concatenate(hash_parts)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{items_path}: item_id is not unique")
    order = np.argsort(ids, kind="stable")
    ids, hashes = ids[order], hashes[order]
    # First occurrence of each hash in item-id order = the smallest id with that text.
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    return TextGroups(item_ids=ids, canonical=ids[first][inverse.reshape(-1)])


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
