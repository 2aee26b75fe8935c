"""`tiger embed`: item texts -> sentence-encoder vectors on a Ray Data actor pool."""

from __future__ import annotations

import argparse
import json

from tiger_ray.config import add_config_args, build_config
from tiger_ray.embedding.config import PRESETS, EmbedConfig


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "embed", help="embed every item's text with a sentence encoder (Ray Data actor pool)",
        description="Read RUN/items.parquet with Ray Data, encode the `text` column on a pool of "
        "sentence-transformers actors (each loads the model once; one per GPU with --use-gpu) and "
        "write RUN/embeddings/part-*.parquet (item_id, embedding float32[dim]) and manifest.json. "
        "Identical texts get identical vectors. A re-run with the same model skips the shards "
        "already written; another model replaces them. Runs on an embedded loopback Ray unless "
        "RAY_ADDRESS is set.")
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory (after `tiger prepare`)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="tiny (tests), cpu (this machine), paper (sentence-T5 on GPUs); flags override it")
    add_config_args(parser, EmbedConfig)
    parser.set_defaults(func=_embed)


def _embed(args: argparse.Namespace) -> int:
    from tiger_ray.embedding.ray_embed import run_embed
    from tiger_ray.runs import RunDir

    config = build_config(EmbedConfig, args, PRESETS[args.preset])
    summary = run_embed(RunDir(args.run), config)
    print(json.dumps(summary, indent=2))
    return 0
