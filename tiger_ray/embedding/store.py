"""Embeddings on disk: Parquet shards plus a manifest, and readers for later stages.

    RUN/embeddings/part-<first id>-<last id>.parquet ...   item_id int64,
                                                  embedding fixed_size_list<float32>[dim]
    RUN/embeddings/manifest.json            model, dim, normalized, count, files (+ source, config)

Small catalogs load as one numpy matrix (``load_embeddings``); large ones stream as a Ray Dataset
(``read_embeddings_dataset``).

Crash safety: a shard appears under its final name only once complete (write-then-rename), and
carries in its Parquet metadata the *source key* it was made from (model, normalisation, digest of
items.parquet). The manifest is written last, after every shard, and removed first when a run is
about to change the shards; so a manifest always describes a complete, consistent set. Readers
trust only the manifest; `tiger embed` trusts only shards whose key matches the run's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tiger_ray import atomic
from tiger_ray.runs import RunDir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_GLOB = "part-*.parquet"
SHARD_KEY = b"tiger.embedding"  # Parquet schema metadata: json of the source key + dim + count


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
    ])


def embeddings_table(item_ids: np.ndarray, vectors: np.ndarray) -> pa.Table:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.table({
        "item_id": pa.array(np.asarray(item_ids, dtype=np.int64)),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
    }, schema=embeddings_schema(dim))


@dataclass(frozen=True)
class Manifest:
    model: str
    dim: int
    normalized: bool
    count: int
    files: list[str]

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        data = atomic.read_json(directory / MANIFEST)
        return cls(**{k: data[k] for k in ("model", "dim", "normalized", "count", "files")})


def write_embeddings(run: RunDir, item_ids: np.ndarray, vectors: np.ndarray, model: str,
                     normalized: bool = True) -> Manifest:
    """Write a whole (small) embedding matrix as one shard; used by tests and small catalogs."""
    directory = run.embeddings
    directory.mkdir(parents=True, exist_ok=True)
    name = "part-00000.parquet"
    atomic.write_parquet(directory / name, embeddings_table(item_ids, vectors))
    manifest = Manifest(model=model, dim=int(vectors.shape[1]), normalized=normalized,
                        count=int(len(item_ids)), files=[name])
    atomic.write_json(directory / MANIFEST, manifest.__dict__)
    return manifest


def load_embeddings(run: RunDir) -> tuple[np.ndarray, np.ndarray]:
    """(item_ids [N], vectors [N, dim] float32) sorted by item_id, checked against the manifest."""
    directory = run.require(run.embeddings / MANIFEST, "tiger embed").parent
    manifest = Manifest.read(directory)
    tables = [pq.read_table(directory / f) for f in manifest.files]
    table = pa.concat_tables(tables) if tables else embeddings_schema(manifest.dim).empty_table()
    if table.num_rows != manifest.count:
        raise ValueError(f"{directory}: manifest says {manifest.count} embeddings, shards hold {table.num_rows}")
    item_ids = table.column("item_id").to_numpy()
    col = table.column("embedding").combine_chunks()
    vectors = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, manifest.dim).astype(np.float32)
    order = np.argsort(item_ids, kind="stable")
    return item_ids[order], vectors[order]


# ------------------------------------------------------------------ shards written by `tiger embed`


def shard_name(item_ids: np.ndarray) -> str:
    """Named by its id range; unique within a run because shards hold disjoint item sets."""
    return f"part-{int(np.min(item_ids)):010d}-{int(np.max(item_ids)):010d}.parquet"


def write_shard(directory: Path, item_ids: np.ndarray, vectors: np.ndarray, key: dict) -> str:
    """Write one shard atomically (rows sorted by item_id), tagged with ``key``; returns its file name."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    order = np.argsort(item_ids, kind="stable")
    table = embeddings_table(item_ids[order], np.asarray(vectors)[order])
    meta = {**key, "dim": int(vectors.shape[1]), "count": int(len(item_ids))}
    table = table.replace_schema_metadata({SHARD_KEY: json.dumps(meta, sort_keys=True).encode()})
    name = shard_name(item_ids)
    atomic.write_parquet(Path(directory) / name, table)
    return name


@dataclass(frozen=True)
class ShardInfo:
    name: str
    item_ids: np.ndarray  # int64
    dim: int


@dataclass(frozen=True)
class ShardScan:
    trusted: list[ShardInfo]  # complete shards made from the same source key, disjoint item sets
    untrusted: list[Path]  # everything else a re-run must not keep: temp files, other keys, junk


