"""The `tiger` command: one subcommand per pipeline stage.

Each stage package has a ``cli`` module with ``register(subparsers)``; heavy imports (torch, ray)
happen inside the command functions so `tiger --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Order is the pipeline's order; `tiger --help` lists them this way.
COMMAND_MODULES = [
    "tiger_ray.data.cli",
    "tiger_ray.embedding.cli",
    "tiger_ray.semantic_ids.cli",
    "tiger_ray.seq2seq.cli",
    "tiger_ray.baseline.cli",
    "tiger_ray.evaluation.cli",
    "tiger_ray.evaluation.compare",
    "tiger_ray.serving.cli",
    "tiger_ray.pipeline",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiger",
        description="TIGER generative retrieval on Ray: prepare -> embed -> train-rqvae -> "
        "train-seq2seq -> evaluate -> serve, with a dual-encoder + FAISS baseline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
