"""FAISS index over item vectors for maximum inner product search, keyed by catalog item id.

    RUN/baseline/index-<type>/index.faiss   the index, wrapped in IndexIDMap2 so searches return
                                            catalog item ids (not row numbers)
    RUN/baseline/index-<type>/index.json    type, parameters, dim, count, bytes, measured recall

Types: ``flat`` (exact inner product, the default), ``hnsw`` (graph; M, efConstruction, efSearch)
and ``ivfpq`` (inverted lists + product quantisation; nlist, m, nbits, nprobe). With
``gpu_index=True`` and a GPU build of FAISS with a visible GPU, flat and IVF-PQ indexes are moved to
GPU 0 for search; HNSW has no GPU implementation and stays on CPU. Files are always CPU indexes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from tiger_ray import atomic
from tiger_ray.baseline.index_files import INDEX_FILE, META_FILE  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

IndexType = Literal["flat", "hnsw", "ivfpq"]
INDEX_TYPES: tuple[str, ...] = ("flat", "hnsw", "ivfpq")
# Below this many queries an OpenMP team costs more than it saves: a single query searched with
# 2 threads on a busy 2-core machine measured 8.6 ms instead of 0.13 ms (threads spin-waiting).
SMALL_BATCH = 32
_omp_lock = threading.RLock()


@contextlib.contextmanager
def omp_threads(threads: int):
    """Run a block with FAISS using ``threads`` OpenMP threads (0 = leave as is).

    The setting is process-wide, so the block holds a lock and restores it afterwards.
    """
    if threads <= 0:
        yield
        return
    import faiss

    with _omp_lock:
        previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(threads)
        try:
            yield
        finally:
            faiss.omp_set_num_threads(previous)


@dataclass
class IndexConfig:
    index_type: IndexType = field(default="flat", metadata={"help": "FAISS index: exact flat, hnsw or ivfpq"})
    hnsw_m: int = field(default=32, metadata={"help": "HNSW: neighbours per node"})
    hnsw_ef_construction: int = field(default=200, metadata={"help": "HNSW: candidate list size while building"})
    hnsw_ef_search: int = field(default=128, metadata={"help": "HNSW: candidate list size while searching"})
    ivf_nlist: int = field(default=0, metadata={"help": "IVF-PQ: inverted lists; 0 = about 4 * sqrt(items)"})
    ivf_nprobe: int = field(default=0, metadata={
        "help": "IVF-PQ: lists visited per query; 0 = about nlist / 64 (at least 16), so recall holds "
                "as nlist grows with the catalog"})
    pq_m: int = field(default=16, metadata={"help": "IVF-PQ: sub-quantisers (must divide the vector dim)"})
    pq_nbits: int = field(default=8, metadata={"help": "IVF-PQ: bits per sub-quantiser code"})
    ivf_shards: int = field(default=0, metadata={
        "help": "IVF-PQ: Ray tasks that each add a range of items, merged on disk (faiss.contrib.ondisk) "
                "and searched memory-mapped; 0 = in one process for small catalogs (item table in "
                "model.pt), else one task per 1M items (at least 2)"})
    ivf_refine: int = field(default=0, metadata={
        "help": "IVF-PQ: fetch refine x k candidates and re-rank them by the exact inner product with "
                "the item vectors (rows of the memory-mapped item table); 0 = rank by PQ scores"})
    ivf_train_sample: int = field(default=262_144, metadata={
        "help": "IVF-PQ built in shards: item vectors the coarse quantizer and PQ codebooks train on"})
    gpu_index: bool = field(default=False, metadata={
        "help": "search on GPU when FAISS has GPU support and a GPU is visible; with several GPUs "
                "flat and IVF-PQ indexes are sharded across them (faiss IndexShards)"})
    search_threads: int = field(default=0, metadata={
        "help": "OpenMP threads per search; 0 = 1 thread for batches under 32 queries (latency), "
                "FAISS's default for larger ones"})

    def params(self) -> dict:
        """The parameters that matter for ``index_type``."""
        keys = {"flat": [], "hnsw": ["hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"],
                "ivfpq": ["ivf_nlist", "ivf_nprobe", "pq_m", "pq_nbits", "ivf_shards", "ivf_refine"]}[self.index_type]
        return {k: getattr(self, k) for k in keys}


def faiss_gpus() -> int:
    """Number of GPUs FAISS can use (0 for faiss-cpu)."""
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0


def nlist_for(config: IndexConfig, count: int, train_count: int | None = None) -> int:
    """Inverted lists for ``count`` items whose coarse quantizer trains on ``train_count`` of them."""
    nlist = config.ivf_nlist or int(round(4 * math.sqrt(count)))
    # k-means wants ~39 points per centroid; fewer lists is better than untrained ones.
    trained_on = count if train_count is None else min(count, train_count)
    return max(1, min(nlist, trained_on // 39 or 1))


def nprobe_for(config: IndexConfig, nlist: int) -> int:
    """Lists visited per query: the configured number, or ~1/64 of the lists (at least 16).

    A fixed nprobe visits an ever smaller share of a growing catalog: measured recall@10 vs exact
    fell from 0.995 (100k items, 1,265 lists) to 0.791 (1M items, 4,000 lists) at nprobe 16.
    """
    return min(nlist, config.ivf_nprobe or max(16, nlist // 64))


def build_faiss_index(vectors: np.ndarray, ids: np.ndarray, config: IndexConfig):
    """A CPU FAISS index over ``vectors`` [n, d] whose search returns ``ids`` [n] (int64)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"vectors must be [n, d] with one id per row; got {vectors.shape} and {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("item ids given to the index are not unique")
    n, dim = vectors.shape
    if config.index_type == "flat":
        base = faiss.IndexFlatIP(dim)
    elif config.index_type == "hnsw":
        base = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = config.hnsw_ef_construction
        base.hnsw.efSearch = config.hnsw_ef_search
    elif config.index_type == "ivfpq":
        if dim % config.pq_m:
            raise ValueError(f"pq_m ({config.pq_m}) must divide the vector dim ({dim})")
        if n < 2 ** config.pq_nbits:
            raise ValueError(f"IVF-PQ with pq_nbits={config.pq_nbits} needs at least {2 ** config.pq_nbits} "
                             f"vectors to train its codebooks, got {n}; lower --pq-nbits")
        quantizer = faiss.IndexFlatIP(dim)
        nlist = nlist_for(config, n)
        base = faiss.IndexIVFPQ(quantizer, dim, nlist, config.pq_m, config.pq_nbits, faiss.METRIC_INNER_PRODUCT)
        base.nprobe = nprobe_for(config, nlist)
    else:
        raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {config.index_type!r}")
    index = faiss.IndexIDMap2(base)
    if not index.is_trained:
        index.train(vectors)
    index.add_with_ids(vectors, ids)
    return index


