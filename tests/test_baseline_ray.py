"""Ray Train fit of the dual encoder on 2 workers, evaluation in the shared schema, resume.

Most of each fit is Ray Train starting its controller and worker group (tens of seconds on a
shared 2-core machine); the tiny model itself trains in about a second.
"""

from __future__ import annotations

from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from tiger_ray.baseline.config import PRESETS, BaselineConfig
from tiger_ray.testing.synthetic import make_synthetic_embeddings, make_synthetic_run

CONFIG = BaselineConfig(**{**PRESETS["tiny"], "workers": 2, "epochs": 2, "lr": 3e-3})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, ray_local):
    from tiger_ray.baseline.ray_train import run_train_baseline

    run = make_synthetic_run(tmp_path_factory.mktemp("ray_baseline") / "run")
    make_synthetic_embeddings(run)
    return run, run_train_baseline(run, CONFIG)


@pytest.mark.ray
def test_two_worker_fit_then_evaluate(fitted):
    from tiger_ray.baseline.retriever import load_retriever
    from tiger_ray.evaluation.retrieval import PREDICTIONS_SCHEMA, evaluate_retriever

    run, summary = fitted
    assert summary["epochs_run"] == 2 and len(summary["history"]) == 2 and summary["workers"] == 2
    assert summary["loss"] == "full" and summary["index"]["ann_recall@10"] == 1.0
    assert (run.baseline / "model.pt").exists() and (run.baseline / "index-flat" / "index.faiss").exists()
    assert list((run.baseline / "ray" / "dual_encoder").glob("checkpoint_*"))

    result = evaluate_retriever(load_retriever(run), run, "test", progress=False)
    table = pq.read_table(run.eval_dir("ann", "test") / "predictions.parquet")
    assert table.schema.equals(PREDICTIONS_SCHEMA) and table.num_rows == result["count"]
    assert result["recall@10"] > 0.4  # chance is ~0.16 on 64 items


@pytest.mark.ray
@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(fitted):
    from tiger_ray.baseline.ray_train import run_train_baseline

    run, summary = fitted
    # Changed model settings do not silently resume an incompatible checkpoint (checked before Ray).
    with pytest.raises(ValueError, match="--fresh"):
        run_train_baseline(run, replace(CONFIG, dim=32))
    more = run_train_baseline(run, replace(CONFIG, epochs=3, workers=1))
    assert more["epochs_run"] == 3
    assert more["history"][:2] == summary["history"]
