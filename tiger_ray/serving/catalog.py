"""Item lookup for the API: item id or ASIN -> catalog row, and the metadata returned with results.

Built for catalogs of tens of millions of items, where every ingress replica must not hold the
catalog in its own heap:

    RUN/serving/catalog/items.arrow       the detail columns as an uncompressed Arrow IPC file,
                                          memory-mapped (zero-copy: pages are shared by every
                                          replica on a node and loaded on demand)
    RUN/serving/catalog/asin_hash.npy     FNV-1a 64-bit hash of each ASIN, sorted (8 B/item)
    RUN/serving/catalog/asin_item.npy     the item id of each sorted hash (4 B/item), mmap'd
    RUN/serving/catalog/source.json       which items.parquet they were built from

They are built once from RUN/items.parquet (a file or a directory of parts) by streaming record
batches, so building holds ~20 B/item (hashes, ids and their sort order), never the text. An ASIN
is found by binary search on its hash, then confirmed against the ASIN column, so a hash collision
can never return the wrong item.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from tiger_ray import atomic
from tiger_ray.runs import RunDir
from tiger_ray.serving.schema import ApiError

DETAIL_COLUMNS = ["item_id", "asin", "title", "brand", "categories", "price"]
CATALOG_DIR = ("serving", "catalog")
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_BATCH_ROWS = 65536


def hash_strings(strings: pa.Array) -> np.ndarray:
    """FNV-1a 64 of every UTF-8 string (nulls hash like ""), vectorised one byte position at a time."""
    strings = pa.array(strings, type=pa.string()) if not isinstance(strings, pa.Array) else strings
    strings = strings.cast(pa.large_string()).fill_null("")
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int64)[strings.offset:strings.offset + len(strings) + 1]
    data = np.frombuffer(strings.buffers()[2], dtype=np.uint8) if strings.buffers()[2] else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    hashes = np.full(len(strings), _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):  # the multiplication wraps modulo 2^64 by design
        for j in range(int(lengths.max()) if len(lengths) else 0):
            active = np.flatnonzero(lengths > j)
            hashes[active] = (hashes[active] ^ data[starts[active] + j].astype(np.uint64)) * _FNV_PRIME
    return hashes


class AsinIndex:
    """ASIN -> item id by binary search over sorted 64-bit hashes (arrays may be np.memmap)."""

    def __init__(self, hashes: np.ndarray, item_ids: np.ndarray):
        self.hashes, self.item_ids = hashes, item_ids

    @classmethod
    def build(cls, asins: pa.Array, item_ids: np.ndarray) -> "AsinIndex":
        keep = np.asarray(asins.is_valid())
        hashes = hash_strings(asins.filter(pa.array(keep)))
        ids = np.asarray(item_ids)[keep].astype(_id_dtype(len(keep)))
        order = np.argsort(hashes, kind="stable")  # stable: a repeated ASIN resolves to its lowest id
        return cls(hashes[order], ids[order])

    def lookup(self, asins: list[str], asin_column: pa.Array) -> np.ndarray:
        """Item id per ASIN (0 if unknown); each hash match is confirmed on the ASIN column."""
        found = np.zeros(len(asins), dtype=np.int64)
        if not asins or len(self.hashes) == 0:
            return found
        queries = hash_strings(pa.array(asins, type=pa.string()))
        lo = np.searchsorted(self.hashes, queries, side="left")
        hi = np.searchsorted(self.hashes, queries, side="right")
        for i, (a, b) in enumerate(zip(lo, hi)):
            for item in self.item_ids[a:b]:  # almost always one candidate
                if asin_column[int(item) - 1].as_py() == asins[i]:
                    found[i] = int(item)
                    break
        return found


def _id_dtype(n: int):
    return np.uint32 if n < 2**32 else np.int64


class Catalog:
    def __init__(self, items: pa.Table, source: str = "items table", asin_index: AsinIndex | None = None):
        _check_dense_ids(items.column("item_id").chunks, source)
        self.source = source
        self.table = items.select([c for c in DETAIL_COLUMNS if c in items.column_names])
        self.asins = self.table.column("asin")
        self.titles = self.table.column("title")
        self._asin_index = asin_index or AsinIndex.build(
            self.asins.combine_chunks(), np.arange(1, self.table.num_rows + 1))

    @classmethod
    def from_run(cls, run: RunDir) -> "Catalog":
        """The run's catalog, memory-mapped; built from items.parquet on first use."""
        directory = build_catalog_files(run)
        source = pa.memory_map(str(directory / "items.arrow"))
        table = pa.ipc.open_file(source).read_all()  # zero-copy views into the mapping
        index = AsinIndex(np.load(directory / "asin_hash.npy", mmap_mode="r"),
                          np.load(directory / "asin_item.npy", mmap_mode="r"))
        return cls(table, source=str(run.items), asin_index=index)

    @property
    def size(self) -> int:
        return self.table.num_rows

    def ids_of_asins(self, asins: list[str]) -> np.ndarray:
        """Item id per ASIN; 0 where the ASIN is not in the catalog."""
        return self._asin_index.lookup(list(asins), self.asins)

    def resolve_history(self, history: list[int | str], field: str = "history") -> np.ndarray:
        """Request history (ids and/or ASINs) -> int64 item ids; ApiError naming every unknown one."""
        ids = np.zeros(len(history), dtype=np.int64)
        asin_positions = [i for i, v in enumerate(history) if isinstance(v, str)]
        unknown: list[tuple[str, str]] = []
        for i, value in enumerate(history):
            if isinstance(value, str):
                continue
            if 1 <= value <= self.size:  # Python ints: no overflow for ids beyond int64
                ids[i] = value
            else:
                unknown.append((f"{field}[{i}]", f"unknown item id {value} (the catalog has ids "
                                                  f"1..{self.size})"))
        if asin_positions:
            found = self.ids_of_asins([history[i] for i in asin_positions])
            for i, item in zip(asin_positions, found):
                if item:
                    ids[i] = item
                else:
                    unknown.append((f"{field}[{i}]", f"unknown ASIN {history[i]!r}"))
        if unknown:
            unknown.sort(key=lambda f: int(f[0][len(field) + 1:-1]))
            raise ApiError(422, unknown, error="unknown_items")
        return ids

    def items(self, item_ids: np.ndarray) -> list[dict]:
        """item_id, asin and title of each id (ids must be in 1..N)."""
        rows = pa.array(np.asarray(item_ids, dtype=np.int64) - 1)
        asins = self.asins.take(rows).to_pylist()
        titles = self.titles.take(rows).to_pylist()
        return [{"item_id": int(i), "asin": a, "title": t} for i, a, t in zip(item_ids, asins, titles)]

    def details(self, item_id: int) -> dict | None:
        """Every metadata column of one item, or None if the id is not in the catalog."""
        if not 1 <= item_id <= self.size:
            return None
        row = self.table.slice(item_id - 1, 1).to_pylist()[0]
        row["categories"] = row.get("categories") or []
        return row


