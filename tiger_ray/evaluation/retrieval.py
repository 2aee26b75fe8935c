"""The evaluation loop every model goes through: same examples, same metrics, same outputs.

A model plugs in as a ``Retriever``; ``evaluate_retriever`` streams the users of
sequences.parquet in batches, builds each batch's leave-one-out examples, asks for the top-K over
the whole catalog and writes

    RUN/eval/<model>/<split>/predictions.parquet/part-*.parquet   user_id, target, item_ids, scores
    RUN/eval/<model>/<split>/metrics.json                         recall@5/10, ndcg@5/10, count, extras

so anyone can recompute the metrics from the predictions (``metrics_from_predictions``).

Every batch goes through one function, ``evaluate_batch``: it writes its predictions part and
returns its partial sums (metric totals, count, extras, the distinct items it recommended).
Given a retriever it runs in this process; given a ``workers`` count and a zero-argument
factory (e.g. ``retrievers.RetrieverFactory``), it runs as Ray Data batch inference on that many
actors, each loading the model once. The driver only adds up the sums, so no stage holds every
user or every prediction.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tiger_ray import atomic
from tiger_ray.data.split import MIN_SEQUENCE_LENGTH, Split
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
    """One row per user; a ranked list keeps its filled slots (item id >= 0) in order."""
    filled = np.asarray(recs.item_ids) >= 0
    offsets = np.zeros(len(filled) + 1, dtype=np.int32)
    np.cumsum(filled.sum(axis=1), out=offsets[1:])
    items = np.asarray(recs.item_ids, dtype=np.int64)[filled]  # row-major: rank order per row
    scores = np.asarray(recs.scores, dtype=np.float32)[filled]
    return pa.table({
        "user_id": pa.array(np.asarray(user_ids, dtype=np.int64)),
        "target": pa.array(np.asarray(targets, dtype=np.int64)),
        "item_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(items)),
        "scores": pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores)),
    }, schema=PREDICTIONS_SCHEMA)


def ranked_matrix(item_lists: pa.Array, k: int) -> np.ndarray:
    """[B, k] ids from a list<int64> column, -1 where a list is shorter than k."""
    item_lists = item_lists.combine_chunks() if isinstance(item_lists, pa.ChunkedArray) else item_lists
    lengths = pc.list_value_length(item_lists).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(item_lists).to_numpy().astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(k)
    inside = cols[None, :] < lengths[:, None]
    return np.where(inside, flat[np.where(inside, starts[:, None] + cols[None, :], 0)]
                    if len(flat) else -1, -1)


def metrics_from_predictions(predictions: pa.Table | str | Path,
                             ks: tuple[int, ...] = (5, 10)) -> dict[str, float]:
    """Recompute the metrics from predictions (what a user would do by hand): a table, or a
    predictions.parquet file or directory of parts, read batch by batch."""
    from tiger_ray.data.schema import iter_batches

    metrics = MetricCollection.default(ks)
    batches = (predictions.to_batches() if isinstance(predictions, pa.Table)
               else iter_batches(predictions, ["target", "item_ids"]))
    for batch in batches:
        metrics.update(ranked_matrix(batch.column("item_ids"), metrics.max_k),
                       batch.column("target").to_numpy())
    return metrics.compute()


# ---------------------------------------------------------------- one batch of users

def eval_examples(offsets: np.ndarray, flat: np.ndarray, split: Split,
                  max_history: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Histories and targets of a batch of users (user u's items are flat[offsets[u]:offsets[u+1]])
    for the 'valid' or 'test' split: ``build_examples``' examples, without a loop over users'
    items (one slice per user, which is what a Retriever takes)."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    lengths = np.diff(offsets)
    if (lengths < MIN_SEQUENCE_LENGTH).any():
        raise ValueError(f"{int((lengths < MIN_SEQUENCE_LENGTH).sum())} users have fewer than "
                         f"{MIN_SEQUENCE_LENGTH} items and cannot be split leave-one-out")
    end = offsets[1:] - (2 if split == "valid" else 1)  # the target's position
    start = offsets[:-1] if max_history is None else np.maximum(offsets[:-1], end - max_history)
    return [flat[a:b] for a, b in zip(start.tolist(), end.tolist())], flat[end]


def user_columns(users: pa.Table | pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, offsets from 0, flat item ids) of a batch of sequences.parquet rows."""
    items = users.column("item_ids")
    if isinstance(items, pa.ChunkedArray):
        items = items.combine_chunks()
    offsets = items.offsets.to_numpy().astype(np.int64)
    return (users.column("user_id").to_numpy().astype(np.int64), offsets - offsets[0],
            items.flatten().to_numpy().astype(np.int64))


