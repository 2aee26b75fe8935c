"""`tiger train-rqvae`: RQ-VAE on Ray Train, then the Semantic-ID table, report and plots."""

from __future__ import annotations

import argparse
import json

from tiger_ray.config import build_config, stage_parser
from tiger_ray.semantic_ids.config import PRESETS, RQVAEConfig


def register(subparsers) -> None:
    stage_parser(
        subparsers, "train-rqvae", config_cls=RQVAEConfig, presets=PRESETS, func=_train_rqvae,
        help="train the RQ-VAE (Ray Train) and assign Semantic IDs to every item",
        description="Train the RQ-VAE on RUN/embeddings with Ray Train (DDP, checkpoints in "
        "RUN/semantic_ids/train/; a re-run resumes), then write RUN/semantic_ids/: codes.npy "
        "(row = item_id) and the sorted-key index (memory-mapped by readers), semantic_ids.json, "
        "a semantic_ids.parquet export, model.pt, metrics.jsonl, report.json and plots.",
        run_help="run directory (after `tiger embed`)",
        preset_help="tiny (tests), cpu (this machine), paper (GPU clusters); flags override it")


def _train_rqvae(args: argparse.Namespace) -> int:
    from tiger_ray.runs import RunDir
    from tiger_ray.semantic_ids.ray_train import run_train_rqvae

    config = build_config(RQVAEConfig, args, PRESETS[args.preset])
    summary = run_train_rqvae(RunDir(args.run), config)
    print(json.dumps(summary, indent=2))
    return 0
