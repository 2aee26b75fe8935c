"""`tiger train-seq2seq` end to end on Ray Train with 2 DDP workers: outputs, resume, evaluation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tiger_ray.data.schema import read_sequences
from tiger_ray.evaluation.retrieval import PREDICTIONS_SCHEMA, evaluate_retriever
from tiger_ray.seq2seq.cold_items import load_cold_items
from tiger_ray.seq2seq.cold_start import select_cold_items
from tiger_ray.seq2seq.history import read_history
from tiger_ray.seq2seq.presets import PRESETS, Seq2SeqTrainConfig
from tiger_ray.seq2seq.ray_train import run_train_seq2seq
from tiger_ray.seq2seq.retriever import load_retriever
from test_seq2seq_train import write_topic_semantic_ids

pytestmark = pytest.mark.ray


def test_two_workers_write_best_history_curve_and_resume(ray_local, synthetic_run):
    run = synthetic_run
    write_topic_semantic_ids(run)
    config = dataclasses.replace(Seq2SeqTrainConfig(**PRESETS["tiny"]), workers=2,
                                 cpus_per_worker=0.5, max_steps=20, eval_every=10, log_every=5,
                                 cold_start_fraction=0.1)
    summary = run_train_seq2seq(run, config)
    out = run.seq2seq
    # Cold start (paper Sec. 4.3): the held-out items are saved beside the model.
    cold = select_cold_items(read_sequences(run.sequences), fraction=0.1, seed=config.seed)
    np.testing.assert_array_equal(load_cold_items(out / "best"), cold)
    assert summary["steps"] == 20 and summary["stop_reason"] == "max_steps"
    assert (out / "best" / "config.json").exists() and (out / "best" / "model.pt").exists()
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = read_history(out / "history.jsonl")
    assert [r["step"] for r in history if r["event"] == "eval"] == [10, 20]
    assert [r["step"] for r in history if r["event"] == "train"] == [5, 10, 15, 20]
    saved = json.loads((out / "best" / "config.json").read_text())
    assert saved["extra"]["best_step"] == summary["best_step"]

    # Same run directory, higher limit: resumes from step 20 instead of starting over.
    more = run_train_seq2seq(run, dataclasses.replace(config, max_steps=30))
    assert more["steps"] == 30
    history = read_history(out / "history.jsonl")
    assert [r["step"] for r in history if r["event"] == "eval"] == [10, 20, 30]

    # The saved best model plugs into the shared evaluation loop.
    retriever = load_retriever(run, beam_size=10)
    result = evaluate_retriever(retriever, run, "valid", k=10, progress=False)
    table = pq.read_table(run.eval_dir(retriever.name, "valid") / "predictions.parquet")
    assert table.schema.equals(PREDICTIONS_SCHEMA)
    assert table.num_rows == result["count"] == 96
    assert all(len(row) == 10 for row in table.column("item_ids").to_pylist())
    assert result["invalid_id_rate"] == 0.0


def test_all_positions_mode_end_to_end_from_the_cli(ray_local, synthetic_run):
    """`tiger train-seq2seq --training-mode all_positions`: Ray Data builds windows, two DDP
    workers train the item-causal model on them, and the saved model decodes from histories."""
    from tiger_ray.cli import main

    run = synthetic_run
    write_topic_semantic_ids(run)
    args = ["train-seq2seq", "--run", str(run.root), "--preset", "tiny", "--training-mode",
            "all_positions", "--workers", "2", "--max-steps", "20", "--eval-every", "10",
            "--log-every", "5", "--cold-start-fraction", "0.1"]
    assert main(args) == 0
    out = run.seq2seq
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["stop_reason"] == "max_steps"
    # 20 steps of 32 examples (give or take a window) were (history, target) examples, not windows
    assert 0.8 * 20 * 32 < summary["examples_seen"] < 1.3 * 20 * 32
    saved = json.loads((out / "best" / "config.json").read_text())
    assert saved["model"]["encoder_attention"] == "item_causal"
    assert saved["extra"]["train_config"]["training_mode"] == "all_positions"
    retriever = load_retriever(run, beam_size=10)
    assert retriever.model.config.encoder_attention == "item_causal"
    result = evaluate_retriever(retriever, run, "valid", k=10, progress=False)
    assert result["count"] == 96 and result["invalid_id_rate"] == 0.0
    # The checkpoint holds the item-causal model: resuming it per example is refused.
    config = dataclasses.replace(Seq2SeqTrainConfig(**PRESETS["tiny"]), workers=2, max_steps=30,
                                 cold_start_fraction=0.1)
    with pytest.raises(ValueError, match="encoder_attention"):
        run_train_seq2seq(run, config)
