"""The TIGER + dual-encoder hybrid (tiger_ray/hybrid): candidate union, exact scores of both
models, the weight's two ends reproducing each model, and `tiger tune-hybrid` choosing on valid."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tiger_ray.hybrid.retriever import log_softmax_rows, mix, top_k, union_candidates

from serving_helpers import serving_run as shared_run  # noqa: F401 - both models trained


@pytest.fixture(scope="module")
def serving_run(shared_run, tmp_path_factory):
    """A copy of the shared tiny run: tune-hybrid writes RUN/hybrid/, which other tests' runs
    must not see."""
    import shutil

    from tiger_ray.runs import RunDir

    root = tmp_path_factory.mktemp("hybrid") / "run"
    shutil.copytree(shared_run.root, root)
    return RunDir(root)


def test_union_keeps_first_order_then_new_items_and_pads():
    first = np.array([[5, 3, -1], [1, 2, 3]])
    second = np.array([[3, 7], [3, 2]])
    assert union_candidates(first, second).tolist() == [[5, 3, 7, -1, -1], [1, 2, 3, -1, -1]]


def test_mix_is_a_product_of_log_softmaxes_over_the_candidates():
    tiger = np.array([[0.0, -1.0, -np.inf]])
    dense = np.array([[2.0, 5.0, 1.0]])
    np.testing.assert_allclose(np.exp(log_softmax_rows(tiger))[0, :2].sum(), 1.0, rtol=1e-6)
    only_tiger, only_dense = mix(tiger, dense, 1.0), mix(tiger, dense, 0.0)
    assert np.argmax(only_tiger) == 0 and np.argmax(only_dense) == 1
    assert np.isneginf(only_dense[0, 2])  # a candidate one model cannot score is never ranked
    with pytest.raises(ValueError, match="tiger_weight"):
        mix(tiger, dense, 1.5)
    items, scores = top_k(np.array([[4, 9, 6]]), only_dense, 4)
    assert items.tolist() == [[9, 4, -1, -1]] and np.isneginf(scores[0, 2:]).all()


@pytest.fixture(scope="module")
def histories(serving_run):
    from tiger_ray.data.schema import read_sequences
    from tiger_ray.data.split import build_examples

    examples = build_examples(read_sequences(serving_run.sequences), "valid")
    n = 24
    return [examples.history(i) for i in range(n)], examples.user_ids[:n]


def test_scores_of_candidates_match_each_model(serving_run, histories):
    from tiger_ray.baseline.retriever import load_retriever as load_dense
    from tiger_ray.seq2seq.retriever import load_retriever as load_tiger

    hist, users = histories
    tiger = load_tiger(serving_run, beam_size=10)
    items, _, beam_scores = tiger.decode(hist, users, 10)
    # Teacher-forced log-probabilities of the beam's items are the beam's own scores.
    np.testing.assert_allclose(tiger.score_items(hist, users, items), beam_scores, rtol=1e-4, atol=1e-4)
    dense = load_dense(serving_run)
    recs = dense.recommend(hist, users, 10)
    np.testing.assert_allclose(dense.score_items(hist, users, recs.item_ids), recs.scores, rtol=1e-4, atol=1e-4)
    padded = np.concatenate([recs.item_ids[:, :2], np.full((len(users), 1), -1)], axis=1)
    assert np.isneginf(dense.score_items(hist, users, padded)[:, 2]).all()
    assert np.isneginf(tiger.score_items(hist, users, padded)[:, 2]).all()


def test_weight_ends_reproduce_each_model_and_lists_are_real_items(serving_run, histories):
    from tiger_ray.retrievers import load_retriever

    hist, users = histories
    tiger = load_retriever(serving_run, "tiger", beam_size=20).recommend(hist, users, 10)
    dense = load_retriever(serving_run, "ann").recommend(hist, users, 10)
    as_tiger = load_retriever(serving_run, "hybrid", tiger_weight=1.0).recommend(hist, users, 10)
    as_dense = load_retriever(serving_run, "hybrid", tiger_weight=0.0).recommend(hist, users, 10)
    assert as_tiger.item_ids.tolist() == tiger.item_ids.tolist()
    assert as_dense.item_ids.tolist() == dense.item_ids.tolist()
    mixed = load_retriever(serving_run, "hybrid", tiger_weight=0.5).recommend(hist, users, 10).item_ids
    assert all(len(set(row)) == 10 and all(1 <= i <= 64 for i in row) for row in mixed.tolist())


def test_tune_hybrid_writes_the_best_valid_weight_and_evaluate_uses_it(serving_run, capsys):
    from tiger_ray.cli import main
    from tiger_ray.hybrid.retriever import load_retriever, tuning_path

    assert main(["tune-hybrid", "--run", str(serving_run.root), "--weights", "0", "0.5", "1",
                 "--limit", "40", "--tiger-candidates", "10", "--dense-candidates", "10"]) == 0
    out = capsys.readouterr().out
    tuning = json.loads(tuning_path(serving_run).read_text())
    grid = {row["tiger_weight"]: row for row in tuning["grid"]}
    assert sorted(grid) == [0.0, 0.5, 1.0] and tuning["users"] == 40
    best = max(grid.values(), key=lambda row: row["ndcg@10"])["ndcg@10"]
    assert grid[tuning["tiger_weight"]]["ndcg@10"] == best and tuning["selected_by"] == "valid ndcg@10"
    assert tuning_path(serving_run).with_suffix(".png").stat().st_size > 1000
    assert "<- chosen" in out
    assert load_retriever(serving_run).tiger_weight == tuning["tiger_weight"]
    assert main(["evaluate", "--run", str(serving_run.root), "--model", "hybrid", "--split", "test",
                 "--limit", "30"]) == 0
    metrics = json.loads((serving_run.eval_dir("hybrid", "test") / "metrics.json").read_text())
    assert metrics["model"] == "hybrid" and metrics["count"] == 30


def test_bad_weights_and_options_are_named(serving_run, capsys):
    from tiger_ray.cli import main

    assert main(["tune-hybrid", "--run", str(serving_run.root), "--weights", "0", "2"]) == 2
    assert "--weights" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(serving_run.root), "--model", "ann", "--tiger-weight", "0.3"]) == 2
    assert "--tiger-weight does not apply to --model ann" in capsys.readouterr().err


def test_served_hybrid_needs_tuning_and_answers_batches_like_single_queries(serving_run):
    from tiger_ray.runs import RunDir
    from tiger_ray.serving.app import check_run
    from tiger_ray.serving.models import Query, load_served_model
    from tiger_ray.serving.settings import ServeConfig

    config = ServeConfig(models=("hybrid",))
    untuned = RunDir(serving_run.root.parent / "untuned")
    if not untuned.root.exists():
        import shutil

        shutil.copytree(serving_run.root, untuned.root, ignore=shutil.ignore_patterns("hybrid"))
    with pytest.raises(FileNotFoundError, match="tiger tune-hybrid"):
        check_run(untuned, config, {})
    served = load_served_model(serving_run, "hybrid", config.model_options("hybrid"))
    assert served.window == 20 and served.version != "unknown"  # the longer of the two windows
    rng = np.random.default_rng(3)
    queries = [Query(rng.integers(1, 65, size=n), user_id=u, k=k) for n, u, k in [(3, 1, 10), (25, 2, 5), (1, 0, 7)]]
    batch = served.answer(queries)
    for query, answer in zip(queries, batch):
        alone = served.answer([query])[0]
        assert answer.error is None and answer.item_ids == alone.item_ids and len(answer.item_ids) == query.k
        np.testing.assert_allclose(answer.scores, alone.scores, rtol=1e-5, atol=1e-5)
