"""Semantic IDs for the whole catalog, streamed with Ray Data; nothing per item reaches the driver.

    1. codes       embeddings -> ``map_batches`` with a pool of RQ-VAE actors -> per item: item_id,
                   the 3 codes packed in one int64 ``prefix``, its key-range ``bucket``, the
                   reconstruction errors; written to a temporary Parquet directory
    2. statistics  the driver streams those Parquet files batch by batch into fixed-size aggregates
                   (code histograms, items per bucket, error histogram), never an array per item
    3. collisions  ``groupby("bucket").map_groups``: a bucket is a range of prefixes, so every
                   prefix group lies in one bucket; c3 = rank by item_id within the prefix group
                   (deterministic, as ``collisions.collision_tokens``); each bucket task writes its
                   items' codes into codes.npy (row = item_id) and its sorted keys into its slice
                   of the index (the slice offsets are the bucket counts of step 2)
    4. check       the driver streams the index once: keys strictly ascending, every item 1..N
                   exactly once (1 bit of state per item) -> every codes.npy row was written

codes.npy and the index files are created by the driver with ``np.lib.format.open_memmap`` under
temporary names and renamed only when complete. Bucket tasks write into them in place, so on a
multi-node cluster RUN must be on storage every node sees.
"""

from __future__ import annotations

import logging
import math
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tiger_ray import atomic
from tiger_ray.runs import RunDir
from tiger_ray.semantic_ids.collisions import CollisionCapError
from tiger_ray.semantic_ids.config import RQVAEConfig
from tiger_ray.semantic_ids.index import ITEMS_FILE, KEYS_FILE, META_FILE as INDEX_META, index_meta, key_layout
from tiger_ray.semantic_ids.table import (CODES_FILE, FILENAME, META_FILE, SemanticIds, _hash_table, code_dtype,
                                          export_parquet, write_meta)

log = logging.getLogger(__name__)

BUCKET_ROWS = 65_536  # target items per collision bucket (one map_groups call)
ERROR_BINS = 1 << 16  # resolution of the reconstruction-error quantiles
CHUNK = 1 << 18  # rows per driver-side streaming step (bounds the driver's scratch)


class CodeAssigner:
    """A Ray Data actor holding one RQ-VAE replica."""

    def __init__(self, model_path: str, device: str = "cpu", bucket_span: int = 1):
        from tiger_ray.semantic_ids.rqvae import load_model

        self.device = device
        self.model = load_model(model_path, device)
        self.size = self.model.config.codebook_size
        self.bucket_span = int(bucket_span)

    def __call__(self, batch: dict) -> dict:
        import torch

        x = np.array(batch["embedding"], dtype=np.float32)  # a writable copy for torch
        codes, err = self.model.encode(torch.from_numpy(x).to(self.device))
        codes, err = codes.cpu().numpy().astype(np.int64), err.cpu().numpy().astype(np.float64)
        prefix = np.zeros(len(codes), dtype=np.int64)
        for level in range(codes.shape[1]):
            prefix = prefix * self.size + codes[:, level]
        return {"item_id": np.asarray(batch["item_id"], dtype=np.int64), "prefix": prefix,
                "bucket": prefix // self.bucket_span, "recon_error": err,
                "relative_error": err / np.maximum((x.astype(np.float64) ** 2).sum(1), 1e-12)}


@dataclass
class AssignmentStats:
    """What the report needs, as aggregates of fixed size (independent of N)."""

    items: int
    codebook_size: int
    max_collision_token: int
    code_counts: np.ndarray  # [levels, codebook_size] items per code
    c3_counts: np.ndarray  # [max c3 + 1] items per collision token
    error: dict  # mean, median, p95, max, relative_mean of ||x - x_hat||^2
    error_hist: tuple[np.ndarray, np.ndarray]  # (counts [50], edges [51]) for the plot
    extra: dict = field(default_factory=dict)

    @property
    def levels(self) -> int:
        return self.code_counts.shape[0]

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,) * self.levels + (len(self.c3_counts),)

    def collision_stats(self) -> dict:
        """``collisions.collision_stats`` from the c3 histogram: #groups of size >= s = #items with c3 = s - 1."""
        n, c = self.items, np.append(self.c3_counts, 0).astype(np.int64)
        sizes = {s: int(c[s - 1] - c[s]) for s in range(1, len(c)) if c[s - 1] - c[s] > 0}
        return {"items": n, "unique_prefixes": int(c[0]), "unique_prefix_rate": c[0] / n if n else 1.0,
                "largest_collision_group": len(self.c3_counts) if n else 0,
                "items_in_collisions": int(n - sizes.get(1, 0)), "collision_groups": int(c[1]),
                "fraction_c3_positive": (n - c[0]) / n if n else 0.0, "group_size_counts": sizes}


