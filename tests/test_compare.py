"""`tiger compare`: quality from saved metrics, latency measured through the loaders, index sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiger_ray import atomic
from tiger_ray.baseline import ray_train
from tiger_ray.baseline.ann_index import IndexConfig
from tiger_ray.baseline.config import PRESETS, BaselineConfig
from tiger_ray.baseline.retriever import build_run_index, load_retriever
from tiger_ray.evaluation.compare import CompareConfig, run_compare, tiger_index_bytes
from tiger_ray.evaluation.retrieval import evaluate_retriever
from tiger_ray.testing.synthetic import make_synthetic_embeddings, make_synthetic_run

SMALL = dict(single_queries=5, batched_queries=40, batch_size=16, warmup=1)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The 2 CPUs are shared: an intra-op thread team spin-waiting on a busy machine made a tiny
    training run 50x slower (40 s instead of 0.8 s) than one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ann_run(tmp_path_factory):
    run = make_synthetic_run(tmp_path_factory.mktemp("compare") / "run")
    make_synthetic_embeddings(run)
    ray_train.train_local(run, BaselineConfig(**{**PRESETS["tiny"], "epochs": 1}))
    build_run_index(run, IndexConfig("flat"))
    atomic.write_json(run.baseline / "summary.json", {"train_seconds": 12.5})
    evaluate_retriever(load_retriever(run), run, "test", progress=False)
    return run


def test_compare_without_tiger_reports_why(ann_run):
    result = run_compare(ann_run, CompareConfig(**SMALL))
    tiger, ann, hybrid = result["models"]
    # TIGER is not trained in this run: clear notes instead of a crash (for the hybrid too)
    assert "train-seq2seq" in tiger["unavailable"] or "seq2seq" in tiger["unavailable"]
    assert "train-seq2seq" in hybrid["unavailable"] and "latency" not in hybrid
    assert "tiger evaluate" in tiger["quality"]["test"]["missing"]
    assert "latency" not in tiger
    # the dual encoder: metrics from metrics.json, latency measured now, index from the FAISS file
    saved = atomic.read_json(ann_run.eval_dir("ann", "test") / "metrics.json")
    assert ann["quality"]["test"]["recall@10"] == saved["recall@10"]
    assert "missing" in ann["quality"]["valid"]
    lat = ann["latency"]
    assert lat["single_queries"] == 5 and lat["batched_queries"] == 40
    assert 0 < lat["single_p50_ms"] <= lat["single_p95_ms"]
    meta = atomic.read_json(ann_run.baseline / "index-flat" / "index.json")
    assert ann["index"]["bytes_per_item"] == pytest.approx(meta["bytes"] / 64)
    assert ann["training"]["seconds"] == 12.5
    md = (ann_run.compare / "comparison.md").read_text()
    assert "| Dual encoder + FAISS | " in md and "latency not measured" in md
    assert atomic.read_json(ann_run.compare / "comparison.json")["models"][1]["model"] == "ann"
    assert (ann_run.compare / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_tiger_index_bytes_counts_table_and_trie(tmp_path):
    pytest.importorskip("tiger_ray.seq2seq.trie")
    from tiger_ray.semantic_ids.table import write_semantic_ids
    from tiger_ray.seq2seq.trie import SemanticIdTrie
    from tiger_ray.semantic_ids.table import read_semantic_ids

    run = make_synthetic_run(tmp_path / "run", n_items=6)
    codes = np.array([[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 2, 0], [1, 0, 0, 0], [1, 2, 2, 0], [2, 2, 2, 0]])
    write_semantic_ids(run, np.arange(1, 7), codes)
    sizes = tiger_index_bytes(run)
    assert sizes["semantic_id_table_bytes"] == (6 + 1) * 4  # [N+1, 4] uint8 codes, row = item id
    assert sizes["trie_bytes"] == SemanticIdTrie.from_semantic_ids(read_semantic_ids(run)).nbytes() > 0
    assert sizes["bytes_per_item"] == pytest.approx(sizes["bytes"] / 6)


def test_tiger_training_time_adds_rqvae_and_seq2seq_from_their_reports(tmp_path):
    from tiger_ray.evaluation.compare import training_time
    from tiger_ray.runs import RunDir

    run = RunDir(tmp_path / "run")
    assert training_time(run, "tiger")["seconds"] is None  # nothing trained yet
    # The layouts `tiger train-rqvae` and `tiger train-seq2seq` write.
    atomic.write_json(run.semantic_ids / "report.json", {"training": {"train_seconds": 120.0}})
    atomic.write_json(run.seq2seq / "summary.json", {"train_seconds": 3000.0})
    assert training_time(run, "tiger") == {"rqvae_seconds": 120.0, "seq2seq_seconds": 3000.0,
                                           "seconds": 3120.0}
