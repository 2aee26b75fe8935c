"""The pipeline's evaluation step: one model, validation then test, through `tiger evaluate`'s code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tiger_ray.runs import RunDir


@dataclass
class EvaluateConfig:
    model: Literal["tiger", "ann"] = field(default="tiger", metadata={"help": "model to evaluate"})
    splits: tuple[str, ...] = field(default=("valid", "test"), metadata={"help": "splits, in order"})
    k: int = field(default=10, metadata={"help": "ranked list length"})
    batch_size: int = field(default=1024, metadata={"help": "users per evaluation batch"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N users"})
    workers: int = field(default=0, metadata={
        "help": "Ray Data actors decoding batches of users, each loading the model once (0 = in "
                "this process; both stream the users)"})


# Evaluation is the same at every scale: the full split, the paper's metrics.
PRESETS: dict[str, dict] = {"tiny": {}, "cpu": {}, "paper": {}}


def run_evaluate(run: RunDir, config: EvaluateConfig) -> dict:
    """Evaluate ``config.model`` on each split; returns {split: metrics}."""
    from tiger_ray.evaluation.cli import evaluate

    return {split: evaluate(run, config.model, split, k=config.k, batch_size=config.batch_size,
                            limit=config.limit, workers=config.workers)
            for split in config.splits}
