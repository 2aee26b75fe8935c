"""The dual encoder as a ``Retriever``: encode the history, search the FAISS index.

``load_retriever(run)`` is what `tiger evaluate --model ann`, `tiger compare` and serving use. It
needs only RUN/baseline/ (model.pt and an index directory), not the text embeddings: item vectors
are precomputed in model.pt's item table and in the index.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from tiger_ray import atomic
from tiger_ray.baseline import ann_index
from tiger_ray.baseline.ann_index import AnnIndex, IndexConfig
from tiger_ray.baseline.dual_encoder import DualEncoder, DualEncoderConfig, pad_histories
from tiger_ray.baseline.item_vectors import ITEM_TABLE_FILE
from tiger_ray.evaluation.retrieval import Recommendations
from tiger_ray.runs import RunDir

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
_threads_lock = threading.RLock()


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run a block with ``threads`` torch intra-op threads (0 = leave as is), then restore.

    Why: a query-tower forward is tiny, and an intra-op team larger than the CPU share spin-waits.
    Measured on the shared 2-core machine (Beauty model): one query 0.6 ms with 1 thread vs
    30-190 ms with 2; a batch of 256 39 ms vs 400 ms. The setting is process-wide, hence the lock.
    """
    if threads <= 0 or threads == torch.get_num_threads():
        yield
        return
    with _threads_lock:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def index_dir(run: RunDir, index_type: str) -> Path:
    if index_type not in ann_index.INDEX_TYPES:
        raise ValueError(f"index type must be one of {ann_index.INDEX_TYPES}, got {index_type!r}")
    return run.baseline / f"index-{index_type}"


def default_index_type(run: RunDir) -> str:
    """The index type `tiger train-baseline` was configured with (flat if unknown)."""
    path = run.baseline / CONFIG_FILE
    return atomic.read_json(path)["index"]["index_type"] if path.exists() else "flat"


def load_model(run: RunDir, device: str | torch.device = "cpu") -> tuple[DualEncoder, torch.Tensor, np.ndarray]:
    """(model in eval mode, item table [N+1, dim], training user ids) from RUN/baseline/model.pt.
    ``model.model_id`` identifies the export (indexes record the one they were built from)."""
    path = run.require(run.baseline / MODEL_FILE, "tiger train-baseline")
    payload = torch.load(path, map_location=device, weights_only=True)
    model = DualEncoder(DualEncoderConfig(**payload["config"])).to(device)
    model.load_state_dict(payload["model"])
    model.eval()
    model.model_id = payload.get("model_id")
    model.table_file = None  # set when the item table is the memory-mapped item_table.npy
    if "item_table" in payload:
        table = payload["item_table"].to(device)
    else:  # large catalogs: RUN/baseline/item_table.npy, memory-mapped and shared by every process
        from tiger_ray.baseline.item_vectors import open_item_table

        with warnings.catch_warnings():  # read-only mmap: torch warns that it could be written
            warnings.simplefilter("ignore", UserWarning)
            table = torch.from_numpy(open_item_table(run, model.model_id)).to(device)
        model.table_file = run.baseline / ITEM_TABLE_FILE
    return model, table, payload["user_ids"].cpu().numpy()