def evaluate_batch(retriever: Retriever, users: pa.Table | pa.RecordBatch, split: Split, *,
                   k: int, max_history: int | None = None, out_dir: Path | None = None) -> dict:
    """Recommend for one batch of users; write its predictions part into ``out_dir`` (named by
    its first user id, so parts sort in user order); return its partial sums. The loops hand it
    at most ``batch_size`` users, never across a row group."""
    user_ids, offsets, flat = user_columns(users)
    histories, targets = eval_examples(offsets, flat, split, max_history)
    recs = retriever.recommend(histories, user_ids, k)
    metrics = MetricCollection.default(metric_ks(k))
    metrics.update(recs.item_ids[:, :k], targets)
    if out_dir is not None and len(user_ids):
        atomic.write_parquet(Path(out_dir) / f"part-{int(user_ids[0]):012d}.parquet",
                             predictions_table(user_ids, targets, recs))
    top = np.asarray(recs.item_ids)[:, :k]
    return {"count": len(user_ids), "totals": [m.total for m in metrics.metrics],
            "extras": {key: float(v) for key, v in recs.extras.items()},
            "items": np.unique(top[top > 0])}


def metric_ks(k: int) -> tuple[int, ...]:
    return tuple(sorted({5, 10, k} & set(range(1, k + 1))))


@dataclass
class EvaluationSums:
    """What the driver keeps: the batches' sums added up and a bitmap of recommended items."""

    k: int
    catalog_size: int
    metrics: MetricCollection = field(init=False)
    coverage: CatalogCoverage = field(init=False)
    extras: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.metrics = MetricCollection.default(metric_ks(self.k))
        self.coverage = CatalogCoverage(self.k, self.catalog_size)

    @property
    def count(self) -> int:
        return self.metrics.count

    def add(self, sums: dict) -> None:
        for metric, total in zip(self.metrics.metrics, sums["totals"]):
            metric.total += float(total)
            metric.count += int(sums["count"])
        items = np.asarray(sums["items"], dtype=np.int64)
        self.coverage.update(items[:, None])  # one column: every item counts
        for key, value in sums["extras"].items():
            self.extras[key] = self.extras.get(key, 0.0) + float(value)

    def result(self) -> dict:
        n = self.count
        return {"count": n, **self.metrics.compute(), self.coverage.key: self.coverage.compute(),
                **{key: value / max(n, 1) for key, value in self.extras.items()}}


# ---------------------------------------------------------------- the loop

