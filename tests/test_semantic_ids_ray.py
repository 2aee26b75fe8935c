"""`tiger train-rqvae` on Ray: Ray Train with 2 DDP workers, resume, Ray Data assignment, report."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from tiger_ray.semantic_ids.rqvae import PRESETS, RQVAEConfig, load_model
from tiger_ray.semantic_ids.table import read_semantic_ids
from tiger_ray.testing.synthetic import make_synthetic_embeddings, make_synthetic_run

pytestmark = pytest.mark.ray


@pytest.fixture
def embedded_run(tmp_path):
    run = make_synthetic_run(tmp_path / "run", n_items=96)
    make_synthetic_embeddings(run, dim=16)
    return run


def test_two_worker_fit_writes_table_report_and_resumes(ray_local, embedded_run):
    from tiger_ray.semantic_ids.ray_train import read_metrics, run_train_rqvae, train_rqvae

    run = embedded_run
    config = RQVAEConfig(**{**PRESETS["tiny"], "epochs": 3, "workers": 2})
    summary = run_train_rqvae(run, config)
    assert summary["epochs"] == 3 and summary["resumed_from_epoch"] == 0
    table = read_semantic_ids(run, codebook_size=config.codebook_size)
    assert table.item_ids.tolist() == list(range(1, 97))
    assert len(np.unique(table.codes, axis=0)) == 96
    assert summary["unique_ids"] == 1.0
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]
    report = json.loads((run.semantic_ids / "report.json").read_text())
    assert report["items"] == 96 and len(report["usage"]) == 3
    assert report["collisions"]["largest_collision_group"] == summary["largest_collision_group"] >= 1
    for name in ("report.png", "learning_curve.png"):
        assert (run.semantic_ids / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_model(run.semantic_ids / "model.pt")
    assert model.input_dim == 16 and model.config.codebook_size == config.codebook_size

    # A re-run with more epochs resumes from the epoch-3 checkpoint (worker count may change).
    state = train_rqvae(run, replace(config, epochs=5, workers=1))
    assert state["started_at"] == 3 and state["epoch"] == 5
    history = state["history"]
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5]
    assert history[:3] == read_metrics(run)  # the first three epochs came from the checkpoint
    assert history[4]["loss"] < history[0]["loss"]

    # A checkpoint of another shape is refused on the driver, before Ray Train would retry it.
    with pytest.raises(ValueError, match="latent_dim=8.*--fresh"):
        train_rqvae(run, replace(config, latent_dim=4, epochs=6))
