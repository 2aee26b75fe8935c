"""IVF-PQ for large catalogs: trained on a sample, filled in shards by Ray tasks, merged on disk.

    RUN/baseline/index-ivfpq/index.faiss     the IVF-PQ header: coarse quantizer, PQ codebooks,
                                             and a reference to the inverted lists file
    RUN/baseline/index-ivfpq/lists.ivfdata   every item's PQ code and item id, by list
                                             (faiss OnDiskInvertedLists; memory-mapped when read)

Steps: (1) train the coarse quantizer and the PQ codebooks on ``ivf_train_sample`` item vectors;
(2) Ray tasks each add one contiguous range of item rows to a copy of the trained (empty) index
and write it (its inverted lists hold item ids directly, so no IndexIDMap is needed);
(3) ``faiss.contrib.ondisk.merge_ondisk`` concatenates the shards' lists into lists.ivfdata
without loading them. The index is read back with ``IO_FLAG_ONDISK_SAME_DIR``: the lists stay in
the file (mapped, in the page cache shared by every searcher), only the quantizer and codebooks
are in RAM.

Vectors come from a [N+1, dim] .npy (row = item_id, row 0 padding) opened with mmap in every task.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from tiger_ray import atomic
from tiger_ray.mapped import release

log = logging.getLogger(__name__)

LISTS_FILE = "lists.ivfdata"
TRAINED_FILE = "trained.faiss"


def _rows(vectors: np.ndarray, lo: int, hi: int, normalize: bool) -> np.ndarray:
    x = np.array(vectors[lo:hi], dtype=np.float32)  # a copy: the mmap is read-only
    if normalize:
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def train_ivfpq(vectors: np.ndarray, nlist: int, pq_m: int, pq_nbits: int, sample: int,
                normalize: bool, seed: int = 0):
    """An empty IVF-PQ (inner product) trained on ``sample`` random item rows of ``vectors``."""
    import faiss

    n, dim = len(vectors) - 1, vectors.shape[1]
    if dim % pq_m:
        raise ValueError(f"pq_m ({pq_m}) must divide the vector dim ({dim})")
    take = min(n, max(sample, 1))
    if take < 2 ** pq_nbits:
        raise ValueError(f"IVF-PQ with pq_nbits={pq_nbits} needs at least {2 ** pq_nbits} vectors to "
                         f"train its codebooks, got {take}; lower --pq-nbits")
    rows = np.sort(np.random.default_rng(seed).choice(n, size=take, replace=False)) + 1
    x = np.array(vectors[rows], dtype=np.float32)  # sorted rows: sequential reads
    if normalize:
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, pq_m, pq_nbits, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    return index


def add_shard(trained_path: str, vectors_path: str, lo: int, hi: int, normalize: bool,
              out_path: str, batch_rows: int = 65536) -> int:
    """Add item rows [lo, hi) to a copy of the trained index and write it; returns rows added."""
    import faiss

    index = faiss.read_index(trained_path)
    vectors = np.load(vectors_path, mmap_mode="r")
    for start in range(lo, hi, batch_rows):
        end = min(start + batch_rows, hi)
        index.add_with_ids(_rows(vectors, start, end, normalize), np.arange(start, end, dtype=np.int64))
        release(vectors)  # a shard reads its range once: do not keep it resident
    faiss.write_index(index, out_path)
    return int(index.ntotal)


def shard_ranges(num_items: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous item-id ranges [lo, hi) covering 1..num_items."""
    bounds = np.linspace(1, num_items + 1, max(1, min(shards, num_items)) + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def build_ondisk_ivfpq(vectors_path: str | os.PathLike, directory: str | os.PathLike, *, nlist: int,
                       pq_m: int, pq_nbits: int, nprobe: int, train_sample: int, shards: int,
                       normalize: bool, meta: dict, cpus_per_task: float = 0.5) -> Path:
    """Build the index of the items in ``vectors_path`` into ``directory`` (replaced atomically).

    ``meta`` goes into index.json (with count, bytes). Shards run as Ray tasks.
    """
    import faiss
    import ray
    from faiss.contrib.ondisk import merge_ondisk

    from tiger_ray.baseline.index_files import INDEX_FILE, META_FILE
    from tiger_ray.ray_env import init_ray

    vectors = np.load(vectors_path, mmap_mode="r")
    n = len(vectors) - 1
    directory = Path(directory)
    with atomic.atomic_path(directory, is_dir=True) as tmp:
        start = time.perf_counter()
        trained = train_ivfpq(vectors, nlist, pq_m, pq_nbits, train_sample, normalize)
        faiss.write_index(trained, str(tmp / TRAINED_FILE))
        train_seconds = time.perf_counter() - start
        init_ray()
        task = ray.remote(num_cpus=cpus_per_task)(add_shard)
        ranges = shard_ranges(n, shards)
        paths = [str(tmp / f"shard-{i:05d}.faiss") for i in range(len(ranges))]
        added = ray.get([task.remote(str(tmp / TRAINED_FILE), str(vectors_path), lo, hi, normalize, path)
                         for (lo, hi), path in zip(ranges, paths)])
        if sum(added) != n:
            raise RuntimeError(f"IVF-PQ shards hold {sum(added)} items, expected {n}")
        add_seconds = time.perf_counter() - start - train_seconds
        # The lists file is named relative to the index file, so the directory can be renamed.
        merge_ondisk(trained, paths, str(tmp / LISTS_FILE))
        faiss.extract_index_ivf(trained).nprobe = nprobe
        faiss.write_index(trained, str(tmp / INDEX_FILE))
        for path in [*paths, str(tmp / TRAINED_FILE)]:
            os.unlink(path)
        nbytes = sum(p.stat().st_size for p in tmp.iterdir())
        atomic.write_json(tmp / META_FILE, {
            **meta, "count": n, "dim": int(vectors.shape[1]), "ondisk": True, "bytes": nbytes,
            "bytes_per_item": nbytes / max(n, 1), "shards": len(ranges), "train_sample": min(n, train_sample),
            "train_seconds": train_seconds, "add_seconds": add_seconds,
            "merge_seconds": time.perf_counter() - start - train_seconds - add_seconds,
            "faiss_version": faiss.__version__})
    log.info("IVF-PQ over %d items in %d shards merged on disk: %s (%.1f B/item)", n, len(ranges),
             directory, nbytes / max(n, 1))
    return directory


def read_ondisk(directory: str | os.PathLike):
    """The merged index with its inverted lists left in lists.ivfdata (mapped, not loaded)."""
    import faiss

    from tiger_ray.baseline.index_files import INDEX_FILE

    return faiss.read_index(str(Path(directory) / INDEX_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR)