def set_search_params(index, config: IndexConfig) -> None:
    """Apply the search-time parameters (efSearch, nprobe) to a loaded index."""
    import faiss

    base = faiss.downcast_index(index.index) if hasattr(index, "id_map") else faiss.downcast_index(index)
    if config.index_type == "hnsw":
        base.hnsw.efSearch = config.hnsw_ef_search
    elif config.index_type == "ivfpq":
        ivf = faiss.extract_index_ivf(base)
        ivf.nprobe = nprobe_for(config, ivf.nlist)


class AnnIndex:
    """A FAISS index plus its config: ``search`` returns catalog item ids and inner products."""

    def __init__(self, index, config: IndexConfig, dim: int, directory: Path | None = None):
        self.cpu_index = index
        self.config = config
        self.dim = dim
        # Set for an IVF-PQ merged on disk (ondisk_index.py): its lists live in files there.
        self.directory = directory
        self.refine_vectors, self.refine_normalize = None, False  # see attach_vectors
        self.index = index
        self.on_gpu = False
        self._gpu_resources = None
        if config.gpu_index:
            self._to_gpu()

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, config: IndexConfig) -> "AnnIndex":
        start = time.perf_counter()
        index = build_faiss_index(vectors, ids, config)
        log.info("built %s index over %d items (dim %d) in %.1fs", config.index_type, len(ids),
                 vectors.shape[1], time.perf_counter() - start)
        return cls(index, config, int(vectors.shape[1]))

    def _to_gpu(self) -> None:
        import faiss

        if faiss_gpus() == 0:
            log.warning("gpu_index requested but FAISS has no GPU support or sees no GPU; searching on CPU")
            return
        if self.config.index_type == "hnsw":
            log.warning("FAISS has no GPU HNSW; the hnsw index stays on CPU")
            return
        if faiss_gpus() > 1:
            # Large catalogs: each GPU holds 1/G of the items (an IndexShards), queries go to all.
            options = faiss.GpuMultipleClonerOptions()
            options.shard = True
            self.index = faiss.index_cpu_to_all_gpus(self.cpu_index, co=options)
            self.on_gpu = True
            return
        self._gpu_resources = faiss.StandardGpuResources()
        # The clone keeps the id map on the host and copies nprobe from the CPU index, which
        # already carries this config's search parameters.
        self.index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.cpu_index)
        self.on_gpu = True

    @property
    def nprobe(self) -> int:
        """IVF-PQ: the lists each query visits now."""
        import faiss

        return int(faiss.extract_index_ivf(self.cpu_index).nprobe)

    def set_nprobe(self, nprobe: int) -> None:
        """IVF-PQ: visit ``nprobe`` lists per query from now on (CPU and GPU copies)."""
        import faiss

        faiss.extract_index_ivf(self.cpu_index).nprobe = nprobe
        if self.on_gpu:
            faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)
        self.config.ivf_nprobe = nprobe

    @property
    def ntotal(self) -> int:
        return int(self.cpu_index.ntotal)

    def item_ids(self) -> np.ndarray:
        """The catalog ids held by the index (insertion order; by inverted list when on disk)."""
        import faiss

        if hasattr(self.cpu_index, "id_map"):
            return faiss.vector_to_array(self.cpu_index.id_map).astype(np.int64)
        invlists = faiss.extract_index_ivf(self.cpu_index).invlists
        return np.concatenate([faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                               for i in range(invlists.nlist)] or [np.zeros(0, np.int64)])

    def attach_vectors(self, vectors: np.ndarray, normalize: bool) -> None:
        """Item vectors by item id ([N+1, dim], may be a memmap) for ``ivf_refine`` re-ranking."""
        self.refine_vectors, self.refine_normalize = vectors, normalize

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(item ids [B, k] int64 with -1 for empty slots, inner products [B, k] float32)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [B, {self.dim}], got {queries.shape}")
        refine = (self.config.index_type == "ivfpq" and self.config.ivf_refine > 0
                  and self.refine_vectors is not None)
        threads = self.config.search_threads or (1 if len(queries) < SMALL_BATCH else 0)
        with omp_threads(0 if self.on_gpu else threads):
            scores, ids = self.index.search(queries, k * self.config.ivf_refine if refine else k)
        ids, scores = ids.astype(np.int64), scores.astype(np.float32)
        return self._refine(queries, ids, k) if refine else (ids, scores)

    def _refine(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # PQ distances are approximate; the candidates' exact scores fix the order (only
        # B x refine*k rows of the item table are read).
        vectors = np.asarray(self.refine_vectors[np.maximum(ids, 0).ravel()], dtype=np.float32)
        vectors = vectors.reshape(*ids.shape, -1)
        if self.refine_normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=2, keepdims=True), 1e-12)
        exact = np.einsum("bd,bkd->bk", queries, vectors)
        exact[ids < 0] = -np.inf
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        ids, exact = np.take_along_axis(ids, order, axis=1), np.take_along_axis(exact, order, axis=1)
        return ids, np.where(ids < 0, np.float32(-np.inf), exact).astype(np.float32)

    def nbytes(self) -> int:
        """Size of the serialised index (vectors or codes, graph or lists, and the id map)."""
        import faiss

        if self.directory is not None:
            from tiger_ray.baseline.ondisk_index import LISTS_FILE

            return sum((self.directory / f).stat().st_size for f in (INDEX_FILE, LISTS_FILE))
        return int(faiss.serialize_index(self.cpu_index).nbytes)

    def save(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write index.faiss and index.json into ``directory`` (replaced atomically as a whole)."""
        import faiss

        directory = Path(directory)
        if self.directory is not None:  # built in place by ondisk_index: only index.json changes
            meta = {**atomic.read_json(self.directory / META_FILE), **(extra or {})}
            atomic.write_json(self.directory / META_FILE, meta)
            return self.directory
        meta = {"index_type": self.config.index_type, "config": asdict(self.config), "dim": self.dim,
                "count": self.ntotal, "bytes": self.nbytes(), "faiss_version": faiss.__version__,
                **(extra or {})}
        meta["bytes_per_item"] = meta["bytes"] / max(self.ntotal, 1)
        with atomic.atomic_path(directory, is_dir=True) as tmp:
            faiss.write_index(self.cpu_index, str(tmp / INDEX_FILE))
            atomic.write_json(tmp / META_FILE, meta)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, gpu_index: bool = False, **search_params) -> "AnnIndex":
        """Read an index saved by ``save``; ``search_params`` (hnsw_ef_search, ivf_nprobe) override
        the saved search-time settings."""
        import faiss

        directory = Path(directory)
        path = directory / INDEX_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; build it with `tiger train-baseline` "
                                    f"or `tiger baseline-index`")
        meta = atomic.read_json(directory / META_FILE)
        values = {**meta["config"], **{k: v for k, v in search_params.items() if v is not None},
                  "gpu_index": gpu_index}
        config = IndexConfig(**values)
        if meta.get("ondisk"):
            from tiger_ray.baseline.ondisk_index import read_ondisk

            index = read_ondisk(directory)  # item ids are in the inverted lists
            set_search_params(index, config)
            return cls(index, config, int(meta["dim"]), directory=directory)
        index = faiss.read_index(str(path))
        if not hasattr(index, "id_map"):
            raise ValueError(f"{path}: not an IndexIDMap2 index, so it cannot map rows to item ids")
        set_search_params(index, config)
        return cls(index, config, int(meta["dim"]))


def exact_top_k(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int,
                chunk: int = 256, item_chunk: int = 16384, normalize: bool = False) -> np.ndarray:
    """Brute-force top-k item ids by inner product (the ground truth for ANN recall).

    Items are scored ``item_chunk`` rows at a time (``vectors`` may be a memmap; ``normalize``
    L2-normalises each chunk) and the running top-k merged, so the scratch is [chunk, item_chunk]
    rather than [queries, N]. Ties keep the lower row first.
    """
    ids = np.asarray(ids)
    k = min(k, len(ids))
    queries = np.asarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), k), dtype=np.int64)
    from tiger_ray.mapped import scan_blocks

    for lo_item, block in scan_blocks(vectors[: len(ids)], item_chunk):  # memmaps: not kept resident
        if normalize:
            block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        kk = min(k, len(block))
        for lo in range(0, len(queries), chunk):
            scores = queries[lo: lo + chunk] @ block.T
            top = np.argpartition(-scores, kth=kk - 1, axis=1)[:, :kk]
            top = np.sort(top, axis=1)  # row order, so equal scores keep the lower row first
            cand_scores = np.concatenate([best_scores[lo: lo + chunk],
                                          np.take_along_axis(scores, top, axis=1)], axis=1)
            cand_rows = np.concatenate([best_rows[lo: lo + chunk], top + lo_item], axis=1)
            order = np.argsort(-cand_scores, axis=1, kind="stable")[:, :k]
            best_scores[lo: lo + chunk] = np.take_along_axis(cand_scores, order, axis=1)
            best_rows[lo: lo + chunk] = np.take_along_axis(cand_rows, order, axis=1)
    return ids[best_rows]


def ann_recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k ("recall@k vs exact")."""
    if approx_ids.shape != exact_ids.shape:
        raise ValueError(f"shapes differ: {approx_ids.shape} vs {exact_ids.shape}")
    k = exact_ids.shape[1]
    hits = [len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits) / k) if len(hits) else 0.0


