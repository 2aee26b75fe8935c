"""Streamed training data for the dual encoder on large catalogs (no process holds all users).

    RUN/baseline/item_counts.npy   int64 [N+1]: how often each item is a training target (row =
                                   item_id), counted by Ray Data; the log-Q correction's Q

Training windows (``training_windows``) are made by Ray Data tasks from sequences.parquet (one
file or a directory of parts) and reach the Ray Train workers through ``get_dataset_shard``.
Validation reads a bounded sample of users (the first ``valid_users`` in file order) and scores
them against the whole catalog in chunks of items, so nothing is [queries, N].
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from tiger_ray import atomic
from tiger_ray.baseline.dual_encoder import DualEncoder, pad_examples, training_windows
from tiger_ray.data.split import MIN_SEQUENCE_LENGTH
from tiger_ray.evaluation.metrics import MetricCollection
from tiger_ray.runs import RunDir

log = logging.getLogger(__name__)

COUNTS_FILE = "item_counts.npy"


def num_items(run: RunDir) -> int:
    """N from stats.json (written by `tiger prepare` / `tiger synth`), else Parquet metadata."""
    if run.stats.exists():
        stats = atomic.read_json(run.stats)
        if "items" in stats:
            return int(stats["items"])
    import pyarrow.dataset as pads

    return int(pads.dataset(str(run.require(run.items, "tiger prepare")), format="parquet").count_rows())


def sequence_batches(path: Path, batch_rows: int = 8192) -> Iterator[pa.RecordBatch]:
    """user_id, item_ids batches of a sequences file or parts directory, in file order."""
    import pyarrow.dataset as pads

    dataset = pads.dataset(str(path), format="parquet")
    yield from dataset.to_batches(columns=["user_id", "item_ids"], batch_size=batch_rows)


def _lists(batch) -> tuple[np.ndarray, np.ndarray]:
    column = batch.column("item_ids")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    flat = column.values.to_numpy().astype(np.int64)
    short = np.flatnonzero(np.diff(offsets) < MIN_SEQUENCE_LENGTH)
    if len(short):
        user = batch.column("user_id")[int(short[0])]
        raise ValueError(f"sequences: user_id {user} has fewer than {MIN_SEQUENCE_LENGTH} items")
    return offsets, flat


def windows_batch(batch: pa.Table, max_history: int) -> dict:
    """Ray Data map_batches: the training windows of a batch of users (SASRec-style, see
    ``training_windows``): history and targets [W, max_history] int64."""
    offsets, flat = _lists(batch)
    parts = [flat[offsets[u]: offsets[u + 1] - 2] for u in range(len(offsets) - 1)]
    history, targets, _ = training_windows(parts, max_history)
    return {"history": history, "targets": targets}


def windows_dataset(run: RunDir, max_history: int):
    """Ray Dataset of training windows over RUN/sequences.parquet (streamed, never gathered)."""
    import ray.data

    from tiger_ray.ray_env import init_ray

    init_ray()
    path = run.require(run.sequences, "tiger prepare")
    return (ray.data.read_parquet(str(path)).select_columns(["user_id", "item_ids"])
            .map_batches(windows_batch, fn_kwargs={"max_history": max_history},
                         batch_format="pyarrow", batch_size=2048)
            .randomize_block_order())


def _target_counts(batch: pa.Table) -> dict:
    offsets, flat = _lists(batch)
    # Targets of the training part seq[:-2] are its items after the first: seq[1:-2].
    keep = np.zeros(len(flat), dtype=bool)
    for u in range(len(offsets) - 1):
        keep[offsets[u] + 1: offsets[u + 1] - 2] = True
    ids, counts = np.unique(flat[keep], return_counts=True)
    return {"item_id": ids, "count": counts.astype(np.int64)}


def _write_counts(batch: dict, path: str, num_items: int) -> dict:
    ids = np.asarray(batch["item_id"], dtype=np.int64)
    if len(ids) and (ids.min() < 1 or ids.max() > num_items):
        raise ValueError(f"sequences: item_id outside the catalog 1..{num_items}")
    out = np.load(path, mmap_mode="r+")
    out[ids] = batch["sum(count)"]
    out.flush()
    return {"rows": np.array([len(ids)], dtype=np.int64)}


def write_item_counts(run: RunDir) -> Path:
    """Count training targets per item with Ray Data (per-batch counts, groupby item_id) into
    RUN/baseline/item_counts.npy, a fixed-width array made by the driver and renamed when done."""
    import ray.data

    from tiger_ray.ray_env import init_ray

    init_ray()
    n = num_items(run)
    path = run.baseline / COUNTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(n + 1,)).flush()
        (ray.data.read_parquet(str(run.require(run.sequences, "tiger prepare")))
         .select_columns(["user_id", "item_ids"])
         .map_batches(_target_counts, batch_format="pyarrow", batch_size=8192)
         .groupby("item_id").sum("count")
         .map_batches(_write_counts, fn_kwargs={"path": str(tmp), "num_items": n},
                      batch_format="numpy")
         .materialize())
    return path


def validation_sample(run: RunDir, max_history: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(histories [V, max_history] left-aligned, targets [V]) of the first ``limit`` users'
    validation examples (0 = all users), read in bounded batches."""
    histories, targets, taken = [], [], 0
    for batch in sequence_batches(run.require(run.sequences, "tiger prepare")):
        offsets, flat = _lists(batch)
        users = len(offsets) - 1 if not limit else min(len(offsets) - 1, limit - taken)
        ends = offsets[1: users + 1] - 2  # history = seq[:-2], target = seq[-2]
        hist_offsets = np.concatenate([[0], np.cumsum(ends - offsets[:users])])
        hist_flat = np.concatenate([flat[offsets[u]: ends[u]] for u in range(users)]) if users else flat[:0]
        histories.append(pad_examples(hist_offsets, hist_flat, max_history))
        targets.append(flat[ends])
        taken += users
        if limit and taken >= limit:
            break
    if not histories:
        return np.zeros((0, max_history), np.int64), np.zeros(0, np.int64)
    return np.concatenate(histories), np.concatenate(targets)


