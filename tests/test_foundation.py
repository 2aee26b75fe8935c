"""Shared building blocks: split, metrics, atomic writes, config flags, Ray binding."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pytest

from tiger_ray import atomic
from tiger_ray.config import add_config_args, build_config
from tiger_ray.data.schema import read_sequences
from tiger_ray.data.split import build_examples, eval_example
from tiger_ray.evaluation.metrics import MetricCollection, NDCGAtK, RecallAtK, target_ranks


def test_leave_one_out_split_matches_paper_protocol():
    seq = np.array([10, 11, 12, 13, 14])
    assert eval_example(seq, "test") == (pytest.approx(seq[:-1]), 14)
    history, target = eval_example(seq, "valid")
    assert history.tolist() == [10, 11, 12] and target == 13


def test_training_examples_are_every_prefix_of_the_train_part(synthetic_run):
    sequences = read_sequences(synthetic_run.sequences)
    train = build_examples(sequences, "train")
    first = sequences[0]
    pairs = [(train.history(i).tolist(), int(train.targets[i]))
             for i in np.flatnonzero(train.user_index == 0)]
    part = first[:-2].tolist()
    assert pairs == [(part[:t], part[t]) for t in range(1, len(part))]
    # no validation or test target leaks into training
    assert len(train) == int((sequences.lengths - 3).sum())
    valid = build_examples(sequences, "valid", max_history=3)
    assert all(len(valid.history(i)) <= 3 for i in range(len(valid)))


def test_metrics_match_hand_computation():
    ranked = np.array([[5, 3, 9, -1, -1, -1, -1, -1, -1, -1],
                       [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                       [7, 7, 7, 7, 7, 7, 7, 7, 7, 7]])
    targets = np.array([3, 7, 1])
    assert target_ranks(ranked, targets).tolist() == [2, 7, 0]
    metrics = MetricCollection.default()
    metrics.update(ranked, targets)
    out = metrics.compute()
    assert out["recall@5"] == pytest.approx(1 / 3)
    assert out["recall@10"] == pytest.approx(2 / 3)
    assert out["ndcg@5"] == pytest.approx((1 / math.log2(3)) / 3)
    assert out["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(8)) / 3)


def test_metrics_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    ranked = rng.integers(0, 20, size=(50, 10))
    targets = rng.integers(0, 20, size=50)
    whole = MetricCollection([RecallAtK(10), NDCGAtK(10)])
    whole.update(ranked, targets)
    a, b = MetricCollection([RecallAtK(10), NDCGAtK(10)]), MetricCollection([RecallAtK(10), NDCGAtK(10)])
    a.update(ranked[:20], targets[:20])
    b.update(ranked[20:], targets[20:])
    a.merge(b)
    assert a.compute() == pytest.approx(whole.compute())


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    atomic.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert atomic.read_json(target) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_path_swaps_a_file_for_a_directory_and_back(tmp_path):
    # A table goes from one Parquet file (local prepare) to a directory of parts (Ray) and back.
    target = tmp_path / "items.parquet"
    target.write_text("one file")
    with atomic.atomic_path(target, is_dir=True) as tmp:
        (tmp / "part-00000.parquet").write_text("a part")
    assert [p.name for p in target.iterdir()] == ["part-00000.parquet"]
    with atomic.atomic_path(target) as tmp:
        tmp.write_text("one file again")
    assert target.read_text() == "one file again"
    assert [p.name for p in tmp_path.iterdir()] == ["items.parquet"]


@dataclass
class _Cfg:
    epochs: int = field(default=3, metadata={"help": "passes"})
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"
    use_gpu: bool = False


def test_config_precedence_defaults_preset_flags():
    parser = argparse.ArgumentParser()
    add_config_args(parser, _Cfg)
    args = parser.parse_args(["--lr", "0.5", "--use-gpu"])
    cfg = build_config(_Cfg, args, preset={"epochs": 7, "lr": 0.1})
    assert cfg == _Cfg(epochs=7, lr=0.5, mode="a", use_gpu=True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])


@pytest.mark.ray
def test_ray_binds_to_loopback_only(ray_local):
    nodes = ray_local.nodes()
    assert nodes and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)


@pytest.mark.ray
def test_embedded_ray_workers_silence_the_train_cleaner_warnings(ray_local):
    """Without a dashboard, Ray Train's placement-group cleaner would log a State API warning
    every second of every training run; the embedded Ray's workers raise that logger to ERROR,
    and (without `tiger --verbose`) hide the TrainingReport(...) dump of every report."""
    import importlib.util
    import logging

    from tiger_ray.ray_env import _TRAIN_CLEANER_LOGGER, _TRAIN_REPORT_MODULE

    report_logger = importlib.util.find_spec(_TRAIN_REPORT_MODULE).origin

    @ray_local.remote(num_cpus=0)
    def levels() -> tuple[int, int]:
        return (logging.getLogger(_TRAIN_CLEANER_LOGGER).getEffectiveLevel(),
                logging.getLogger(report_logger).getEffectiveLevel())

    assert ray_local.get(levels.remote()) == (logging.ERROR, logging.WARNING)


def test_verbose_keeps_the_training_reports(monkeypatch):
    import importlib.util
    import logging

    from tiger_ray import ray_env

    logger = logging.getLogger(importlib.util.find_spec(ray_env._TRAIN_REPORT_MODULE).origin)
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setenv(ray_env.VERBOSE_ENV, "1")
    ray_env.quiet_train_cleaner_logs()
    assert logger.level == logging.NOTSET
    monkeypatch.delenv(ray_env.VERBOSE_ENV)
    ray_env.quiet_train_cleaner_logs()
    assert logger.level == logging.WARNING


def test_run_layout_ignores_generated_names_only(tmp_path):
    from tiger_ray.runs import RunDir

    def make(root, stamp, shard):
        for relative in (f"semantic_ids/train/rqvae/checkpoint_{stamp}/model.pt",
                         f"embeddings/{shard}", "embeddings/manifest.json", "stats.json"):
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_text("x")
        return RunDir(root)

    a = make(tmp_path / "a", "2026-12-02_07-42-03.872684", "part-0000000001-0000001024.parquet")
    b = make(tmp_path / "b", "2026-12-03_10-00-00.000001", "part-0000000005-0000002000.parquet")
    assert a.layout() == b.layout()
    assert "semantic_ids/train/rqvae/checkpoint_*/model.pt" in a.layout()
    (b.root / "stats.json").unlink()  # a missing artefact is a different layout
    assert a.layout() - b.layout() == {"stats.json"}
