"""Evaluation as Ray Data batch inference: the same predictions and metrics as the in-process
loop, predictions as Parquet parts, sequences given as parts."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from tiger_ray.evaluation.evaluate import evaluate
from tiger_ray.evaluation.retrieval import PREDICTIONS_SCHEMA, metrics_from_predictions

from seq2seq_helpers import train_tiny_tiger, write_topic_semantic_ids


@pytest.fixture(scope="module")
def trained_parts_run(tmp_path_factory):
    """A tiny trained TIGER whose sequences.parquet is a directory of parts (several row groups)."""
    from tiger_ray.testing.synthetic import make_synthetic_run

    run = make_synthetic_run(tmp_path_factory.mktemp("evaluate_ray") / "run")
    write_topic_semantic_ids(run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_tiny_tiger(run, steps=30)
    torch.set_num_threads(threads)
    table = pq.read_table(run.sequences)
    run.sequences.unlink()
    run.sequences.mkdir()
    for i, lo in enumerate(range(0, table.num_rows, 50)):
        pq.write_table(table.slice(lo, 50), run.sequences / f"part-{i:05d}.parquet", row_group_size=20)
    return run


def read_predictions(path):
    table = pads.dataset(str(path), format="parquet").to_table()
    return table.sort_by("user_id")


@pytest.mark.ray
def test_ray_data_evaluation_equals_the_in_process_loop(ray_local, trained_parts_run):
    run = trained_parts_run
    local = evaluate(run, "tiger", "test", beam_size=10, batch_size=32, progress=False)
    local_predictions = read_predictions(run.eval_dir("tiger", "test") / "predictions.parquet")
    ray_result = evaluate(run, "tiger", "test", beam_size=10, batch_size=32, progress=False, workers=2)
    out = run.eval_dir("tiger", "test") / "predictions.parquet"
    parts = sorted(p.name for p in out.iterdir())
    # A batch is at most 32 users of one row group: parts of 50 users in row groups of 20.
    assert parts == [f"part-{u:012d}.parquet" for u in (1, 21, 41, 51, 71, 91)]
    predictions = read_predictions(out)
    assert predictions.schema.equals(PREDICTIONS_SCHEMA)
    assert predictions.num_rows == ray_result["count"] == 96
    assert predictions.column("user_id").to_pylist() == local_predictions.column("user_id").to_pylist()
    assert predictions.column("item_ids").to_pylist() == local_predictions.column("item_ids").to_pylist()
    for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "coverage@10", "entropy@10",
                "invalid_id_rate", "count"):
        assert ray_result[key] == pytest.approx(local[key]), key
    # The metrics are recomputable from the parts, read batch by batch.
    recomputed = metrics_from_predictions(out)
    for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
        assert recomputed[key] == pytest.approx(ray_result[key])


@pytest.mark.ray
def test_ray_data_evaluation_limit(ray_local, trained_parts_run):
    result = evaluate(trained_parts_run, "tiger", "valid", beam_size=10, batch_size=16, limit=40,
                      progress=False, workers=1)
    table = read_predictions(trained_parts_run.eval_dir("tiger", "valid") / "predictions.parquet")
    assert result["count"] == table.num_rows == 40
    assert np.array_equal(table.column("user_id").to_numpy(), np.arange(1, 41))
