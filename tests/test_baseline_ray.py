"""Ray Train fit of the dual encoder on 2 workers, resume, then evaluation in the shared schema."""

from __future__ import annotations

from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from tiger_ray.baseline.config import PRESETS, BaselineConfig
from tiger_ray.testing.synthetic import make_synthetic_embeddings, make_synthetic_run


@pytest.mark.ray
def test_two_worker_fit_resume_and_evaluate(tmp_path, ray_local):
    from tiger_ray.baseline.ray_train import run_train_baseline
    from tiger_ray.baseline.retriever import load_retriever
    from tiger_ray.evaluation.retrieval import PREDICTIONS_SCHEMA, evaluate_retriever

    run = make_synthetic_run(tmp_path / "run")
    make_synthetic_embeddings(run)
    config = BaselineConfig(**{**PRESETS["tiny"], "workers": 2, "epochs": 2, "lr": 3e-3})
    summary = run_train_baseline(run, config)
    assert summary["epochs_run"] == 2 and len(summary["history"]) == 2
    assert summary["loss"] == "full" and summary["index"]["ann_recall@10"] == 1.0
    assert (run.baseline / "model.pt").exists() and (run.baseline / "index-flat" / "index.faiss").exists()
    assert list((run.baseline / "ray" / "dual_encoder").glob("checkpoint_*"))

    result = evaluate_retriever(load_retriever(run), run, "test", progress=False)
    table = pq.read_table(run.eval_dir("ann", "test") / "predictions.parquet")
    assert table.schema.equals(PREDICTIONS_SCHEMA) and table.num_rows == result["count"]
    assert result["recall@10"] > 0.4

    # Resuming with more epochs continues from the checkpoint instead of starting over.
    more = run_train_baseline(run, replace(config, epochs=3))
    assert more["epochs_run"] == 3
    assert more["history"][:2] == summary["history"]
    # Changed model settings do not silently resume an incompatible checkpoint.
    with pytest.raises(ValueError, match="--fresh"):
        run_train_baseline(run, replace(config, dim=32))