def row_group_slices(path, limit: int | None = None, min_items: int = 1,
                     min_rows: int = 256) -> list[dict]:
    """Work items for Ray Data: row groups of a table (a file or parts), in file order, each with
    the first row and how many rows to read (``limit`` counts from the first row), from the footers.

    A row group is cut into equal slices when that is needed to make at least ``min_items`` items
    (never below ``min_rows`` rows each): a one-file table (Beauty: one row group) still becomes
    many work items, so their order can be shuffled every epoch; a large table's many row groups
    are left whole, so nothing is decoded twice.

    Actors read their row groups themselves instead of through ``ray.data.read_parquet``, whose
    file-listing task asks for a whole CPU: on 2 cores that CPU is never free beside training
    workers or evaluation actors, and the pipeline would wait forever."""
    from tiger_ray.data.schema import open_dataset

    groups, left = [], limit
    for fragment in open_dataset(path).get_fragments():
        meta = fragment.metadata
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows if left is None else min(left, meta.row_group(g).num_rows)
            if rows > 0:
                groups.append((fragment.path, g, rows))
            if left is not None:
                left -= rows
    total = sum(rows for _, _, rows in groups)
    slice_rows = max(min_rows, -(-total // max(min_items, 1)))
    slices = []
    for path_, g, rows in groups:
        pieces = max(1, -(-rows // slice_rows)) if len(groups) < min_items else 1
        size = -(-rows // pieces)
        for start in range(0, rows, size):
            slices.append({"path": path_, "row_group": g, "offset": start, "rows": min(size, rows - start)})
    return slices


def read_slices(slices: dict[str, np.ndarray], columns: list[str], batch_rows: int):
    """The record batches of ``row_group_slices`` items (a Ray Data batch of them)."""
    import pyarrow.parquet as pq

    offsets = slices.get("offset", np.zeros(len(slices["rows"]), dtype=np.int64))
    for path, group, first, rows in zip(slices["path"], slices["row_group"], offsets, slices["rows"]):
        part = pq.ParquetFile(str(path))  # one Parquet file (a part), not the table
        skip, left = int(first), int(rows)
        for batch in part.iter_batches(batch_size=batch_rows, row_groups=[int(group)], columns=columns):
            if left <= 0:
                break
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            batch = batch.slice(skip, left)
            skip, left = 0, left - batch.num_rows
            yield batch


class EvaluationActor:
    """Ray Data ``map_batches`` class: loads the retriever once (``factory()``), then turns the
    users of each row group slice into one-row tables of partial sums, one per batch of
    ``batch_size`` users (their predictions go to a part file)."""

    def __init__(self, factory: Callable[[], Retriever], split: Split, k: int,
                 max_history: int | None, out_dir: str | None, batch_size: int):
        self.retriever = factory()
        self.split, self.k, self.max_history, self.batch_size = split, k, max_history, batch_size
        self.out_dir = None if out_dir is None else Path(out_dir)

    def __call__(self, slices: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for users in read_slices(slices, ["user_id", "item_ids"], self.batch_size):
            sums = evaluate_batch(self.retriever, users, self.split, k=self.k,
                                  max_history=self.max_history, out_dir=self.out_dir)
            yield pa.table({"count": [sums["count"]], "totals": [sums["totals"]],
                            "extras": [json.dumps(sums["extras"])],
                            "items": pa.array([sums["items"]], pa.list_(pa.int64()))})


EVAL_CPUS = 0.5  # logical CPUs per evaluation actor: two fit beside the driver on 2 cores


def _ray_sums(factory, path: Path, split: Split, *, k: int, batch_size: int,
              max_history: int | None, limit: int | None, workers: int,
              out_dir: Path | None) -> Iterator[dict]:
    import ray.data

    slices = row_group_slices(path, limit)
    if not slices:
        return
    sums = ray.data.from_items(slices, override_num_blocks=len(slices)).map_batches(
        EvaluationActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=EVAL_CPUS,
        fn_constructor_kwargs={"factory": factory, "split": split, "k": k,
                               "max_history": max_history, "batch_size": batch_size,
                               "out_dir": None if out_dir is None else str(out_dir)})
    for table in sums.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in table.to_pylist():
            yield {**row, "extras": json.loads(row["extras"])}


def _local_sums(retriever: Retriever, path: Path, split: Split, *, k: int, batch_size: int,
                max_history: int | None, limit: int | None, out_dir: Path | None) -> Iterator[dict]:
    from tiger_ray.data.schema import iter_batches

    left = limit
    for users in iter_batches(path, ["user_id", "item_ids"], batch_size):
        if left is not None:
            if left <= 0:
                return
            users = users.slice(0, left)
            left -= users.num_rows
        yield evaluate_batch(retriever, users, split, k=k, max_history=max_history, out_dir=out_dir)


def catalog_size(run: RunDir) -> int:
    """N, the largest item id: stats.json's ``items``, else the row count of items.parquet."""
    from tiger_ray.data.schema import count_rows

    stats = atomic.read_json(run.stats) if run.stats.exists() else {}
    if isinstance(stats, dict) and stats.get("items"):
        return int(stats["items"])
    return count_rows(run.require(run.items, "tiger prepare"))


def evaluate_retriever(retriever: Retriever | Callable[[], Retriever], run: RunDir, split: Split,
                       *, k: int = 10, batch_size: int = 256, max_history: int | None = None,
                       limit: int | None = None, progress: bool = True, write: bool = True,
                       workers: int = 0) -> dict:
    """Full-ranking leave-one-out evaluation on ``split`` ('valid' or 'test').

    ``workers=0``: in this process, with ``retriever`` a Retriever (or a factory, called once).
    ``workers>=1``: Ray Data batch inference on that many actors; ``retriever`` must then be a
    picklable zero-argument factory with a ``name`` (``retrievers.RetrieverFactory``)."""
    from tqdm.auto import tqdm

    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    path = run.require(run.sequences, "tiger prepare")
    if workers == 0 and not hasattr(retriever, "recommend"):
        retriever = retriever()
    name = retriever.name
    totals = EvaluationSums(k, catalog_size(run))
    out = run.eval_dir(name, split)
    start = time.perf_counter()
    bar = tqdm(desc=f"evaluate {name} {split}", unit="user", disable=not progress)
    with _predictions_dir(out / "predictions.parquet", write) as out_dir:
        kwargs = dict(k=k, batch_size=batch_size, max_history=max_history, limit=limit,
                      out_dir=out_dir)
        if workers:
            from tiger_ray.ray_env import ray_session

            with ray_session():
                for sums in _ray_sums(retriever, path, split, workers=workers, **kwargs):
                    totals.add(sums)
                    bar.update(sums["count"])
        else:
            for sums in _local_sums(retriever, path, split, **kwargs):
                totals.add(sums)
                bar.update(sums["count"])
    bar.close()
    seconds = time.perf_counter() - start
    n = totals.count
    result = {"model": name, "split": split, **totals.result(), "seconds": seconds,
              "queries_per_second": n / seconds if seconds > 0 else None}
    if write:
        atomic.write_json(out / "metrics.json", result)
    return result


@contextmanager
def _predictions_dir(path: Path, write: bool) -> Iterator[Path | None]:
    """The parts go into a temporary directory that replaces predictions.parquet (a file or a
    directory from an earlier run) only when every batch succeeded."""
    if not write:
        yield None
        return
    with atomic.atomic_path(path, is_dir=True) as tmp:
        yield tmp
        if path.is_file():
            path.unlink()  # an earlier single-file predictions.parquet
