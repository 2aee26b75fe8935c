"""`tiger download` and `tiger prepare`."""

from __future__ import annotations

import argparse
import sys

from tiger_ray.config import build_config, stage_parser
from tiger_ray.data.prepare import PRESETS, PrepareConfig


def register(subparsers) -> None:
    download = subparsers.add_parser(
        "download", help="download the original McAuley 2014 review + meta files of a category",
        description="Fetch reviews_<Category>_5.json.gz and meta_<Category>.json.gz (streamed, "
        "renamed into place only when complete) for `tiger prepare --format mcauley`.")
    download.add_argument("--dataset", required=True,
                          help="beauty, sports, toys, or any McAuley category name "
                               "(e.g. Cell_Phones_and_Accessories)")
    download.add_argument("--out", required=True, help="folder to write the two files to")
    download.add_argument("--base-url", default=None,
                          help="where the files live (default: the SNAP productGraph folder)")
    download.add_argument("--force", action="store_true", help="download again even if present")
    download.set_defaults(func=_download)

    stage_parser(
        subparsers, "prepare", config_cls=PrepareConfig, presets=PRESETS, func=_prepare,
        help="read a dataset and write items.parquet, sequences.parquet, stats.json",
        description="Read the shared Amazon 2014 data, the original McAuley files or your own "
        "sequences + items files, and write the canonical run files (dense item ids 1..N).",
        run_flags=("--out", "--run"), run_help="run directory to write to (created if needed)",
        default_preset=None, preset_help="accepted for symmetry with the other stages; "
        "preparation is the same at every scale")


def _prepare(args: argparse.Namespace) -> int:
    from tiger_ray.data.prepare import run_prepare
    from tiger_ray.data.stats import format_stats
    from tiger_ray.runs import RunDir

    config = build_config(PrepareConfig, args, PRESETS.get(args.preset or "cpu"))
    run = RunDir(args.run)
    stats = run_prepare(run, config)
    print(format_stats(stats, stats.get("dataset")))
    print(f"wrote {run.items}, {run.sequences.name}, {run.stats.name}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from tiger_ray.data.download import DownloadError, download_mcauley

    try:
        paths = download_mcauley(args.dataset, args.out, base_url=args.base_url, force=args.force)
    except DownloadError as err:
        print(f"tiger download: error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
