"""The evaluation loop every model goes through: same examples, same metrics, same outputs.

A model plugs in as a ``Retriever``; ``evaluate_retriever`` builds the leave-one-out examples of a
split, asks for the top-K over the whole catalog in batches, and writes

    RUN/eval/<model>/<split>/predictions.parquet   user_id, target, item_ids (ranked), scores
    RUN/eval/<model>/<split>/metrics.json          recall@5/10, ndcg@5/10, count, extras

so anyone can recompute the metrics from the predictions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa

from tiger_ray import atomic
from tiger_ray.data.schema import read_sequences
from tiger_ray.data.split import Split, build_examples
from tiger_ray.evaluation.metrics import CatalogCoverage, MetricCollection
from tiger_ray.runs import RunDir

PREDICTIONS_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("target", pa.int64(), nullable=False),
    pa.field("item_ids", pa.list_(pa.int64()), nullable=False),
    pa.field("scores", pa.list_(pa.float32()), nullable=False),
])


@dataclass
class Recommendations:
    """Top-k per query. item_ids holds -1 in slots a model could not fill."""

    item_ids: np.ndarray  # [B, k] int64
    scores: np.ndarray  # [B, k] float32
    extras: dict[str, float] = field(default_factory=dict)  # per-batch sums, e.g. invalid_ids


class Retriever(Protocol):
    name: str

    def recommend(self, histories: list[np.ndarray], user_ids: np.ndarray, k: int) -> Recommendations:
        """Rank the whole catalog for each history (item ids, oldest first)."""
        ...


def predictions_table(user_ids, targets, recs: Recommendations) -> pa.Table:
    item_lists = [row[row >= 0].tolist() for row in recs.item_ids]
    score_lists = [s[r >= 0].tolist() for r, s in zip(recs.item_ids, recs.scores)]
    return pa.table({
        "user_id": pa.array(np.asarray(user_ids, dtype=np.int64)),
        "target": pa.array(np.asarray(targets, dtype=np.int64)),
        "item_ids": pa.array(item_lists, type=pa.list_(pa.int64())),
        "scores": pa.array(score_lists, type=pa.list_(pa.float32())),
    }, schema=PREDICTIONS_SCHEMA)


def metrics_from_predictions(table: pa.Table, ks: tuple[int, ...] = (5, 10)) -> dict[str, float]:
    """Recompute the metrics from a predictions table (what a user would do by hand)."""
    metrics = MetricCollection.default(ks)
    k = metrics.max_k
    ranked = np.full((table.num_rows, k), -1, dtype=np.int64)
    for i, row in enumerate(table.column("item_ids").to_pylist()):
        row = row[:k]
        ranked[i, :len(row)] = row
    metrics.update(ranked, table.column("target").to_numpy())
    return metrics.compute()


def evaluate_retriever(retriever: Retriever, run: RunDir, split: Split, *, k: int = 10,
                       batch_size: int = 256, max_history: int | None = None,
                       limit: int | None = None, progress: bool = True,
                       write: bool = True) -> dict:
    """Full-ranking leave-one-out evaluation of ``retriever`` on ``split`` ('valid' or 'test')."""
    from tqdm.auto import tqdm

    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    sequences = read_sequences(run.require(run.sequences, "tiger prepare"))
    examples = build_examples(sequences, split, max_history=max_history)
    n = len(examples) if limit is None else min(limit, len(examples))
    metrics = MetricCollection.default(tuple(sorted({5, 10, k} & set(range(1, k + 1)))))
    coverage = CatalogCoverage(k, int(sequences.flat.max()))
    tables, extras = [], {}
    start = time.perf_counter()
    bar = tqdm(total=n, desc=f"evaluate {retriever.name} {split}", unit="user", disable=not progress)
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        histories = [examples.history(i) for i in range(lo, hi)]
        recs = retriever.recommend(histories, examples.user_ids[lo:hi], k)
        targets = examples.targets[lo:hi]
        metrics.update(recs.item_ids[:, :k], targets)
        coverage.update(recs.item_ids)
        for key, value in recs.extras.items():
            extras[key] = extras.get(key, 0.0) + float(value)
        tables.append(predictions_table(examples.user_ids[lo:hi], targets, recs))
        bar.update(hi - lo)
    bar.close()
    seconds = time.perf_counter() - start
    result = {
        "model": retriever.name,
        "split": split,
        "count": n,
        **metrics.compute(),
        coverage.key: coverage.compute(),
        **{key: value / max(n, 1) for key, value in extras.items()},
        "seconds": seconds,
        "queries_per_second": n / seconds if seconds > 0 else None,
    }
    if write:
        out = run.eval_dir(retriever.name, split)
        atomic.write_parquet(out / "predictions.parquet", pa.concat_tables(tables))
        atomic.write_json(out / "metrics.json", result)
    return result