# ---------------------------------------------------------------- step 1: the model pass

def predict_dataset(run: RunDir, model_path: Path, config: RQVAEConfig, bucket_span: int):
    """The streamed model pass (a lazy Ray Dataset)."""
    from ray.data import ActorPoolStrategy

    from tiger_ray.embedding.store import read_embeddings_dataset

    resources = {"num_gpus": 1} if config.use_gpu else {"num_cpus": 1}
    return read_embeddings_dataset(run).map_batches(
        CodeAssigner, fn_constructor_kwargs={"model_path": str(model_path), "bucket_span": bucket_span,
                                             "device": "cuda" if config.use_gpu else "cpu"},
        batch_size=config.assign_batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=config.assign_concurrency), **resources)


def bucket_span(num_items: int, config: RQVAEConfig, bucket_rows: int = BUCKET_ROWS) -> int:
    """Prefixes per bucket, so buckets hold about ``bucket_rows`` items if codes were uniform."""
    prefixes = config.codebook_size ** config.num_levels
    buckets = max(1, min(prefixes, math.ceil(num_items / bucket_rows)))
    return math.ceil(prefixes / buckets)


# ---------------------------------------------------------------- step 2: streamed statistics

def _iter_columns(path: Path, columns: list[str]):
    import pyarrow.dataset as pads

    for batch in pads.dataset(str(path), format="parquet").to_batches(columns=columns, batch_size=CHUNK):
        yield {c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns}


def stream_statistics(path: Path, config: RQVAEConfig, num_buckets: int) -> dict:
    """Two passes over the model output: counts and error range, then the error histogram."""
    size, levels = config.codebook_size, config.num_levels
    code_counts = np.zeros((levels, size), dtype=np.int64)
    bucket_counts = np.zeros(num_buckets, dtype=np.int64)
    n, err_sum, rel_sum, lo, hi = 0, 0.0, 0.0, math.inf, -math.inf
    for b in _iter_columns(path, ["prefix", "bucket", "recon_error", "relative_error"]):
        prefix = b["prefix"]
        for level in range(levels - 1, -1, -1):
            code_counts[level] += np.bincount(prefix % size, minlength=size)
            prefix = prefix // size
        bucket_counts += np.bincount(b["bucket"], minlength=num_buckets)
        n += len(b["bucket"])
        err_sum += float(b["recon_error"].sum())
        rel_sum += float(b["relative_error"].sum())
        if len(b["recon_error"]):
            lo, hi = min(lo, float(b["recon_error"].min())), max(hi, float(b["recon_error"].max()))
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, ERROR_BINS + 1) if n else np.linspace(0, 1, ERROR_BINS + 1)
    hist = np.zeros(ERROR_BINS, dtype=np.int64)
    for b in _iter_columns(path, ["recon_error"]):
        hist += np.histogram(b["recon_error"], bins=edges)[0]

    def quantile(q: float) -> float:  # linear within the bin holding rank q * (n - 1)
        rank = q * (n - 1)
        cum = np.cumsum(hist)
        i = int(np.searchsorted(cum, rank, side="right"))
        i = min(i, ERROR_BINS - 1)
        before = cum[i - 1] if i else 0
        frac = (rank - before + 0.5) / max(hist[i], 1)
        return float(edges[i] + min(max(frac, 0.0), 1.0) * (edges[i + 1] - edges[i]))

    coarse_edges = np.linspace(edges[0], edges[-1], 51)
    coarse = np.histogram((edges[:-1] + edges[1:]) / 2, bins=coarse_edges, weights=hist)[0].astype(np.int64)
    return {"items": n, "code_counts": code_counts, "bucket_counts": bucket_counts,
            "error": {"mean": err_sum / max(n, 1), "median": quantile(0.5) if n else 0.0,
                      "p95": quantile(0.95) if n else 0.0, "max": hi if n else 0.0,
                      "relative_mean": rel_sum / max(n, 1)},
            "error_hist": (coarse, coarse_edges)}


# ---------------------------------------------------------------- step 3: collision tokens per bucket