def _check_dense_ids(chunks, source: str, expected_start: int = 1) -> int:
    """item_id must be 1..N in row order; checked chunk by chunk (no N-sized temporaries).
    Returns the id the next chunk must start with."""
    for chunk in chunks:
        ids = chunk.to_numpy(zero_copy_only=False)
        if len(ids) and not (ids[0] == expected_start and (np.diff(ids) == 1).all()):
            raise ValueError(f"{source}: item_id must be 1..N in row order (as `tiger prepare` "
                             f"writes it)")
        expected_start += len(ids)
    return expected_start


def _source_key(path: Path) -> dict:
    """What identifies an items.parquet (file or parts directory) without reading it."""
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    return {"path": str(path), "files": [[str(f.relative_to(path.parent)), f.stat().st_size,
                                          f.stat().st_mtime_ns] for f in files]}


def build_catalog_files(run: RunDir) -> Path:
    """RUN/serving/catalog/ for the current items.parquet; rebuilt (atomically) when stale."""
    items = run.require(run.items, "tiger prepare")
    directory = run.root.joinpath(*CATALOG_DIR)
    key = _source_key(items)
    if (directory / "source.json").exists() and atomic.read_json(directory / "source.json") == key:
        return directory
    dataset = pads.dataset(str(items), format="parquet")
    columns = [c for c in DETAIL_COLUMNS if c in dataset.schema.names]
    with atomic.atomic_path(directory, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        hashes, ids, expected = [], [], 1
        schema = pa.schema([dataset.schema.field(c) for c in columns])
        with pa.OSFile(str(tmp / "items.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in dataset.to_batches(columns=columns, batch_size=_BATCH_ROWS):
                if batch.num_rows == 0:
                    continue
                expected = _check_dense_ids([batch.column("item_id")], str(items), expected)
                writer.write_batch(batch)
                asins = batch.column("asin")
                valid = np.asarray(asins.is_valid())
                hashes.append(hash_strings(asins.filter(pa.array(valid))))
                ids.append(batch.column("item_id").to_numpy()[valid])
        hashes_all = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        ids_all = np.concatenate(ids).astype(_id_dtype(expected)) if ids else np.zeros(0, np.uint32)
        order = np.argsort(hashes_all, kind="stable")
        np.save(tmp / "asin_hash.npy", hashes_all[order])
        np.save(tmp / "asin_item.npy", ids_all[order])
        (tmp / "source.json").write_text(json.dumps(key))
    return directory