class AnnRetriever:
    """Dual-encoder query tower + FAISS search, returning catalog item ids."""

    name = "ann"

    def __init__(self, model: DualEncoder, item_table: torch.Tensor, index: AnnIndex | None,
                 user_ids: np.ndarray, device: str | torch.device = "cpu", threads: int = 1):
        self.model = model
        self.threads = threads  # torch threads while encoding queries (0 = torch's setting)
        self.table = item_table
        self.index = index
        self.device = torch.device(device)
        self.num_items = model.config.num_items
        # user id -> embedding row (1-based; 0 = unknown user, a zero vector)
        self._user_order = np.argsort(user_ids)
        self._sorted_users = np.asarray(user_ids)[self._user_order]

    def user_index(self, user_ids: np.ndarray) -> np.ndarray:
        user_ids = np.asarray(user_ids, dtype=np.int64)
        if len(self._sorted_users) == 0:
            return np.zeros(len(user_ids), dtype=np.int64)
        pos = np.clip(np.searchsorted(self._sorted_users, user_ids), 0, len(self._sorted_users) - 1)
        known = self._sorted_users[pos] == user_ids
        return np.where(known, self._user_order[pos] + 1, 0)

    def encode(self, histories: list[np.ndarray], user_ids: np.ndarray | None = None) -> np.ndarray:
        """Query vectors [B, dim] for histories of item ids (oldest first)."""
        for row, items in enumerate(histories):
            items = np.asarray(items)
            if len(items) and (items.min() < 1 or items.max() > self.num_items):
                bad = items[(items < 1) | (items > self.num_items)][0]
                raise ValueError(f"histories[{row}]: item id {int(bad)} is not in the catalog "
                                 f"(1..{self.num_items})")
        history = torch.from_numpy(pad_histories(histories, self.model.config.max_history)).to(self.device)
        users = None
        if self.model.user is not None and user_ids is not None:
            users = torch.from_numpy(self.user_index(user_ids)).to(self.device)
        with torch.inference_mode(), torch_threads(self.threads if self.device.type == "cpu" else 0):
            return self.model.encode_queries(history, users, table=self.table).float().cpu().numpy()

    def recommend(self, histories: list[np.ndarray], user_ids: np.ndarray, k: int) -> Recommendations:
        """Top-k catalog item ids by inner product; scores are the model's logits."""
        ids, scores = self.index.search(self.encode(histories, user_ids), k)
        return Recommendations(item_ids=ids, scores=(scores * self.model.scale()).astype(np.float32))

    def score_items(self, histories: list[np.ndarray], user_ids: np.ndarray,
                    items: np.ndarray) -> np.ndarray:
        """The model's exact logits [B, C] for given candidate items [B, C] (-1: none, -inf):
        the inner products an exact search ranks by, scaled as in ``recommend``."""
        items = np.asarray(items, dtype=np.int64)
        queries = torch.from_numpy(self.encode(histories, user_ids)).to(self.device)
        rows = torch.from_numpy(np.maximum(items, 0)).to(self.table.device)
        with torch.inference_mode():
            vectors = self.model.score_vectors(self.table[rows]).float().to(self.device)  # [B, C, dim]
            scores = torch.einsum("bd,bcd->bc", queries, vectors) * self.model.scale()
        return np.where(items > 0, scores.cpu().numpy(), -np.inf).astype(np.float32)

    def index_bytes(self) -> int:
        """Bytes of the FAISS index (vectors or codes + structure + id map)."""
        return self.index.nbytes()


def load_retriever(run: RunDir, index_type: str | None = None, gpu_index: bool = False,
                   hnsw_ef_search: int | None = None, ivf_nprobe: int | None = None,
                   device: str = "cpu", threads: int = 1, ivf_refine: int | None = None) -> AnnRetriever:
    """The trained dual encoder with its FAISS index (default: the type chosen at training).

    ``hnsw_ef_search`` / ``ivf_nprobe`` / ``ivf_refine`` override the saved search-time parameters;
    ``threads`` is the torch intra-op threads used to encode queries on CPU (1: best latency per
    request, scale out with replicas; 0: leave torch's process-wide setting).
    """
    model, table, user_ids = load_model(run, device)
    index_type = index_type or default_index_type(run)
    path = index_dir(run, index_type)
    index = AnnIndex.load(path, gpu_index=gpu_index, hnsw_ef_search=hnsw_ef_search, ivf_nprobe=ivf_nprobe,
                          ivf_refine=ivf_refine)
    index.attach_vectors(table.cpu().numpy(), model.config.normalize)  # a view: no copy
    built_for = atomic.read_json(path / ann_index.META_FILE).get("model_id")
    if index.ntotal != model.config.num_items or built_for != model.model_id:
        raise ValueError(f"{path} was built for another model than {run.baseline / MODEL_FILE} "
                         f"({index.ntotal} items, model id {built_for} vs {model.config.num_items} items, "
                         f"{model.model_id}); rebuild it with `tiger baseline-index --run {run.root} "
                         f"--index-type {index_type}`")
    return AnnRetriever(model, table, index, user_ids, device, threads=threads)


# ---------------------------------------------------------------- building and measuring indexes