def _read_shard(path: Path, key: dict) -> ShardInfo | None:
    """The shard's ids if it is a complete shard of ``key``; None if it must not be trusted."""
    try:
        file = pq.ParquetFile(path)
        meta = json.loads((file.schema_arrow.metadata or {}).get(SHARD_KEY, b"null"))
        if not isinstance(meta, dict) or {k: meta.get(k) for k in key} != key:
            return None
        if file.metadata.num_rows != meta["count"] or file.schema_arrow.field("embedding").type != \
                pa.list_(pa.float32(), meta["dim"]):
            return None
        ids = file.read(columns=["item_id"]).column("item_id").to_numpy()
    except Exception as err:  # truncated, not Parquet, wrong columns: all mean "do not trust"
        log.warning("%s: unreadable shard (%s)", path, err)
        return None
    return ShardInfo(path.name, ids.astype(np.int64), int(meta["dim"]))


def scan_shards(directory: Path, key: dict) -> ShardScan:
    """Sort the files in ``directory`` into shards a re-run may keep and files it must delete."""
    directory = Path(directory)
    if not directory.is_dir():
        return ShardScan([], [])
    valid, untrusted = [], []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") and ".tmp-" in path.name:
            untrusted.append(path)  # a writer was killed before its rename
        elif path.match(SHARD_GLOB):
            info = _read_shard(path, key)
            (untrusted.append(path) if info is None else valid.append(info))
    # An actor that died after its rename may have had its batch redone into another shard: of
    # shards sharing item ids, keep the first (by name) and drop the others.
    all_ids = np.concatenate([i.item_ids for i in valid]) if valid else np.zeros(0, np.int64)
    ids, counts = np.unique(all_ids, return_counts=True)
    shared, claimed, trusted = set(ids[counts > 1].tolist()), set(), []
    for info in valid:
        mine = shared.intersection(info.item_ids.tolist()) if shared else set()
        if mine & claimed:
            untrusted.append(directory / info.name)
        else:
            claimed |= mine
            trusted.append(info)
    return ShardScan(trusted, untrusted)


def write_manifest(directory: Path, files: list[str], model: str, dim: int, normalized: bool,
                   count: int, **extra) -> Manifest:
    """Write the manifest (last, atomically); ``extra`` adds fields such as the source key."""
    manifest = Manifest(model=model, dim=int(dim), normalized=bool(normalized), count=int(count),
                        files=sorted(files))
    atomic.write_json(Path(directory) / MANIFEST, {**extra, **manifest.__dict__})
    return manifest


def read_manifest_json(directory: Path) -> dict | None:
    """The manifest's full JSON (with the extra fields), or None if absent or unreadable."""
    try:
        return atomic.read_json(Path(directory) / MANIFEST)
    except (FileNotFoundError, ValueError):
        return None


def _check_files(directory: Path, manifest: Manifest) -> list[str]:
    paths = [directory / f for f in manifest.files]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{directory / MANIFEST} lists shards that do not exist: {missing[:3]}; "
                                "re-run `tiger embed`")
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    if rows != manifest.count:
        raise ValueError(f"{directory}: manifest says {manifest.count} embeddings, shards hold {rows}")
    return [str(p) for p in paths]


def _as_tensor_batch(batch: pa.Table) -> dict:
    # fixed_size_list -> [rows, dim] ndarray: numpy batches get a 2-D float32 array, not objects.
    column = batch.column("embedding").combine_chunks()
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return {"item_id": batch.column("item_id").to_numpy(), "embedding": flat.reshape(-1, dim)}


def read_embeddings_dataset(run: RunDir):
    """RUN/embeddings as a streaming Ray Dataset of item_id int64 and embedding float32 [dim].

    Batches in numpy format give ``embedding`` as a [rows, dim] array (torch batches a tensor).
    Rows come in no particular order. Starts a loopback-only Ray if none is running.
    """
    import ray.data

    from tiger_ray.ray_env import init_ray

    directory = run.require(run.embeddings / MANIFEST, "tiger embed").parent
    paths = _check_files(directory, Manifest.read(directory))
    init_ray()
    return ray.data.read_parquet(paths).map_batches(_as_tensor_batch, batch_format="pyarrow",
                                                    batch_size=None)


# ------------------------------------------------------------------ the memory-mapped matrix

