"""`tiger train-seq2seq`: train TIGER's seq2seq model on Ray Train (DDP), resumable."""

from __future__ import annotations

import argparse
import json

from tiger_ray.config import build_config, stage_parser
from tiger_ray.seq2seq.presets import PRESETS, Seq2SeqTrainConfig


def register(subparsers) -> None:
    stage_parser(
        subparsers, "train-seq2seq", config_cls=Seq2SeqTrainConfig, presets=PRESETS, func=_train,
        help="train the seq2seq generative retriever (Ray Train, DDP)",
        description="Train the encoder-decoder Transformer that maps a user's history of "
        "Semantic-ID tokens to the next item's Semantic ID. Writes RUN/seq2seq/best/ (the "
        "weights with the best validation Recall@10), history.jsonl, learning_curve.png and "
        "summary.json. Running it again resumes from the last checkpoint (--fresh to restart). "
        "Presets: tiny (tests), cpu (this 2-core machine, ~55 min on Beauty), paper (the "
        "paper's 200k steps, for GPUs). Explicit flags override the preset.",
        run_help="run directory with sequences.parquet and semantic_ids/",
        preset_help="named settings to start from (default: cpu)")


def _train(args: argparse.Namespace) -> int:
    from tiger_ray.runs import RunDir
    from tiger_ray.seq2seq.ray_train import run_train_seq2seq

    config = build_config(Seq2SeqTrainConfig, args, PRESETS[args.preset])
    summary = run_train_seq2seq(RunDir(args.run), config)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0
