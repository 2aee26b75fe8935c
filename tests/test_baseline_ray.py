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


@pytest.mark.ray
def test_streamed_training_with_sampled_softmax_and_a_sharded_ivfpq(tmp_path, ray_local):
    """data=stream: windows from Ray Data via get_dataset_shard, text from vectors.npy, item
    frequencies counted by Ray Data; the item table by batch inference; IVF-PQ merged on disk."""
    import numpy as np
    import torch

    from tiger_ray.baseline.ann_index import IndexConfig
    from tiger_ray.baseline.ray_train import run_train_baseline
    from tiger_ray.baseline.retriever import load_retriever
    from tiger_ray.data.schema import read_sequences
    from tiger_ray.data.split import build_examples
    from tiger_ray.evaluation.retrieval import evaluate_retriever

    run = make_synthetic_run(tmp_path / "run")
    make_synthetic_embeddings(run)
    config = replace(CONFIG, data="stream", loss="auto", large_catalog=10, epochs=3)
    index = IndexConfig("ivfpq", ivf_shards=2, ivf_nlist=4, ivf_nprobe=4, pq_m=4, pq_nbits=4)
    summary = run_train_baseline(run, config, index)
    assert summary["data"] == "stream" and summary["loss"] == "in_batch + log-Q"
    counts = np.load(run.baseline / "item_counts.npy")
    train = build_examples(read_sequences(run.sequences), "train")
    assert np.array_equal(counts, np.bincount(train.targets, minlength=65))
    assert summary["train_examples"] == len(train.targets)
    assert (run.embeddings / "vectors.npy").exists() and (run.baseline / "item_table.npy").exists()
    payload = torch.load(run.baseline / "model.pt", weights_only=True)
    assert "item_table" not in payload  # the table is the memory-mapped file
    assert summary["index"]["ondisk"] and summary["index"]["shards"] == 2
    assert 0.0 < summary["index"]["ann_recall@10"] <= 1.0

    retriever = load_retriever(run)  # the configured ivfpq index, memory-mapped
    assert retriever.index.directory is not None and isinstance(retriever.table, torch.Tensor)
    result = evaluate_retriever(retriever, run, "test", progress=False, write=False)
    assert result["recall@10"] > 0.25  # chance is ~0.16 on 64 items
    refined = load_retriever(run, ivf_refine=4)  # PQ candidates re-ranked by the mmap item table
    assert refined.index.refine_vectors is not None and refined.index.config.ivf_refine == 4
    ids, scores = refined.index.search(refined.encode([np.array([1, 5, 9])]), 5)
    vectors = retriever.table.numpy()[ids[0]]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(scores[0], vectors @ refined.encode([np.array([1, 5, 9])])[0], rtol=1e-4)
