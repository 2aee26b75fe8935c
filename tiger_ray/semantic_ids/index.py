"""Sorted packed Semantic-ID keys: the code -> item lookup and the decoding index, as two arrays.

    index_keys.npy   [N] each item's codes as one mixed-radix number
                     key = ((c0 * r1 + c1) * r2 + c2) * r3 + c3, ascending; int32 holding key - 2**31
                     when the key space fits 32 bits (signed order = unsigned order, and
                     torch.searchsorted has no uint32), else int64 holding the key itself
    index_items.npy  [N] int32 item id of each key
    index.json       radix, key dtype and offset, count, codebook sizes

All items sharing a prefix of d codes form one contiguous key range [p * R_d, (p + 1) * R_d) with
R_d = r_d * ... * r_{L-1}, so a prefix (a trie node) is the position of its first key and every
question is a binary search: 8 bytes per item with 32-bit keys, O(log N) per query. The radix may
exceed the codebook sizes (the assignment uses the collision cap for the last position, before the
largest collision group is known).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from tiger_ray import atomic

KEYS_FILE, ITEMS_FILE, META_FILE = "index_keys.npy", "index_items.npy", "index.json"
FORMAT = "tiger-semantic-id-index/1"


def read_format_json(path: Path, fmt: str) -> dict:
    """A saved table's or index's JSON, checked to be of format ``fmt``."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `tiger train-rqvae`")
    meta = atomic.read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} file")
    return meta


def key_layout(radix: Sequence[int]) -> tuple[np.dtype, int]:
    """(stored dtype, offset subtracted before storing) for keys of this radix."""
    total = math.prod(int(r) for r in radix)
    if total <= 2**32:
        return np.dtype(np.int32), 2**31
    if total <= 2**63:
        return np.dtype(np.int64), 0
    raise ValueError(f"codebook sizes {tuple(radix)} give {total} possible IDs, more than a 63-bit key holds")


def strides(radix: Sequence[int]) -> tuple[int, ...]:
    """R_d for d = 0..L: how many keys one prefix of length d spans (R_0 = all, R_L = 1)."""
    out = [1]
    for r in reversed(radix):
        out.append(out[-1] * int(r))
    return tuple(reversed(out))


def pack_keys(codes: np.ndarray, radix: Sequence[int]) -> np.ndarray:
    """[n, L] codes (any integer dtype, each below its radix) -> int64 true keys."""
    codes = np.asarray(codes)
    key = np.zeros(len(codes), dtype=np.int64)
    for p, r in enumerate(radix):
        key = key * int(r) + codes[:, p].astype(np.int64)
    return key


def unpack_keys(keys: np.ndarray, radix: Sequence[int]) -> np.ndarray:
    """int64 true keys -> [n, L] int64 codes."""
    keys = np.asarray(keys, dtype=np.int64)
    out = np.empty((len(keys), len(radix)), dtype=np.int64)
    for p in range(len(radix) - 1, -1, -1):
        out[:, p] = keys % int(radix[p])
        keys = keys // int(radix[p])
    return out


def index_meta(count: int, radix: Sequence[int], codebook_sizes: Sequence[int]) -> dict:
    """The content of index.json."""
    dtype, offset = key_layout(radix)
    return {"format": FORMAT, "count": int(count), "radix": [int(r) for r in radix],
            "codebook_sizes": [int(s) for s in codebook_sizes], "key_dtype": dtype.name, "key_offset": offset}