@torch.no_grad()
def evaluate_chunked(model: DualEncoder, history: np.ndarray, targets: np.ndarray, batch_size: int,
                     device: torch.device, item_chunk: int = 16384) -> MetricCollection:
    """Recall/NDCG@5/10 by exact top-k over the whole catalog, items scored ``item_chunk`` at a
    time and the running top-k merged: memory [batch, item_chunk], not [batch, N]."""
    model.eval()
    metrics = MetricCollection.default()
    k, n = metrics.max_k, model.config.num_items
    queries = [model.encode_queries(torch.from_numpy(history[lo: lo + batch_size]).to(device))
               for lo in range(0, len(targets), batch_size)]
    best = [(torch.full((len(q), k), float("-inf"), device=device),
             torch.zeros((len(q), k), dtype=torch.long, device=device)) for q in queries]
    for lo in range(1, n + 1, item_chunk):
        ids = torch.arange(lo, min(lo + item_chunk, n + 1), device=device)
        vectors = model.score_vectors(model.item_repr(ids))
        for b, q in enumerate(queries):
            scores = q @ vectors.T
            top = scores.topk(min(k, len(ids)), dim=1)
            merged_scores = torch.cat([best[b][0], top.values], dim=1)
            merged_ids = torch.cat([best[b][1], ids[top.indices]], dim=1)
            keep = merged_scores.topk(k, dim=1).indices
            best[b] = (merged_scores.gather(1, keep), merged_ids.gather(1, keep))
    for b, lo in enumerate(range(0, len(targets), batch_size)):
        metrics.update(best[b][1].cpu().numpy(), targets[lo: lo + batch_size])
    return metrics
