"""The Semantic-ID table: item_id -> (c0, c1, c2, c3), one-to-one.

    RUN/semantic_ids/codes.npy             [N + 1, 4] uint8 (uint16 above 256 codes), row = item_id,
                                           row 0 padding; memory-mapped by every reader
    RUN/semantic_ids/index_*.npy, index.json   the sorted-key index (``index.py``): code -> item,
                                           and the trie of constrained decoding
    RUN/semantic_ids/semantic_ids.json     codebook sizes, count, fingerprint; written last
    RUN/semantic_ids/semantic_ids.parquet  item_id, c0..c3: a human-readable export; read only when
                                           the files above are absent (runs made before them)

c0..c2 are RQ-VAE codes in [0, codebook_size); c3 separates items sharing the same c0..c2
(0 when unique, 0, 1, 2, ... within a collision group). Item ids on disk are dense 1..N.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tiger_ray import atomic
from tiger_ray.runs import RunDir
from tiger_ray.semantic_ids.index import SemanticIdIndex, read_format_json

FILENAME = "semantic_ids.parquet"
CODES_FILE, META_FILE = "codes.npy", "semantic_ids.json"
FORMAT = "tiger-semantic-ids/1"
CODE_COLUMNS = ("c0", "c1", "c2", "c3")


def code_dtype(codebook_sizes: Sequence[int]) -> np.dtype:
    """The narrowest unsigned type holding every code."""
    largest = max(int(s) for s in codebook_sizes)
    if largest <= 2**8:
        return np.dtype(np.uint8)
    if largest <= 2**16:
        return np.dtype(np.uint16)
    raise ValueError(f"codebook size {largest} is above 65536, the largest the table stores")


def _hash_table(sizes: tuple[int, ...], count: int, table: np.ndarray, item_ids: np.ndarray | None,
                chunk: int = 1 << 22) -> str:
    """Content hash of the table, fed in chunks straight from the (memory-mapped) codes."""
    h = hashlib.sha256(f"{FORMAT} {sizes} {count}".encode())
    if item_ids is not None:
        h.update(np.ascontiguousarray(item_ids, dtype="<i8").tobytes())
    rows = table if item_ids is not None else table[1:]
    for lo in range(0, len(rows), chunk):
        h.update(np.ascontiguousarray(rows[lo:lo + chunk]).astype(rows.dtype.newbyteorder("<"), copy=False).data)
    return h.hexdigest()[:16]


class SemanticIds:
    """The table, either dense (ids 1..N, one [N + 1, L] array indexed by id: what is on disk) or
    sparse (any ids, e.g. a subset built in a test). Codes are stored in ``code_dtype``.

    ``codes`` is a view of the table for dense tables; ``item_ids`` is materialised on access
    (8 bytes per item), so code that must scale uses ``codes_of``/``lookup``/``num_items`` instead.
    """

    def __init__(self, item_ids: np.ndarray, codes: np.ndarray, codebook_sizes: Sequence[int]):
        item_ids = np.asarray(item_ids)
        codes = np.asarray(codes)
        sizes = tuple(int(s) for s in codebook_sizes)
        if codes.ndim != 2 or codes.shape != (len(item_ids), len(sizes)):
            raise ValueError(f"codes must be [{len(item_ids)}, {len(sizes)}], got {codes.shape}")
        if len(codes) and ((codes < 0).any() or (codes >= np.asarray(sizes)).any()):
            raise ValueError(f"codes out of range of codebook_sizes {sizes}")
        if len(item_ids) and item_ids.min() < 1:
            raise ValueError("item ids must be >= 1 (0 is padding)")
        dtype = code_dtype(sizes)
        order = np.argsort(item_ids, kind="stable")
        item_ids, codes = item_ids[order].astype(np.int64), codes[order].astype(dtype)
        self.codebook_sizes = sizes
        self._index: SemanticIdIndex | None = None
        self._fingerprint: str | None = None
        self._directory: Path | None = None
        if np.array_equal(item_ids, np.arange(1, len(item_ids) + 1)):
            self._table = np.zeros((len(item_ids) + 1, len(sizes)), dtype=dtype)
            self._table[1:] = codes
            self._ids = None
        else:
            self._table = None
            self._ids, self._codes = item_ids, codes

    @classmethod
    def _dense(cls, table: np.ndarray, codebook_sizes: Sequence[int]) -> "SemanticIds":
        self = cls.__new__(cls)
        self.codebook_sizes = tuple(int(s) for s in codebook_sizes)
        self._table, self._ids = table, None
        self._index, self._fingerprint, self._directory = None, None, None
        return self

    # ---- the public view ----------------------------------------------------------------------
    @property
    def dense(self) -> bool:
        return self._ids is None

    @property
    def num_items(self) -> int:
        return len(self._table) - 1 if self.dense else len(self._ids)

    @property
    def item_ids(self) -> np.ndarray:
        """[N] int64, ascending."""
        return np.arange(1, self.num_items + 1, dtype=np.int64) if self.dense else self._ids

    @property
    def codes(self) -> np.ndarray:
        """[N, L] codes (uint8/uint16), row i belongs to item_ids[i]."""
        return self._table[1:] if self.dense else self._codes

    @property
    def max_item_id(self) -> int:
        return self.num_items if self.dense else int(self._ids.max(initial=0))

    def nbytes(self) -> int:
        """Bytes of the table itself (the index is ``index().nbytes()``)."""
        return int(self._table.nbytes) if self.dense else int(self._ids.nbytes + self._codes.nbytes)

    def codes_of(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Any-shaped item ids -> (codes [..., L] int64, known [...] bool); unknown ids get zeros."""
        ids = np.asarray(item_ids, dtype=np.int64)
        if self.dense:
            known = (ids >= 1) & (ids <= self.num_items)
            return self._table[np.where(known, ids, 0)].astype(np.int64), known
        if not len(self._ids):
            return np.zeros((*ids.shape, len(self.codebook_sizes)), dtype=np.int64), np.zeros(ids.shape, bool)
        rows = np.searchsorted(self._ids, ids).clip(max=len(self._ids) - 1)
        known = self._ids[rows] == ids
        return np.where(known[..., None], self._codes[rows].astype(np.int64), 0), known

    def by_item_id(self) -> np.ndarray:
        """[max_item_id + 1, 4] int64 lookup table; row 0 (padding) and missing ids are -1.
        A full int64 copy: small catalogs only (``codes_of`` reads the compact table)."""
        table = np.full((self.max_item_id + 1, len(self.codebook_sizes)), -1, dtype=np.int64)
        table[self.item_ids] = self.codes
        return table

    def index(self) -> SemanticIdIndex:
        """The sorted-key index: memory-mapped when the table was opened from disk."""
        if self._index is None:
            if self._directory is not None:
                self._index = SemanticIdIndex.open(self._directory, self.codebook_sizes)
            else:
                self._index = SemanticIdIndex.build(self.item_ids, self.codes, self.codebook_sizes)
        return self._index

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """[B, L] codes -> item ids, -1 where no item has that ID."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, len(self.codebook_sizes))
        ok = (codes < np.asarray(self.codebook_sizes)).all(axis=1)
        return np.where(ok, self.index().lookup(codes), -1)

    def fingerprint(self) -> str:
        """Content hash (stored in semantic_ids.json, so opening a large table does not rehash it)."""
        if self._fingerprint is None:
            self._fingerprint = _hash_table(self.codebook_sizes, self.num_items,
                                            self._table if self.dense else self._codes, self._ids)
        return self._fingerprint

    # ---- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """codes.npy, the index, then semantic_ids.json (last: it marks the directory complete)."""
        if not self.dense:
            raise ValueError("only a table over item ids 1..N can be saved (codes.npy rows are item ids)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).unlink(missing_ok=True)
        check_one_to_one(self.item_ids, self.codes, str(directory))
        with atomic.atomic_path(directory / CODES_FILE) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(self._table))
        self.index().save(directory)
        write_meta(directory, self.codebook_sizes, self.num_items, self.fingerprint())
        return directory

    @classmethod
    def open(cls, directory: str | Path, codebook_size: int | None = None) -> "SemanticIds":
        """Memory-map a saved table (no copy). ``codebook_size`` widens c0..c2's vocabulary."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        meta = read_format_json(meta_path, FORMAT)
        sizes = tuple(int(s) for s in meta["codebook_sizes"])
        table = np.load(directory / CODES_FILE, mmap_mode="r")
        if table.ndim != 2 or table.shape != (int(meta["count"]) + 1, len(sizes)):
            raise ValueError(f"{directory / CODES_FILE}: shape {table.shape}, {meta_path} says "
                             f"{[int(meta['count']) + 1, len(sizes)]}")
        if table.dtype != code_dtype(sizes):
            raise ValueError(f"{directory / CODES_FILE}: dtype {table.dtype}, expected {code_dtype(sizes)}")
        if codebook_size is not None:
            if codebook_size < max(sizes[:-1]):
                raise ValueError(f"{meta_path}: codes up to {max(sizes[:-1]) - 1} do not fit codebook size "
                                 f"{codebook_size}")
            sizes = (int(codebook_size),) * (len(sizes) - 1) + sizes[-1:]
        out = cls._dense(table, sizes)
        out._directory = directory
        stored = tuple(int(s) for s in meta["codebook_sizes"])
        out._fingerprint = meta.get("fingerprint") if sizes == stored else None  # sizes are hashed
        return out


