"""`tiger tune-hybrid`: choose the hybrid's TIGER weight on the validation split.

Each batch of validation users is decoded once (TIGER's beam, the dual encoder's neighbours, both
models' scores of every candidate); every weight of the grid then only re-ranks those candidates,
so a grid of 11 weights costs about one evaluation. The users are streamed in batches. The weight
with the best validation NDCG@10 is written to RUN/hybrid/tuning.json, with the whole grid, and
plotted in RUN/hybrid/tuning.png; `--model hybrid` uses it from then on. The test split is never
read here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from tiger_ray import atomic
from tiger_ray.runs import RunDir

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 11))
SELECT_BY = "ndcg@10"


@dataclass
class TuneHybridConfig:
    weights: tuple[float, ...] = field(default=DEFAULT_WEIGHTS, metadata={
        "help": "TIGER weights to try (0 = dual encoder only, 1 = TIGER only)"})
    tiger_candidates: int = field(default=20, metadata={"help": "TIGER beam: generated candidates per user"})
    dense_candidates: int = field(default=20, metadata={"help": "dual-encoder nearest items per user"})
    limit: int | None = field(default=None, metadata={"help": "tune on the first N validation users only"})
    batch_size: int = field(default=256, metadata={"help": "users decoded at once"})
    precision: str = field(default="fp32", metadata={"help": "TIGER: fp32 or bf16 matmuls"})

    def __post_init__(self):
        self.weights = tuple(float(w) for w in self.weights)


PRESETS: dict[str, dict] = {"tiny": {}, "cpu": {}, "paper": {}}


def tune_weight(run: RunDir, weights: tuple[float, ...] = DEFAULT_WEIGHTS, limit: int | None = None,
                batch_size: int = 256, progress: bool = True, **options) -> dict:
    """Validation Recall/NDCG@5/10 of the hybrid at each TIGER weight; writes and returns
    RUN/hybrid/tuning.json. ``options`` go to ``hybrid.retriever.load_retriever``."""
    from tqdm.auto import tqdm

    from tiger_ray.data.schema import iter_batches
    from tiger_ray.evaluation.metrics import MetricCollection
    from tiger_ray.evaluation.retrieval import eval_examples, user_columns
    from tiger_ray.hybrid.retriever import load_retriever, mix, top_k, tuning_path

    if not weights or any(not 0.0 <= w <= 1.0 for w in weights):
        raise ValueError(f"--weights must be numbers in [0, 1], got {list(weights)}")
    retriever = load_retriever(run, tiger_weight=0.5, **options)  # the weight is what we choose
    metrics = {w: MetricCollection.default((5, 10)) for w in weights}
    start, left = time.perf_counter(), limit
    bar = tqdm(desc="tune-hybrid valid", unit="user", disable=not progress)
    for users in iter_batches(run.require(run.sequences, "tiger prepare"), ["user_id", "item_ids"],
                              batch_size):
        if left is not None:
            if left <= 0:
                break
            users = users.slice(0, left)
            left -= users.num_rows
        user_ids, offsets, flat = user_columns(users)
        histories, targets = eval_examples(offsets, flat, "valid", retriever.max_history)
        items, tiger_logp, dense_logits = retriever.candidates(histories, user_ids)
        for w in weights:
            ranked, _ = top_k(items, mix(tiger_logp, dense_logits, w), 10)
            metrics[w].update(ranked, targets)
        bar.update(len(user_ids))
    bar.close()
    grid = [{"tiger_weight": w, **metrics[w].compute()} for w in weights]
    best = max(grid, key=lambda row: row[SELECT_BY])  # the first of equals: the lower weight
    result = {"tiger_weight": best["tiger_weight"], "selected_by": f"valid {SELECT_BY}",
              "valid": {k: v for k, v in best.items() if k != "tiger_weight"},
              "users": metrics[weights[0]].count, "limit": limit,
              "tiger_candidates": retriever.tiger_candidates,
              "dense_candidates": retriever.dense_candidates,
              "grid": grid, "seconds": time.perf_counter() - start}
    path = tuning_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, result)
    plot_grid(grid, path.with_suffix(".png"), title=f"hybrid on {run.root.name} (validation)")
    log.info("tune-hybrid: tiger_weight %.2f (valid %s %.4f) -> %s", best["tiger_weight"], SELECT_BY,
             best[SELECT_BY], path)
    return result


def run_tune_hybrid(run: RunDir, config: TuneHybridConfig) -> dict:
    """`tiger tune-hybrid` and the pipeline's step."""
    return tune_weight(run, weights=config.weights, limit=config.limit, batch_size=config.batch_size,
                       tiger_candidates=config.tiger_candidates,
                       dense_candidates=config.dense_candidates, precision=config.precision)


def plot_grid(grid: list[dict], path, title: str) -> None:
    """Validation Recall@10 and NDCG@10 against the TIGER weight."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    weights = [row["tiger_weight"] for row in grid]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for key, color in (("recall@10", "tab:red"), ("ndcg@10", "tab:blue")):
        ax.plot(weights, [row[key] for row in grid], marker="o", ms=3, color=color, label=key)
    ax.set_xlabel("TIGER weight (0 = dual encoder only, 1 = TIGER only)")
    ax.set_ylabel("validation metric")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
