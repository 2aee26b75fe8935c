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

Engines (--engine): this module reads everything into one process (the paper's datasets);
prepare_stream.py streams the shared and sequences formats through Ray Data for inputs larger
than one process and writes the same rows as Parquet parts. --engine auto picks by input size.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import pyarrow.parquet as pq

from tiger_ray import atomic
from tiger_ray.data.catalog import (CanonicalTables, ItemRecord, RawDataset, UserSequence,
                                    build_tables)
from tiger_ray.data.k_core import k_core_filter
# PrepareConfig and DATA_DIR_ENV are imported from here by the CLI, the jobs and the tests.
from tiger_ray.data.prepare_config import (DATA_DIR_ENV, PrepareConfig, choose_engine,  # noqa: F401
                                           describe_run, effective_k_core, input_files,
                                           stale_stages, warn_stale)
from tiger_ray.data.sequences_format import read_items_jsonl, read_sequences_file
from tiger_ray.data.stats import compute_stats
from tiger_ray.runs import RunDir

log = logging.getLogger(__name__)

# Preparation is the same at every scale; the presets exist so the pipeline treats stages alike.
PRESETS: dict[str, dict] = {"tiny": {}, "cpu": {}, "paper": {}}


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
    """Read, filter, check and write one dataset; returns the statistics written to stats.json.

    ``config.engine`` picks this in-memory path or the Ray Data one (prepare_stream.py); both
    write the same rows."""
    if choose_engine(config) == "ray":
        from tiger_ray.data.prepare_stream import run_prepare_streaming

        return run_prepare_streaming(run, config)
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

    stats = describe_run(
        config, "local", (interactions_path, metadata_path),
        compute_stats(tables.items, tables.sequences),
        input_counts={"users": input_users, "interactions": input_interactions},
        k_core_report=k_core_report,
        # McAuley meta files cover the whole category; rows outside the k-core are not counted.
        dropped=None if config.format == "mcauley" and wanted is not None else tables.dropped_items)
    stale = stale_stages(run)
    write_outputs(run, tables, stats)
    warn_stale(run, stale)
    return stats
