"""The dual encoder as a Retriever: export, index, load, and evaluation through the shared loop."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tiger_ray.baseline import ray_train
from tiger_ray.baseline.ann_index import IndexConfig
from tiger_ray.baseline.config import PRESETS, BaselineConfig
from tiger_ray.baseline.retriever import build_run_index, load_retriever
from tiger_ray.evaluation.retrieval import (PREDICTIONS_SCHEMA, evaluate_retriever,
                                            metrics_from_predictions)
from tiger_ray.testing.synthetic import make_synthetic_embeddings, make_synthetic_run


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The 2 CPUs are shared: an intra-op thread team spin-waiting on a busy machine made a tiny
    training run 50x slower (40 s instead of 0.8 s) than one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A synthetic run with an exported dual encoder (two epochs, no Ray) and a flat index."""
    run = make_synthetic_run(tmp_path_factory.mktemp("retriever") / "run")
    make_synthetic_embeddings(run)
    config = BaselineConfig(**{**PRESETS["tiny"], "user_embedding": True, "lr": 3e-3, "epochs": 2})
    model, data, _ = ray_train.train_local(run, config)
    build_run_index(run, IndexConfig("flat"))
    return run, model, data


def test_flat_retriever_evaluates_like_exact_scoring(trained_run):
    run, model, data = trained_run
    exact = ray_train.evaluate_exact(model, data.valid_history, data.valid_users, data.valid_targets,
                                     256, torch.device("cpu")).compute()
    result = evaluate_retriever(load_retriever(run), run, "valid", batch_size=40, progress=False)
    for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
        assert result[key] == pytest.approx(exact[key], abs=1e-9)
    assert result["recall@10"] > 0.5  # learned something (chance is ~0.16)


def test_predictions_in_shared_schema(trained_run):
    run, _, _ = trained_run
    result = evaluate_retriever(load_retriever(run), run, "test", progress=False)
    table = pq.read_table(run.eval_dir("ann", "test") / "predictions.parquet")
    assert table.schema.equals(PREDICTIONS_SCHEMA)
    assert table.num_rows == result["count"] == 96
    recomputed = metrics_from_predictions(table)
    assert recomputed == pytest.approx({k: result[k] for k in recomputed})
    # every recommendation is a catalog id (1..64), ranked by descending score
    ids = np.concatenate(table.column("item_ids").to_numpy(zero_copy_only=False))
    assert ids.min() >= 1 and ids.max() <= 64
    scores = table.column("scores").to_pylist()[0]
    assert scores == sorted(scores, reverse=True)


def test_other_index_types_and_bad_input(trained_run):
    run, _, _ = trained_run
    summary = build_run_index(run, IndexConfig("hnsw", hnsw_m=8, hnsw_ef_search=64))
    assert summary["ann_recall@10"] > 0.9 and summary["bytes_per_item"] > 0
    hnsw = load_retriever(run, index_type="hnsw", hnsw_ef_search=16)
    assert hnsw.index.config.hnsw_ef_search == 16
    flat = load_retriever(run)  # the default is the configured (here: flat) index
    recs = flat.recommend([np.array([1, 5, 9])], np.array([1]), k=5)
    assert recs.item_ids.shape == (1, 5) and recs.scores.dtype == np.float32
    with pytest.raises(ValueError, match="not in the catalog"):
        flat.recommend([np.array([1, 65])], np.array([1]), k=5)
    with pytest.raises(FileNotFoundError, match="baseline-index"):
        load_retriever(run, index_type="ivfpq")


def test_index_of_an_earlier_model_is_refused(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    make_synthetic_embeddings(run)
    config = BaselineConfig(**{**PRESETS["tiny"], "epochs": 1})
    ray_train.train_local(run, config)
    build_run_index(run, IndexConfig("hnsw", hnsw_m=8))
    load_retriever(run, index_type="hnsw")
    ray_train.train_local(run, config)  # a new export; index-hnsw now belongs to the old one
    with pytest.raises(ValueError, match="built for another model"):
        load_retriever(run, index_type="hnsw")


def test_user_embedding_lookup(trained_run):
    run, model, data = trained_run
    retriever = load_retriever(run)
    rows = retriever.user_index(np.array([data.user_ids[3], 10_000_000, data.user_ids[0]]))
    assert rows.tolist() == [4, 0, 1]  # training users 1-based, unknown users 0
    # an unknown user is served (zero user vector) and differs from a known one
    known = retriever.encode([np.array([1, 2])], np.array([data.user_ids[3]]))
    unknown = retriever.encode([np.array([1, 2])], np.array([10_000_000]))
    assert not np.allclose(known, unknown)


def test_torch_threads_is_scoped():
    from tiger_ray.baseline.retriever import torch_threads

    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