def collision_group(batch: dict, codes_path: str, keys_path: str, items_path: str, bucket_starts: np.ndarray,
                    codebook_size: int, levels: int, cap: int, num_items: int) -> dict:
    """One bucket (map_groups): c3 by item_id within each prefix; its rows into codes.npy and its
    sorted keys into the index slice [bucket_starts[b], bucket_starts[b + 1])."""
    ids = np.asarray(batch["item_id"], dtype=np.int64)
    prefix = np.asarray(batch["prefix"], dtype=np.int64)
    bucket = int(batch["bucket"][0])
    order = np.lexsort((ids, prefix))  # by prefix, then item_id
    ids, prefix = ids[order], prefix[order]
    n = len(ids)
    start = np.ones(n, dtype=bool)
    start[1:] = prefix[1:] != prefix[:-1]
    c3 = np.arange(n) - np.maximum.accumulate(np.where(start, np.arange(n), 0))
    out = {"bucket": np.array([bucket]), "rows": np.array([n]),
           "c3_counts": np.bincount(np.minimum(c3, cap), minlength=cap + 1)[None, :cap + 1],
           "over_prefix": np.array([-1]), "over_size": np.array([0]), "over_items": np.full((1, 5), -1)}
    if n and (ids.min() < 1 or ids.max() > num_items):
        raise ValueError(f"embedding item_id outside 1..{num_items} (e.g. {int(ids[(ids < 1) | (ids > num_items)][0])})")
    if n != bucket_starts[bucket + 1] - bucket_starts[bucket]:
        raise RuntimeError(f"bucket {bucket}: {n} rows, the statistics pass counted "
                           f"{int(bucket_starts[bucket + 1] - bucket_starts[bucket])}")
    if (c3 >= cap).any():  # nothing written: the driver raises CollisionCapError
        worst = int(np.argmax(c3))
        members = ids[prefix == prefix[worst]]
        out.update(over_prefix=np.array([prefix[worst]]), over_size=np.array([len(members)]))
        out["over_items"][0, :min(5, len(members))] = members[:5]
        return out
    codes = np.empty((n, levels + 1), dtype=np.int64)
    rest = prefix.copy()
    for level in range(levels - 1, -1, -1):
        codes[:, level] = rest % codebook_size
        rest //= codebook_size
    codes[:, levels] = c3
    table = np.load(codes_path, mmap_mode="r+")
    table[ids] = codes
    table.flush()
    del table
    key_dtype, offset = key_layout((codebook_size,) * levels + (cap,))
    lo = int(bucket_starts[bucket])
    for path, values in ((keys_path, (prefix * cap + c3 - offset).astype(key_dtype)),
                         (items_path, ids.astype(np.int32))):
        array = np.load(path, mmap_mode="r+")
        array[lo:lo + n] = values
        array.flush()
        del array
    return out


# ---------------------------------------------------------------- the stage