def write_meta(directory: Path, codebook_sizes: Sequence[int], count: int, fingerprint: str) -> None:
    atomic.write_json(Path(directory) / META_FILE, {
        "format": FORMAT, "count": int(count), "codebook_sizes": [int(s) for s in codebook_sizes],
        "code_dtype": code_dtype(codebook_sizes).name, "fingerprint": fingerprint})


def check_one_to_one(item_ids: np.ndarray, codes: np.ndarray, where: str) -> None:
    if len(np.unique(item_ids)) != len(item_ids):
        raise ValueError(f"{where}: item_id is not unique")
    _, first, counts = np.unique(codes, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = codes[first[counts > 1][0]].tolist()
        clashing = np.asarray(item_ids)[(codes == dup).all(axis=1)][:5].tolist()
        raise ValueError(f"{where}: {int((counts > 1).sum())} Semantic IDs are shared by several items, "
                         f"e.g. {dup} by item_id {clashing}")


def infer_codebook_sizes(codes: np.ndarray) -> tuple[int, ...]:
    """c0..c2 share one size (max code + 1); c3's is its own max + 1."""
    size = int(codes[:, :-1].max(initial=0)) + 1
    return (size,) * (codes.shape[1] - 1) + (int(codes[:, -1].max(initial=0)) + 1,)


def export_parquet(path: Path, semantic_ids: SemanticIds, chunk: int = 1 << 18) -> None:
    """semantic_ids.parquet (item_id, c0..c3 as int64), written in chunks from the table."""
    schema = pa.schema([("item_id", pa.int64()), *[(c, pa.int64()) for c in CODE_COLUMNS]])
    with atomic.atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for lo in range(0, semantic_ids.num_items, chunk):
                ids = np.arange(lo + 1, min(lo + chunk, semantic_ids.num_items) + 1, dtype=np.int64)
                codes, _ = semantic_ids.codes_of(ids)
                writer.write_table(pa.table({"item_id": ids, **{c: codes[:, j] for j, c in enumerate(CODE_COLUMNS)}},
                                            schema=schema))


def write_semantic_ids(run: RunDir, item_ids: np.ndarray, codes: np.ndarray,
                       codebook_sizes: Sequence[int] | None = None) -> Path:
    """A table held in memory (item ids 1..N) -> RUN/semantic_ids/ (codes.npy, index, export, json)."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape != (len(item_ids), len(CODE_COLUMNS)):
        raise ValueError(f"codes must be [{len(item_ids)}, {len(CODE_COLUMNS)}], got {codes.shape}")
    if (codes < 0).any():
        raise ValueError(f"{run.semantic_ids}: negative code values")
    check_one_to_one(item_ids, codes, str(run.semantic_ids))
    if not np.array_equal(np.sort(item_ids), np.arange(1, len(item_ids) + 1)):
        raise ValueError(f"{run.semantic_ids}: item ids must be 1..{len(item_ids)} (codes.npy rows are item ids)")
    table = SemanticIds(item_ids, codes, codebook_sizes or infer_codebook_sizes(codes))
    (run.semantic_ids / META_FILE).unlink(missing_ok=True)
    export_parquet(run.semantic_ids / FILENAME, table)
    table.save(run.semantic_ids)
    return run.semantic_ids / CODES_FILE


def read_semantic_ids(run: RunDir, codebook_size: int | None = None) -> SemanticIds:
    """The memory-mapped table (``SemanticIds.open``); runs made before codes.npy existed fall back
    to semantic_ids.parquet, loaded and re-checked. ``codebook_size`` (c0..c2) defaults to the
    stored sizes (max code + 1 for the Parquet table)."""
    if (run.semantic_ids / META_FILE).exists():
        return SemanticIds.open(run.semantic_ids, codebook_size)
    path = run.require(run.semantic_ids / FILENAME, "tiger train-rqvae")
    return read_parquet_table(path, codebook_size)


def read_parquet_table(path: Path, codebook_size: int | None = None) -> SemanticIds:
    table = pq.read_table(path)
    missing = [c for c in ("item_id", *CODE_COLUMNS) if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    item_ids = table.column("item_id").to_numpy().astype(np.int64)
    codes = np.stack([table.column(c).to_numpy() for c in CODE_COLUMNS], axis=1).astype(np.int64)
    if (codes < 0).any():
        raise ValueError(f"{path}: negative code values")
    check_one_to_one(item_ids, codes, str(path))
    sizes = infer_codebook_sizes(codes)
    size = codebook_size or sizes[0]
    if sizes[0] > size:
        raise ValueError(f"{path}: code {sizes[0] - 1} out of range for codebook size {size}")
    return SemanticIds(item_ids=item_ids, codes=codes, codebook_sizes=(size,) * 3 + sizes[-1:])