def item_vectors(model: DualEncoder, table: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(item ids 1..N, scoring vectors [N, dim]) to put in the index."""
    with torch.no_grad():
        vectors = model.score_vectors(table[1:]).float().cpu().numpy()
    return np.arange(1, model.config.num_items + 1, dtype=np.int64), vectors


def split_queries(run: RunDir, encoder: AnnRetriever, split: str, limit: int) -> np.ndarray:
    """Query vectors of the first ``limit`` users of a split (the real query distribution)."""
    from tiger_ray.data.schema import read_sequences
    from tiger_ray.data.split import build_examples

    examples = build_examples(read_sequences(run.sequences), split)
    n = min(limit, len(examples))
    chunks = [encoder.encode([examples.history(i) for i in range(lo, min(lo + 1024, n))],
                             examples.user_ids[lo: min(lo + 1024, n)]) for lo in range(0, n, 1024)]
    return np.concatenate(chunks) if chunks else np.zeros((0, encoder.model.config.dim), np.float32)


def _build_sharded_ivfpq(run: RunDir, model: DualEncoder, table: torch.Tensor, table_file: Path | None,
                         config: IndexConfig, path: Path):
    """IVF-PQ built in Ray tasks and merged on disk (ondisk_index.py); the item vectors stay in a
    memory-mapped [N+1, dim] file. Returns (index, vectors for exact search, normalise them?)."""
    import math
    import shutil
    import tempfile

    from tiger_ray.baseline.ondisk_index import build_ondisk_ivfpq

    n = model.config.num_items
    scratch = None
    if table_file is None:  # a small table from model.pt (explicit --ivf-shards): give it a file
        scratch = Path(tempfile.mkdtemp(prefix=".ivf-", dir=run.baseline))
        table_file = scratch / ITEM_TABLE_FILE
        np.save(table_file, table.cpu().numpy())
    nlist = ann_index.nlist_for(config, n, train_count=config.ivf_train_sample)
    try:
        build_ondisk_ivfpq(
            table_file, path, nlist=nlist, pq_m=config.pq_m, pq_nbits=config.pq_nbits,
            nprobe=ann_index.nprobe_for(config, nlist), train_sample=config.ivf_train_sample,
            shards=config.ivf_shards or max(2, math.ceil(n / 1_000_000)),
            normalize=model.config.normalize,
            meta={"index_type": "ivfpq", "config": asdict(config), "model_id": model.model_id})
        index = AnnIndex.load(path, gpu_index=config.gpu_index)
        vectors = np.load(table_file, mmap_mode="r")[1:]
        if scratch is not None:
            vectors = np.array(vectors)  # the scratch file goes away below
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return index, vectors, model.config.normalize


@torch.no_grad()
def sample_queries(run: RunDir, model: DualEncoder, table: torch.Tensor, split: str, limit: int) -> np.ndarray:
    """Query vectors of the first ``limit`` users' ``split`` examples, read in bounded batches
    (large catalogs; no user embedding there)."""
    from tiger_ray.baseline.stream import validation_sample

    if split != "valid":
        raise ValueError(f"large catalogs measure recall on the valid split, not {split!r}")
    history, _ = validation_sample(run, model.config.max_history, limit)
    chunks = [model.encode_queries(torch.from_numpy(history[lo: lo + 1024]), None, table=table).numpy()
              for lo in range(0, len(history), 1024)]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.config.dim), np.float32)


def build_run_index(run: RunDir, config: IndexConfig, measure_split: str = "valid",
                    measure_queries: int = 5000, k: int = 10, eval_splits: tuple[str, ...] = ()) -> dict:
    """Build the ``config.index_type`` index over the exported model's item vectors, measure its
    recall@k against exact search on real queries, and save it as RUN/baseline/index-<type>/.

    ``eval_splits`` also runs the shared evaluation (Recall/NDCG@5/10) through this index on those
    splits, without writing RUN/eval/ (that is `tiger evaluate`'s), to see what the ANN error costs.
    """
    model, table, user_ids = load_model(run)
    ids = np.arange(1, model.config.num_items + 1, dtype=np.int64)
    table_file = model.table_file
    path = index_dir(run, config.index_type)
    if config.index_type == "ivfpq" and (config.ivf_shards > 0 or table_file is not None):
        index, vectors, normalize = _build_sharded_ivfpq(run, model, table, table_file, config, path)
    else:
        _, vectors = item_vectors(model, table)
        normalize = False
        index = AnnIndex.build(vectors, ids, config)
    index.attach_vectors(table.cpu().numpy(), model.config.normalize)  # for ivf_refine
    encoder = AnnRetriever(model, table, index, user_ids)
    queries = (split_queries(run, encoder, measure_split, measure_queries) if table_file is None
               else sample_queries(run, model, table, measure_split, measure_queries))
    start = time.perf_counter()
    measured = ann_index.measure(index, vectors, ids, queries, k=k, normalize=normalize)
    log.info("%s index: ann recall@%d vs exact %.4f on %d %s queries; %.3f ms/query single, "
             "%.4f ms/query batched (%.1fs)", config.index_type, k, measured[f"ann_recall@{k}"],
             len(queries), measure_split, measured["single_query_ms"], measured["batched_ms_per_query"],
             time.perf_counter() - start)
    evaluation = {}
    for split in eval_splits:
        from tiger_ray.evaluation.retrieval import evaluate_retriever

        result = evaluate_retriever(encoder, run, split, k=k, write=False)
        evaluation[split] = {key: result[key] for key in ("recall@5", "ndcg@5", "recall@10", "ndcg@10")}
        log.info("%s index, %s split: %s", config.index_type, split,
                 "  ".join(f"{key} {v:.4f}" for key, v in evaluation[split].items()))
    extra = {"model_id": model.model_id, "measured_on": measure_split, **measured,
             **({"evaluation": evaluation} if evaluation else {})}
    index.save(path, extra=extra)
    if index.directory is not None:  # how the on-disk build went (ondisk_index.py)
        meta = atomic.read_json(path / ann_index.META_FILE)
        extra.update({key: meta[key] for key in ("ondisk", "shards", "train_sample", "train_seconds",
                                                 "add_seconds", "merge_seconds")})
    return {"index_type": config.index_type, "params": config.params(), "path": str(path),
            "bytes": index.nbytes(), "bytes_per_item": index.nbytes() / max(index.ntotal, 1), **extra}