def measure(index: AnnIndex, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray,
            k: int = 10, normalize: bool = False) -> dict:
    """Recall@k of ``index`` against exact search, and its search latency (batch and single).

    IVF-PQ also gets ``nprobe_curve``: recall and batched latency at 1/4x..4x its nprobe, and
    ``refine_curve`` (when item vectors are attached): the same at ``ivf_refine`` 0..20; the
    numbers to choose ``--ivf-nprobe`` and ``--ivf-refine`` by.
    """
    exact = exact_top_k(vectors, ids, queries, k, normalize=normalize)
    curve, refine_curve = [], []
    if index.config.index_type == "ivfpq":
        chosen, nlist = index.nprobe, _ivf_nlist(index)
        for nprobe in sorted({max(1, min(nlist, chosen * f // 4)) for f in (1, 2, 4, 8, 16)}):
            index.set_nprobe(nprobe)
            start = time.perf_counter()
            found, _ = index.search(queries, k)
            curve.append({"nprobe": nprobe, f"ann_recall@{k}": ann_recall(found, exact),
                          "batched_ms_per_query": 1e3 * (time.perf_counter() - start) / max(len(queries), 1)})
        index.set_nprobe(chosen)
        if index.refine_vectors is not None:  # and how far exact re-ranking of more candidates helps
            chosen_refine = index.config.ivf_refine
            for refine in (0, 2, 5, 10, 20):
                index.config.ivf_refine = refine
                start = time.perf_counter()
                found, _ = index.search(queries, k)
                refine_curve.append({"refine": refine, f"ann_recall@{k}": ann_recall(found, exact),
                                     "batched_ms_per_query": 1e3 * (time.perf_counter() - start)
                                     / max(len(queries), 1)})
            index.config.ivf_refine = chosen_refine
    start = time.perf_counter()
    found, _ = index.search(queries, k)
    batch_seconds = time.perf_counter() - start
    singles = queries[: min(len(queries), 200)]
    start = time.perf_counter()
    for row in singles:
        index.search(row[None, :], k)
    single_seconds = (time.perf_counter() - start) / max(len(singles), 1)
    return {f"ann_recall@{k}": ann_recall(found, exact), "queries": int(len(queries)),
            "batched_ms_per_query": 1e3 * batch_seconds / max(len(queries), 1),
            "single_query_ms": 1e3 * single_seconds,
            **({"nprobe": index.nprobe, "nlist": _ivf_nlist(index), "nprobe_curve": curve} if curve else {}),
            **({"refine_curve": refine_curve} if refine_curve else {})}


def _ivf_nlist(index: AnnIndex) -> int:
    import faiss

    return int(faiss.extract_index_ivf(index.cpu_index).nlist)
