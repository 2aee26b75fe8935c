"""`tiger embed`: item texts -> sentence-encoder vectors on a Ray Data actor pool."""

from __future__ import annotations

import argparse
import json

from tiger_ray.config import build_config, stage_parser
from tiger_ray.embedding.config import PRESETS, EmbedConfig


def register(subparsers) -> None:
    stage_parser(
        subparsers, "embed", config_cls=EmbedConfig, presets=PRESETS, func=_embed,
        help="embed every item's text with a sentence encoder (Ray Data actor pool)",
        description="Read RUN/items.parquet with Ray Data, encode the `text` column on a pool of "
        "sentence-transformers actors (each loads the model once; one per GPU with --use-gpu) and "
        "write RUN/embeddings/part-*.parquet (item_id, embedding float32[dim]) and manifest.json. "
        "Identical texts get identical vectors. A re-run with the same model skips the shards "
        "already written; another model replaces them. Runs on an embedded loopback Ray unless "
        "RAY_ADDRESS is set.",
        run_help="run directory (after `tiger prepare`)",
        preset_help="tiny (tests), cpu (this machine), paper (sentence-T5 on GPUs); flags override it")


def _embed(args: argparse.Namespace) -> int:
    from tiger_ray.embedding.ray_embed import run_embed
    from tiger_ray.runs import RunDir

    config = build_config(EmbedConfig, args, PRESETS[args.preset])
    summary = run_embed(RunDir(args.run), config)
    print(json.dumps(summary, indent=2))
    return 0
