"""`tiger evaluate` on a tiny trained TIGER: outputs, schema, recomputable metrics, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tiger_ray.cli import main
from tiger_ray.evaluation.cli import format_table
from tiger_ray.evaluation.evaluate import evaluate, item_categories, load
from tiger_ray.evaluation.metrics import PAPER_KEYS, CatalogCoverage, category_entropy
from tiger_ray.evaluation.retrieval import PREDICTIONS_SCHEMA, metrics_from_predictions

from seq2seq_helpers import one_thread, train_tiny_tiger, write_topic_semantic_ids  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tiger_ray.testing.synthetic import make_synthetic_run

    run = make_synthetic_run(tmp_path_factory.mktemp("evaluate") / "run")
    write_topic_semantic_ids(run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_tiny_tiger(run)
    torch.set_num_threads(threads)
    return run


def test_category_entropy_hand_computed():
    got = category_entropy(np.array([[0, 0, 1, 1], [0, 0, 0, -1], [-1, -1, -1, -1], [0, 1, 2, 3],
                                     [5, 5, 5, 7]]))
    expected = [math.log(2), 0.0, 0.0, math.log(4),
                -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_catalog_coverage_counts_distinct_recommended_items_and_merges():
    a, b = CatalogCoverage(2, catalog_size=10), CatalogCoverage(2, catalog_size=10)
    a.update(np.array([[1, 2, 9], [2, 1, 8]]))  # only the top 2 count; -1 and 0 are empty slots
    b.update(np.array([[3, -1, 7], [0, 2, 6]]))
    assert a.compute() == pytest.approx(0.2) and b.compute() == pytest.approx(0.2)
    a.merge(b)
    assert a.key == "coverage@2" and a.compute() == pytest.approx(0.3)  # {1, 2} | {3, 2}


def test_item_categories(synthetic_run):
    lookup, names = item_categories(synthetic_run)
    assert sorted(names) == ["Kayak", "Lipstick", "Shampoo", "Tent"]  # leaf of [["Synthetic", X]]
    assert lookup[0] == -1 and (lookup[1:] >= 0).all()
    assert lookup[1] == lookup[5] != lookup[2]  # items 1 and 5 share topic 0
    top, top_names = item_categories(synthetic_run, level=0)
    assert top_names == ["Synthetic"] and (top[1:] == 0).all()


def test_tiger_evaluate_writes_recomputable_outputs(trained_run, capsys):
    assert main(["evaluate", "--run", str(trained_run.root), "--split", "test", "--beam-size", "12"]) == 0
    out = trained_run.eval_dir("tiger", "test")
    metrics = json.loads((out / "metrics.json").read_text())
    table = pq.read_table(out / "predictions.parquet")
    assert table.schema.equals(PREDICTIONS_SCHEMA)
    assert table.num_rows == metrics["count"] == 96  # every synthetic user
    items = table.column("item_ids").to_pylist()
    scores = table.column("scores").to_pylist()
    assert all(len(row) == 10 and len(set(row)) == 10 and all(1 <= i <= 64 for i in row) for row in items)
    assert all(np.all(np.diff(s) <= 1e-6) for s in scores)  # ranked best first
    recomputed = metrics_from_predictions(table)
    for key in PAPER_KEYS:
        assert metrics[key] == pytest.approx(recomputed[key])
    assert metrics["invalid_id_rate"] == 0.0
    assert 0.0 <= metrics["entropy@10"] <= math.log(4) + 1e-9
    distinct = {i for row in items for i in row}
    assert metrics["coverage@10"] == pytest.approx(len(distinct) / 64)
    assert metrics["beam_size"] == 12 and metrics["dataset"] == "synthetic" and metrics["model"] == "tiger"
    # the topic walk is learnable: far above the 10/64 of a random top-10
    assert metrics["recall@10"] > 0.4
    printed = capsys.readouterr().out
    assert "ours (tiger, test)" in printed and "invalid-ID rate 0.0000" in printed


def test_all_positions_training_learns_the_topic_walk(tmp_path):
    """The item-causal model trained on all-positions windows (each history encoded once for all
    its targets) is saved with its encoder and ranks the test targets far above chance."""
    from tiger_ray.seq2seq.model import load_model
    from tiger_ray.seq2seq.retriever import model_dir
    from tiger_ray.testing.synthetic import make_synthetic_run

    run = make_synthetic_run(tmp_path / "run")
    write_topic_semantic_ids(run)
    train_tiny_tiger(run, all_positions=True)
    assert load_model(model_dir(run))[0].config.encoder_attention == "item_causal"
    result = evaluate(run, "tiger", "test", beam_size=12, progress=False)
    assert result["count"] == 96 and result["invalid_id_rate"] == 0.0
    assert result["recall@10"] > 0.4  # a random top-10 of 64 items: 0.16


def test_evaluate_limit_valid_split_and_temperature(trained_run):
    result = evaluate(trained_run, "tiger", "valid", limit=20, beam_size=10, temperature=1.5,
                      progress=False)
    assert result["count"] == 20 and result["split"] == "valid" and result["temperature"] == 1.5
    table = pq.read_table(trained_run.eval_dir("tiger", "valid") / "predictions.parquet")
    assert table.num_rows == 20
    # sampled lists are still real, distinct items
    assert all(len(set(r)) == len(r) == 10 for r in table.column("item_ids").to_pylist())


def test_both_splits_load_the_model_and_categories_once(trained_run, monkeypatch):
    from tiger_ray.evaluation import evaluate as module

    calls = {"load": 0, "item_categories": 0}
    for name in calls:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    results = module.run_evaluate(trained_run, module.EvaluateConfig(split=["valid", "test"], limit=12))
    assert calls == {"load": 1, "item_categories": 1}
    assert [results[s]["split"] for s in ("valid", "test")] == ["valid", "test"]
    assert all(results[s]["count"] == 12 for s in results)
    for split in ("valid", "test"):
        written = json.loads((trained_run.eval_dir("tiger", split) / "metrics.json").read_text())
        assert written["recall@10"] == results[split]["recall@10"]


def test_format_table_puts_paper_rows_beside_ours():
    result = {"model": "tiger", "split": "test", "count": 5, "recall@5": 0.05, "ndcg@5": 0.03,
              "recall@10": 0.07, "ndcg@10": 0.04, "invalid_id_rate": 0.0, "entropy@10": 1.2}
    text = format_table(result, "beauty")
    lines = text.splitlines()
    assert lines[1].startswith("ours (tiger, test)") and "0.0700" in lines[1]
    assert lines[2].startswith("paper TIGER") and "0.0648" in lines[2]
    assert "paper SASRec" in text and "entropy@10 1.200" in text
    assert "paper" not in format_table(result, "my-shop")


def test_evaluate_errors(synthetic_run, capsys):
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        load(synthetic_run, "nope")
    with pytest.raises(ValueError, match="--beam-size does not apply to --model ann"):
        load(synthetic_run, "ann", beam_size=5)
    # no trained model yet: a clear message naming the command that makes one
    assert main(["evaluate", "--run", str(synthetic_run.root)]) == 2
    assert "tiger train-seq2seq" in capsys.readouterr().err
