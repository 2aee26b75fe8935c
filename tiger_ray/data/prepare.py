"""`tiger prepare`: read a dataset in any supported format and write the canonical run files.

    RUN/items.parquet       ITEMS_SCHEMA, item_id dense 1..N
    RUN/sequences.parquet   SEQUENCES_SCHEMA, one row per user, items oldest first
    RUN/stats.json          statistics, the inputs read and the config used

Formats:
    shared     <data-dir>/<dataset>/sequences.txt.gz + items.jsonl.gz (the project's shared data)
    mcauley    <data-dir>/reviews_<Category>_5.json.gz + meta_<Category>.json.gz (the original
               files, see `tiger download`); 5-core filtered and ordered by review time
    sequences  --sequences FILE --items FILE (any catalog; see sequences_format.py)

The data directory is --data-dir, else $TIGER_DATA_DIR, else ../shared/datasets/amazon2014
relative to the current directory (the repository root under `make`). Everything is read and
checked before anything is written, and the three files are renamed into place only once all are
complete, so a failure never leaves a half-written run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq

from tiger_ray import atomic
from tiger_ray.config import to_dict
from tiger_ray.data.catalog import (CanonicalTables, ItemRecord, RawDataset, UserSequence,
                                    build_tables)
from tiger_ray.data.k_core import k_core_filter
from tiger_ray.data.sequences_format import read_items_jsonl, read_sequences_file
from tiger_ray.data.stats import compute_stats, paper_check
from tiger_ray.runs import RunDir

log = logging.getLogger(__name__)

DATA_DIR_ENV = "TIGER_DATA_DIR"
DEFAULT_DATA_DIR = Path("..") / "shared" / "datasets" / "amazon2014"
SHARED_FILES = ("sequences.txt.gz", "items.jsonl.gz")
PAPER_K_CORE = 5  # the paper's datasets keep users and items with >= 5 reviews
# Later-stage outputs made from a previous items.parquet; re-preparing makes them stale.
LATER_STAGE_DIRS = ("embeddings", "semantic_ids", "seq2seq", "baseline", "eval", "compare")

Format = Literal["shared", "mcauley", "sequences"]


@dataclass
class PrepareConfig:
    dataset: str | None = field(default=None, metadata={
        "help": "beauty, sports or toys (the paper's datasets); with --format shared any folder "
                "of the data directory, with --format mcauley any McAuley category name"})
    format: Format = field(default="shared", metadata={
        "help": "input format: shared (sequences.txt.gz + items.jsonl.gz), mcauley (the original "
                "reviews_*_5.json.gz + meta_*.json.gz) or sequences (--sequences + --items)"})
    data_dir: str | None = field(default=None, metadata={
        "help": f"folder holding the datasets (else ${DATA_DIR_ENV}, else {DEFAULT_DATA_DIR} "
                "relative to the current directory)"})
    sequences: str | None = field(default=None, metadata={
        "help": "--format sequences: text file, one `user item item ...` line per user, oldest first"})
    items: str | None = field(default=None, metadata={
        "help": "--format sequences: JSON lines with item_id (or asin) and optional title, brand, "
                "price, categories"})
    k_core: int | None = field(default=None, metadata={
        "help": f"keep only users and items with at least K interactions, repeated until stable "
                f"({PAPER_K_CORE} for --format mcauley when not given, off otherwise)"})
    keep_cold_items: bool = field(default=False, metadata={
        "help": "keep metadata rows of items nobody interacted with (they get ids after the rest)"})


# Preparation is the same at every scale; the presets exist so the pipeline treats stages alike.
PRESETS: dict[str, dict] = {"tiny": {}, "cpu": {}, "paper": {}}


def data_dir_source(config: PrepareConfig) -> tuple[Path, str]:
    """The data directory to read and where that choice came from (first one given wins)."""
    if config.data_dir:
        return Path(config.data_dir).expanduser(), "--data-dir"
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser(), f"${DATA_DIR_ENV}"
    return DEFAULT_DATA_DIR, "the default (relative to the current directory)"


def find_files(config: PrepareConfig, names: tuple[str, ...]) -> list[Path]:
    """Locate ``names`` in <data-dir>/<dataset>/ or <data-dir>/; the error lists every path tried."""
    base, source = data_dir_source(config)
    folders = [base / config.dataset, base] if config.dataset else [base]
    for folder in folders:
        paths = [folder / name for name in names]
        if all(p.is_file() for p in paths):
            return paths
    tried = "\n  ".join(str((folder / name).resolve()) for folder in folders for name in names)
    hint = (f"set --data-dir or ${DATA_DIR_ENV}" if source.startswith("the default")
            else f"data directory from {source}")
    raise FileNotFoundError(
        f"dataset {config.dataset!r} ({config.format} format) not found; {hint}. Looked for:\n  {tried}"
    )


def input_files(config: PrepareConfig) -> tuple[Path, Path]:
    """(interactions file, metadata file) that ``config`` names; checks they exist."""
    if config.format == "sequences":
        if not (config.sequences and config.items):
            raise ValueError("--format sequences needs both --sequences FILE and --items FILE")
        paths = (Path(config.sequences).expanduser(), Path(config.items).expanduser())
        missing = [str(p.resolve()) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError("not found: " + ", ".join(missing))
        return paths
    if not config.dataset:
        raise ValueError(f"--format {config.format} needs --dataset (e.g. beauty, sports, toys)")
    if config.format == "shared":
        return tuple(find_files(config, SHARED_FILES))
    if config.format == "mcauley":
        from tiger_ray.data.mcauley import file_names

        return tuple(find_files(config, file_names(config.dataset)))
    raise ValueError(f"unknown format {config.format!r}; choose shared, mcauley or sequences")


def read_interactions(config: PrepareConfig, path: Path) -> list[UserSequence]:
    if config.format == "mcauley":
        from tiger_ray.data.mcauley import read_reviews

        return read_reviews(path)
    return read_sequences_file(path)


def read_metadata(config: PrepareConfig, path: Path, wanted: set[str] | None) -> dict[str, ItemRecord]:
    if config.format == "mcauley":
        from tiger_ray.data.mcauley import read_meta

        # The meta file covers the whole category: parse only the items we keep.
        return read_meta(path, wanted)
    return read_items_jsonl(path)


def effective_k_core(config: PrepareConfig) -> int:
    if config.k_core is not None:
        if config.k_core < 0:
            raise ValueError(f"--k-core must be >= 0, got {config.k_core}")
        return config.k_core
    return PAPER_K_CORE if config.format == "mcauley" else 0


def write_outputs(run: RunDir, tables: CanonicalTables, stats: dict) -> None:
    """Write all three files under temporary names, then rename them into place together."""
    created_root = not run.root.exists()
    try:
        with contextlib.ExitStack() as stack:
            # ExitStack renames in reverse order of entry: items, then sequences, then stats.
            stats_tmp = stack.enter_context(atomic.atomic_path(run.stats))
            sequences_tmp = stack.enter_context(atomic.atomic_path(run.sequences))
            items_tmp = stack.enter_context(atomic.atomic_path(run.items))
            pq.write_table(tables.items, items_tmp)
            pq.write_table(tables.sequences, sequences_tmp)
            stats_tmp.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except BaseException:
        if created_root:
            with contextlib.suppress(OSError):
                run.root.rmdir()  # only if empty: never delete anything we did not write
        raise


def run_prepare(run: RunDir, config: PrepareConfig) -> dict:
    """Read, filter, check and write one dataset; returns the statistics written to stats.json."""
    k = effective_k_core(config)
    interactions_path, metadata_path = input_files(config)
    log.info("reading %s and %s", interactions_path.resolve(), metadata_path.resolve())
    users = read_interactions(config, interactions_path)
    input_users = len(users)
    input_interactions = sum(len(u.items) for u in users)
    k_core_report = None
    if k > 1:
        users, passes = k_core_filter(users, k)
        kept_interactions = sum(len(u.items) for u in users)
        k_core_report = {"k": k, "passes": passes,
                         "users_removed": input_users - len(users),
                         "interactions_removed": input_interactions - kept_interactions}
        log.info("%d-core: %d passes, removed %d users and %d interactions", k, passes,
                 k_core_report["users_removed"], k_core_report["interactions_removed"])
    wanted = None if config.keep_cold_items else {key for u in users for key in u.items}
    items = read_metadata(config, metadata_path, wanted)
    tables = build_tables(RawDataset(users, items), keep_cold_items=config.keep_cold_items)

    stats = compute_stats(tables.items, tables.sequences)
    dataset = config.dataset or interactions_path.name.split(".")[0]
    stats.update({
        "dataset": dataset,
        "format": config.format,
        "inputs": {"interactions": str(interactions_path.resolve()),
                   "metadata": str(metadata_path.resolve())},
        "input": {"users": input_users, "interactions": input_interactions},
        "k_core": k_core_report,
        # McAuley meta files cover the whole category; rows outside the k-core are not counted.
        "metadata_rows_without_interactions_dropped":
            None if config.format == "mcauley" and wanted is not None else tables.dropped_items,
        "paper": paper_check(config.dataset, stats) if config.format != "sequences" else None,
        "config": to_dict(config),
    })
    stale = [name for name in LATER_STAGE_DIRS if (run.root / name).exists()]
    write_outputs(run, tables, stats)
    if stale:
        log.warning("%s still holds %s made from the previous items; re-run those stages",
                    run.root, ", ".join(stale))
    return stats
