"""What `tiger prepare` reads and how: its config, where the input files are, which engine runs.

Both engines (the in-memory one in prepare.py, the Ray Data one in prepare_stream.py) start from
here, so they find the same files, apply the same k-core default and describe a run the same way
in stats.json.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from tiger_ray.config import to_dict
from tiger_ray.data.stats import paper_check
from tiger_ray.runs import RunDir

log = logging.getLogger(__name__)

DATA_DIR_ENV = "TIGER_DATA_DIR"
DEFAULT_DATA_DIR = Path("..") / "shared" / "datasets" / "amazon2014"
SHARED_FILES = ("sequences.txt.gz", "items.jsonl.gz")
PAPER_K_CORE = 5  # the paper's datasets keep users and items with >= 5 reviews
# Later-stage outputs made from a previous items.parquet; re-preparing makes them stale.
LATER_STAGE_DIRS = ("embeddings", "semantic_ids", "seq2seq", "baseline", "eval", "compare")
# --engine auto streams inputs this large (compressed bytes on disk, both inputs together).
AUTO_RAY_BYTES = 2 * 1024 ** 3

Format = Literal["shared", "mcauley", "sequences"]
Engine = Literal["local", "ray", "auto"]


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
        "help": "--format sequences: text file, one `user item item ...` line per user, oldest "
                "first (with --engine ray also a directory or glob of such files, read in name "
                "order)"})
    items: str | None = field(default=None, metadata={
        "help": "--format sequences: JSON lines with item_id (or asin) and optional title, brand, "
                "price, categories (with --engine ray also a directory or glob of such files)"})
    k_core: int | None = field(default=None, metadata={
        "help": f"keep only users and items with at least K interactions, repeated until stable "
                f"({PAPER_K_CORE} for --format mcauley when not given, off otherwise)"})
    keep_cold_items: bool = field(default=False, metadata={
        "help": "keep metadata rows of items nobody interacted with (they get ids after the rest)"})
    engine: Engine = field(default="auto", metadata={
        "help": "local: read everything into this process (the paper's datasets); ray: stream "
                "through Ray Data and write Parquet parts, for inputs larger than one process "
                "(--format shared or sequences); auto: ray when an input is a directory or glob "
                f"of parts or the inputs exceed {AUTO_RAY_BYTES // 1024 ** 3} GiB, else local"})


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


def input_specs(config: PrepareConfig) -> tuple[Path, Path]:
    """(interactions, metadata) as named: files, or for --format sequences what the flags say."""
    if config.format == "sequences":
        if not (config.sequences and config.items):
            raise ValueError("--format sequences needs both --sequences FILE and --items FILE")
        return Path(config.sequences).expanduser(), Path(config.items).expanduser()
    if not config.dataset:
        raise ValueError(f"--format {config.format} needs --dataset (e.g. beauty, sports, toys)")
    if config.format == "shared":
        return tuple(find_files(config, SHARED_FILES))
    if config.format == "mcauley":
        from tiger_ray.data.mcauley import file_names

        return tuple(find_files(config, file_names(config.dataset)))
    raise ValueError(f"unknown format {config.format!r}; choose shared, mcauley or sequences")


def input_files(config: PrepareConfig) -> tuple[Path, Path]:
    """(interactions file, metadata file) that ``config`` names; checks they exist."""
    paths = input_specs(config)
    missing = [str(p.resolve()) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError("not found: " + ", ".join(missing))
    return paths


def input_parts(spec: Path) -> list[Path]:
    """The files an input names: the file itself, the files of a directory or the matches of a
    glob, in name order (the order users and items are numbered in). Hidden names are skipped."""
    if spec.is_file():
        return [spec]
    if spec.is_dir():
        found = [p for p in spec.iterdir() if p.is_file()]
    else:
        found = [Path(p) for p in glob.glob(str(spec)) if Path(p).is_file()]
    parts = sorted(p for p in found if not p.name.startswith((".", "_")))
    if not parts:
        raise FileNotFoundError(f"not found: {spec.resolve()} (no file, directory of files or "
                                f"glob matches)")
    return parts


def choose_engine(config: PrepareConfig) -> Literal["local", "ray"]:
    """The engine ``config.engine`` stands for (auto: by the inputs' form and size)."""
    if config.engine not in ("local", "ray", "auto"):
        raise ValueError(f"unknown engine {config.engine!r}; choose local, ray or auto")
    if config.format == "mcauley":
        if config.engine == "ray":
            raise ValueError("--format mcauley is not supported by the streaming engine "
                             "(--engine ray); use --engine local")
        return "local"
    if config.engine != "auto":
        return config.engine
    specs = input_specs(config)
    if not all(spec.is_file() for spec in specs):
        # A directory or glob of parts: only the streaming engine reads those. Anything else
        # missing goes to the local engine, whose error names it.
        parted = any(spec.is_dir() or glob.glob(str(spec)) for spec in specs)
        return "ray" if parted else "local"
    return "ray" if sum(spec.stat().st_size for spec in specs) > AUTO_RAY_BYTES else "local"


def effective_k_core(config: PrepareConfig) -> int:
    if config.k_core is not None:
        if config.k_core < 0:
            raise ValueError(f"--k-core must be >= 0, got {config.k_core}")
        return config.k_core
    return PAPER_K_CORE if config.format == "mcauley" else 0


def describe_run(config: PrepareConfig, engine: str, inputs: tuple[Path, Path], stats: dict, *,
                 input_counts: dict, k_core_report: dict | None, dropped: int | None) -> dict:
    """``stats`` (compute_stats' keys) plus what was read and how, as written to stats.json."""
    interactions, metadata = inputs
    dataset = config.dataset or interactions.name.split(".")[0]
    return {
        **stats,
        "dataset": dataset,
        "format": config.format,
        "inputs": {"interactions": str(interactions.resolve()),
                   "metadata": str(metadata.resolve())},
        "input": input_counts,
        "k_core": k_core_report,
        "metadata_rows_without_interactions_dropped": dropped,
        "paper": paper_check(config.dataset, stats) if config.format != "sequences" else None,
        "config": to_dict(replace(config, engine=engine)),  # the engine that ran, not "auto"
    }


def stale_stages(run: RunDir) -> list[str]:
    """Later stages already in ``run`` (call before writing): the new items make them stale."""
    return [name for name in LATER_STAGE_DIRS if (run.root / name).exists()]


def warn_stale(run: RunDir, stale: list[str]) -> None:
    if stale:
        log.warning("%s still holds %s made from the previous items; re-run those stages",
                    run.root, ", ".join(stale))