def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def compute_semantic_ids(run: RunDir, config: RQVAEConfig, model_path: Path | None = None,
                         bucket_rows: int = BUCKET_ROWS) -> AssignmentStats:
    """Write codes.npy and the index (index.json included) for every item; returns the statistics.
    semantic_ids.json, the table's completion mark, is written by ``finish_table``."""
    import ray

    from tiger_ray.embedding.store import MANIFEST, Manifest
    from tiger_ray.ray_env import init_ray

    init_ray()
    model_path = model_path or run.require(run.semantic_ids / "model.pt", "tiger train-rqvae")
    manifest = Manifest.read(run.require(run.embeddings / MANIFEST, "tiger embed").parent)
    num_items, levels, size = manifest.count, config.num_levels, config.codebook_size
    if num_items < 1:
        raise ValueError(f"{run.embeddings / MANIFEST}: no embeddings to assign")
    cap = config.max_collision_token
    directory = run.semantic_ids
    directory.mkdir(parents=True, exist_ok=True)
    # A reader must never pair new files with the old table's metadata.
    for name in (META_FILE, INDEX_META):
        (directory / name).unlink(missing_ok=True)
    span = bucket_span(num_items, config, bucket_rows)
    num_buckets = math.ceil(size ** levels / span)
    scratch = directory / f".assign-{uuid.uuid4().hex[:8]}"
    paths = {name: directory / name for name in (CODES_FILE, KEYS_FILE, ITEMS_FILE)}
    temps = {name: _temp(p) for name, p in paths.items()}
    try:
        predict_dataset(run, model_path, config, span).write_parquet(str(scratch))
        stats = stream_statistics(scratch, config, num_buckets)
        if stats["items"] != num_items:
            raise ValueError(f"{run.embeddings / MANIFEST}: {num_items} items expected, "
                             f"the assignment pass produced {stats['items']}")
        log.info("%d items in %d collision buckets (largest %d)", num_items, num_buckets,
                 int(stats["bucket_counts"].max()))
        radix = (size,) * levels + (cap,)
        key_dtype, _ = key_layout(radix)
        sizes_cap = (size,) * levels + (cap,)
        for name, shape, dtype in ((CODES_FILE, (num_items + 1, levels + 1), code_dtype(sizes_cap)),
                                   (KEYS_FILE, (num_items,), key_dtype), (ITEMS_FILE, (num_items,), np.int32)):
            array = np.lib.format.open_memmap(temps[name], mode="w+", dtype=dtype, shape=shape)
            del array  # zero-filled sparse file; the bucket tasks write every row
        starts = np.zeros(num_buckets + 1, dtype=np.int64)
        np.cumsum(stats["bucket_counts"], out=starts[1:])
        summaries = ray.data.read_parquet(str(scratch)).select_columns(["item_id", "prefix", "bucket"]) \
            .groupby("bucket").map_groups(
                collision_group, batch_format="numpy",
                fn_kwargs={"codes_path": str(temps[CODES_FILE]), "keys_path": str(temps[KEYS_FILE]),
                           "items_path": str(temps[ITEMS_FILE]), "bucket_starts": starts,
                           "codebook_size": size, "levels": levels, "cap": cap, "num_items": num_items}) \
            .take_all()  # one small row per bucket
        over = [s for s in summaries if int(s["over_size"]) > 0]
        if over:
            worst = max(over, key=lambda s: int(s["over_size"]))
            prefix = int(worst["over_prefix"])
            digits = [(prefix // size ** (levels - 1 - l)) % size for l in range(levels)]
            items = [int(i) for i in worst["over_items"] if i >= 0]
            raise CollisionCapError(
                f"{int(worst['over_size'])} items share the Semantic-ID prefix {digits} (e.g. item_id {items}), "
                f"but the collision token is capped at {cap} values (max_collision_token); "
                f"raise the cap, or train the RQ-VAE longer / with larger codebooks")
        c3_counts = np.sum([s["c3_counts"] for s in summaries], axis=0)
        c3_counts = c3_counts[:int(np.flatnonzero(c3_counts).max()) + 1]
        check_index(temps[KEYS_FILE], temps[ITEMS_FILE], num_items)
        sizes = (size,) * levels + (len(c3_counts),)
        if code_dtype(sizes) != code_dtype(sizes_cap):  # a cap above 256 that no group reached
            _narrow(temps[CODES_FILE], code_dtype(sizes))
        for name in (CODES_FILE, KEYS_FILE, ITEMS_FILE):
            temps[name].replace(paths[name])
        atomic.write_json(directory / INDEX_META, index_meta(num_items, radix, sizes))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return AssignmentStats(items=num_items, codebook_size=size, max_collision_token=cap,
                           code_counts=stats["code_counts"], c3_counts=c3_counts, error=stats["error"],
                           error_hist=stats["error_hist"])


def _narrow(path: Path, dtype: np.dtype) -> None:
    """Rewrite a .npy file in a narrower dtype, in chunks (its values fit)."""
    source = np.load(path, mmap_mode="r")
    tmp = _temp(path)
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=source.shape)
    for lo in range(0, len(source), CHUNK):
        out[lo:lo + CHUNK] = source[lo:lo + CHUNK]
    out.flush()
    del out, source
    tmp.replace(path)


def check_index(keys_path: Path, items_path: Path, num_items: int) -> None:
    """Keys strictly ascending (IDs unique) and items 1..N once each (every codes.npy row written)."""
    keys, items = np.load(keys_path, mmap_mode="r"), np.load(items_path, mmap_mode="r")
    seen = np.zeros(num_items + 1, dtype=bool)
    last = None
    for lo in range(0, num_items, CHUNK):
        k = np.asarray(keys[lo:lo + CHUNK])
        ids = np.asarray(items[lo:lo + CHUNK], dtype=np.int64)
        if (k[1:] <= k[:-1]).any() or (last is not None and k[0] <= last):
            raise ValueError(f"{keys_path}: keys are not strictly ascending (two items share a Semantic ID)")
        if ids.min() < 1 or ids.max() > num_items:
            raise ValueError(f"{items_path}: item id outside 1..{num_items}")
        seen[ids] = True
        last = k[-1]
    if int(seen.sum()) != num_items:
        raise ValueError(f"{items_path}: {num_items - int(seen.sum())} item ids got no Semantic ID "
                         "(duplicate item_id rows in the embeddings?)")


def finish_table(run: RunDir, stats: AssignmentStats) -> SemanticIds:
    """The Parquet export, then semantic_ids.json (with the fingerprint, hashed from codes.npy in
    chunks): the table is complete. Returns it, memory-mapped."""
    directory = run.semantic_ids
    table = np.load(directory / CODES_FILE, mmap_mode="r")
    fingerprint = _hash_table(stats.codebook_sizes, stats.items, table, None)
    export_parquet(directory / FILENAME, SemanticIds._dense(table, stats.codebook_sizes))
    write_meta(directory, stats.codebook_sizes, stats.items, fingerprint)
    return SemanticIds.open(directory)


def assign_semantic_ids(run: RunDir, config: RQVAEConfig, model_path: Path | None = None,
                        bucket_rows: int = BUCKET_ROWS) -> AssignmentStats:
    """``compute_semantic_ids`` then ``finish_table``."""
    stats = compute_semantic_ids(run, config, model_path, bucket_rows)
    finish_table(run, stats)
    return stats