VECTORS_FILE = "vectors.npy"  # [N+1, dim], row = item_id, row 0 zeros (numpy .npy)
VECTORS_META = "vectors.json"  # written after the rename: the manifest it was made from


def _vectors_key(directory: Path, dtype: str) -> dict:
    # Tied to the manifest's content: new embeddings (a re-run of `tiger embed`) make it stale.
    import hashlib

    digest = hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()
    return {"manifest_sha256": digest, "dtype": np.dtype(dtype).name}


def _write_rows(batch: dict, path: str, num_items: int) -> dict:
    """Ray Data task: writes its batch's rows into the driver's open_memmap (rows are disjoint)."""
    ids = np.asarray(batch["item_id"], dtype=np.int64)
    if len(ids) and (ids.min() < 1 or ids.max() > num_items):
        raise ValueError(f"{path}: embedding item_id outside 1..{num_items}")
    out = np.load(path, mmap_mode="r+")
    out[ids] = batch["embedding"]
    out.flush()
    del out
    return {"rows": np.array([len(ids)], dtype=np.int64),
            "id_sum": np.array([int(ids.sum())], dtype=np.int64)}


def write_vectors_file(run: RunDir, dtype: str = "float32") -> Path:
    """Write RUN/embeddings/vectors.npy: the embeddings as one [N+1, dim] matrix, row = item_id.

    The driver creates the file (np.lib.format.open_memmap, so it never holds the matrix) under a
    temp name; Ray Data tasks stream the Parquet shards into their rows; the file is renamed only
    once every row is written, and vectors.json (which ``open_vectors`` requires) comes after it.
    On a multi-node cluster RUN must be on storage every node sees.
    """
    directory = run.require(run.embeddings / MANIFEST, "tiger embed").parent
    manifest = Manifest.read(directory)
    num_items = manifest.count
    if run.stats.exists():
        num_items = int(atomic.read_json(run.stats).get("items", num_items))
    if manifest.count != num_items:
        raise ValueError(f"{directory / MANIFEST}: {manifest.count} embeddings but "
                         f"{run.stats} says the catalog has {num_items} items")
    key = _vectors_key(directory, dtype)
    for stale in directory.glob(f".{VECTORS_FILE}.tmp-*"):  # a writer killed before its rename
        stale.unlink(missing_ok=True)
    (directory / VECTORS_META).unlink(missing_ok=True)
    path = directory / VECTORS_FILE
    with atomic.atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype),
                                        shape=(num_items + 1, manifest.dim))
        out[0] = 0  # padding row (the file is sparse zeros already; explicit for clarity)
        out.flush()
        del out
        written = read_embeddings_dataset(run).map_batches(
            _write_rows, fn_kwargs={"path": str(tmp), "num_items": num_items},
            batch_format="numpy").take_all()
        rows = sum(int(r["rows"]) for r in written)
        id_sum = sum(int(r["id_sum"]) for r in written)
        # Ids are in 1..N (checked per batch) and the count is N: the sum rules out duplicates
        # that would leave another row unwritten in all but contrived cases.
        if rows != num_items or id_sum != num_items * (num_items + 1) // 2:
            raise ValueError(f"{directory}: embeddings do not cover item ids 1..{num_items} once each "
                             f"({rows} rows written)")
    atomic.write_json(directory / VECTORS_META, {**key, "shape": [num_items + 1, manifest.dim]})
    log.info("wrote %s [%d, %d] %s", path, num_items + 1, manifest.dim, key["dtype"])
    return path


def open_vectors(run: RunDir, dtype: str = "float32") -> np.memmap:
    """RUN/embeddings/vectors.npy as a read-only memmap [N+1, dim]; builds it if missing or stale.

    Every process that opens it shares the page cache: no per-process copy of the matrix.
    """
    directory = run.require(run.embeddings / MANIFEST, "tiger embed").parent
    path = directory / VECTORS_FILE
    meta = _read_json_or_none(directory / VECTORS_META)
    key = _vectors_key(directory, dtype)
    if not path.exists() or meta is None or {k: meta.get(k) for k in key} != key:
        write_vectors_file(run, dtype)
    vectors = np.load(path, mmap_mode="r")
    if vectors.ndim != 2 or vectors.dtype != np.dtype(dtype):
        raise ValueError(f"{path}: expected a 2-D {dtype} matrix, got {vectors.dtype} {vectors.shape}")
    return vectors


def _read_json_or_none(path: Path) -> dict | None:
    try:
        return atomic.read_json(path)
    except (FileNotFoundError, ValueError):
        return None
