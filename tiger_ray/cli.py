"""The `tiger` command: one subcommand per pipeline stage.

Each stage package has a ``cli`` module with ``register(subparsers)``; heavy imports (torch, ray)
happen inside the command functions so `tiger --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from tiger_ray import pipeline
from tiger_ray.baseline import cli as baseline_cli
from tiger_ray.data import cli as data_cli
from tiger_ray.embedding import cli as embedding_cli
from tiger_ray.evaluation import cli as evaluation_cli
from tiger_ray.evaluation import compare
from tiger_ray.hybrid import cli as hybrid_cli
from tiger_ray.semantic_ids import cli as semantic_ids_cli
from tiger_ray.seq2seq import cli as seq2seq_cli
from tiger_ray.serving import cli as serving_cli

# Modules with ``register(subparsers)``, in the pipeline's order; `tiger --help` lists them so.
COMMANDS = (data_cli, embedding_cli, semantic_ids_cli, seq2seq_cli, baseline_cli, hybrid_cli,
            evaluation_cli, compare, serving_cli, pipeline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiger",
        description="TIGER generative retrieval on Ray: prepare -> embed -> train-rqvae -> "
        "train-seq2seq -> evaluate -> serve, with a dual-encoder + FAISS baseline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        from tiger_ray.ray_env import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"  # Ray workers inherit it (ray_env.worker_env_vars)
    else:  # library deprecation notices (Ray Data, Pydantic in Serve) are not the user's to act on
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as err:
        # Bad input: one clear line naming what and where; the traceback only with --verbose.
        if args.verbose:
            raise
        print(f"tiger {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