class SemanticIdIndex:
    """The two arrays (numpy, possibly memory-mapped read-only) and their layout."""

    def __init__(self, keys: np.ndarray, items: np.ndarray, radix: Sequence[int],
                 codebook_sizes: Sequence[int]):
        self.radix = tuple(int(r) for r in radix)
        self.codebook_sizes = tuple(int(s) for s in codebook_sizes)
        self.key_dtype, self.key_offset = key_layout(self.radix)
        if keys.dtype != self.key_dtype or items.dtype != np.int32 or keys.shape != items.shape:
            raise ValueError(f"index arrays must be {self.key_dtype} keys and int32 items of one length, "
                             f"got {keys.dtype}{keys.shape} and {items.dtype}{items.shape}")
        if len(self.radix) != len(self.codebook_sizes):
            raise ValueError("radix and codebook_sizes must have one entry per code position")
        self.keys, self.items = keys, items
        self.strides = strides(self.radix)

    @property
    def num_items(self) -> int:
        return len(self.keys)

    @property
    def depth(self) -> int:
        return len(self.radix)

    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.items.nbytes)

    def true_keys(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        return self.keys[lo:hi].astype(np.int64) + self.key_offset

    # ---- building -----------------------------------------------------------------------------
    @classmethod
    def build(cls, item_ids: np.ndarray, codes: np.ndarray, codebook_sizes: Sequence[int],
              radix: Sequence[int] | None = None) -> "SemanticIdIndex":
        """In memory, for tables that fit (tests, subsets); large catalogs are built by
        ``assign.py`` in key-range chunks straight into the files."""
        item_ids = np.asarray(item_ids)
        codes = np.asarray(codes)
        sizes = tuple(int(s) for s in codebook_sizes)
        radix = sizes if radix is None else tuple(int(r) for r in radix)
        if codes.ndim != 2 or codes.shape != (len(item_ids), len(sizes)):
            raise ValueError(f"codes must be [{len(item_ids)}, {len(sizes)}], got {codes.shape}")
        if len(codes) and ((codes < 0).any() or (codes >= np.asarray(sizes)).any()
                           or (codes >= np.asarray(radix)).any()):
            raise ValueError("codes out of range of codebook_sizes")
        if len(item_ids) and (item_ids.min() < 0 or item_ids.max() >= 2**31):
            raise ValueError("item ids must be in [0, 2**31) for the int32 index")
        dtype, offset = key_layout(radix)
        true = pack_keys(codes, radix)
        order = np.argsort(true, kind="stable")
        true = true[order]
        if len(true) > 1 and (true[1:] == true[:-1]).any():
            raise ValueError("two items share one Semantic ID; the trie needs unique IDs")
        return cls((true - offset).astype(dtype), item_ids[order].astype(np.int32), radix, sizes)

    # ---- persistence --------------------------------------------------------------------------
    def meta(self) -> dict:
        return index_meta(self.num_items, self.radix, self.codebook_sizes)

    def save(self, directory: str | Path) -> Path:
        """index_keys.npy, index_items.npy, then index.json (its presence marks completeness)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).unlink(missing_ok=True)
        for name, array in ((KEYS_FILE, self.keys), (ITEMS_FILE, self.items)):
            with atomic.atomic_path(directory / name) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, np.ascontiguousarray(array))
        atomic.write_json(directory / META_FILE, self.meta())
        return directory

    @classmethod
    def open(cls, directory: str | Path, codebook_sizes: Sequence[int] | None = None) -> "SemanticIdIndex":
        """Memory-map a saved index (read-only; the pages are shared by every process)."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        meta = read_format_json(meta_path, FORMAT)
        keys = np.load(directory / KEYS_FILE, mmap_mode="r")
        items = np.load(directory / ITEMS_FILE, mmap_mode="r")
        if len(keys) != int(meta["count"]) or len(items) != int(meta["count"]):
            raise ValueError(f"{directory}: index arrays hold {len(keys)}/{len(items)} rows, "
                             f"{meta_path} says {meta['count']}")
        if keys.dtype.name != meta["key_dtype"]:
            raise ValueError(f"{directory / KEYS_FILE}: dtype {keys.dtype}, {meta_path} says {meta['key_dtype']}")
        return cls(keys, items, meta["radix"], codebook_sizes or meta["codebook_sizes"])

    # ---- numpy queries (the torch ones, for decoding, are in seq2seq/trie.py) ------------------
    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """[B, L] codes -> item ids (int64), -1 where no item has that ID or a code is out of range."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, self.depth)
        ok = ((codes >= 0) & (codes < np.asarray(self.radix))).all(axis=1)
        true = pack_keys(np.where(ok[:, None], codes, 0), self.radix)
        if self.num_items == 0:
            return np.full(len(codes), -1, dtype=np.int64)
        stored = (true - self.key_offset).astype(self.key_dtype)
        pos = np.searchsorted(self.keys, stored).clip(max=self.num_items - 1)
        found = ok & (np.asarray(self.keys[pos]) == stored)
        return np.where(found, np.asarray(self.items[pos], dtype=np.int64), -1)

    def num_prefixes(self, level: int, chunk: int = 1 << 22) -> int:
        """Distinct code prefixes of length ``level`` (trie nodes of that level), in chunks."""
        if self.num_items == 0:
            return 0
        stride, count, last = self.strides[level], 0, None
        for lo in range(0, self.num_items, chunk):
            p = self.true_keys(lo, lo + chunk) // stride
            count += int((p[1:] != p[:-1]).sum()) + int(last is None or p[0] != last)
            last = p[-1]
        return count
