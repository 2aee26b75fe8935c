"""`tiger pipeline`: the whole chain on one run directory, stage by stage, resumable.

    prepare -> embed -> train-rqvae -> train-seq2seq -> evaluate (tiger)
            -> train-baseline -> evaluate (ann) -> tune-hybrid (valid) -> evaluate (hybrid) -> compare

Each stage is the same function its own `tiger <stage>` command calls, configured from the
stage's preset (``--preset``); pipeline-wide flags (``--workers``, ``--use-gpu``) go to every
stage that has them. A stage whose output already exists is skipped, so an interrupted pipeline
continues where it stopped; ``--from STAGE`` re-runs from that stage on.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tiger_ray.baseline import config as baseline_config
from tiger_ray.baseline.ray_train import run_train_baseline
from tiger_ray.config import build_config, field_names
from tiger_ray.data import prepare
from tiger_ray.embedding import config as embed_config
from tiger_ray.embedding.ray_embed import run_embed
from tiger_ray.evaluation import compare, evaluate
from tiger_ray.hybrid import tune as hybrid_tune
from tiger_ray.hybrid.retriever import tuning_path
from tiger_ray.runs import RunDir
from tiger_ray.semantic_ids import config as rqvae_config
from tiger_ray.semantic_ids.ray_train import run_train_rqvae
from tiger_ray.seq2seq import presets as seq2seq_presets
from tiger_ray.seq2seq.ray_train import run_train_seq2seq

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    config: type  # the stage's config dataclass
    presets: dict[str, dict]  # preset name -> overrides of the config's defaults
    run: Callable[[RunDir, Any], dict]  # (run directory, config) -> summary dict
    done: Callable[[RunDir], Path]  # the file whose presence means the stage is complete
    fixed: tuple[tuple[str, Any], ...] = ()  # settings this pipeline step always uses

    def build_config(self, preset: str, overrides: dict[str, Any]):
        names = field_names(self.config)
        given = {k: v for k, v in {**overrides, **dict(self.fixed)}.items() if k in names}
        return build_config(self.config, given, self.presets.get(preset, {}))


STAGES: tuple[Stage, ...] = (
    Stage("prepare", prepare.PrepareConfig, prepare.PRESETS, prepare.run_prepare, lambda r: r.stats),
    Stage("embed", embed_config.EmbedConfig, embed_config.PRESETS, run_embed,
          lambda r: r.embeddings / "manifest.json"),
    Stage("train-rqvae", rqvae_config.RQVAEConfig, rqvae_config.PRESETS, run_train_rqvae,
          lambda r: r.semantic_ids / "semantic_ids.json"),
    Stage("train-seq2seq", seq2seq_presets.Seq2SeqTrainConfig, seq2seq_presets.PRESETS,
          run_train_seq2seq, lambda r: r.seq2seq / "summary.json"),
    Stage("evaluate-tiger", evaluate.EvaluateConfig, evaluate.PRESETS, evaluate.run_evaluate,
          lambda r: r.eval_dir("tiger", "test") / "metrics.json",
          fixed=(("model", "tiger"), ("split", ("valid", "test")))),
    Stage("train-baseline", baseline_config.BaselineConfig, baseline_config.PRESETS,
          run_train_baseline, lambda r: r.baseline / "summary.json"),
    Stage("evaluate-ann", evaluate.EvaluateConfig, evaluate.PRESETS, evaluate.run_evaluate,
          lambda r: r.eval_dir("ann", "test") / "metrics.json",
          fixed=(("model", "ann"), ("split", ("valid", "test")))),
    Stage("tune-hybrid", hybrid_tune.TuneHybridConfig, hybrid_tune.PRESETS, hybrid_tune.run_tune_hybrid,
          tuning_path),
    # Its validation figures at the chosen weight are in RUN/hybrid/tuning.json.
    Stage("evaluate-hybrid", evaluate.EvaluateConfig, evaluate.PRESETS, evaluate.run_evaluate,
          lambda r: r.eval_dir("hybrid", "test") / "metrics.json",
          fixed=(("model", "hybrid"), ("split", ("test",)))),
    Stage("compare", compare.CompareConfig, compare.PRESETS, compare.run_compare,
          lambda r: r.compare / "comparison.json"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def run_pipeline(run: RunDir, preset: str, overrides: dict[str, Any], start: str | None = None,
                 stop: str | None = None) -> dict[str, Any]:
    """Run the stages from ``start`` to ``stop`` (inclusive); returns per-stage summaries and times."""
    names = list(STAGE_NAMES)
    first = names.index(start) if start else 0
    last = names.index(stop) if stop else len(names) - 1
    timings: dict[str, float] = {}
    summaries: dict[str, Any] = {}
    begin = time.perf_counter()
    for index, stage in enumerate(STAGES):
        if not first <= index <= last:
            continue
        if index != first and stage.done(run).exists() or (start is None and stage.done(run).exists()):
            log.info("[%s] already complete (%s), skipping", stage.name, stage.done(run))
            continue
        config = stage.build_config(preset, overrides)
        log.info("[%s] starting: %s", stage.name, config)
        t0 = time.perf_counter()
        summaries[stage.name] = stage.run(run, config)
        timings[stage.name] = time.perf_counter() - t0
        log.info("[%s] done in %.1f s", stage.name, timings[stage.name])
    timings["total"] = time.perf_counter() - begin
    return {"stages": summaries, "seconds": timings}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pipeline", help="run every stage on one dataset (the README's main job)",
        description="prepare -> embed -> train-rqvae -> train-seq2seq -> evaluate -> "
        "train-baseline -> evaluate ann -> compare, on an embedded local Ray unless RAY_ADDRESS "
        "is set. Completed stages are skipped, so re-running continues an interrupted run.")
    p.add_argument("--dataset", default="beauty", help="beauty, sports or toys (default: beauty)")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory")
    p.add_argument("--preset", default="cpu", choices=("tiny", "cpu", "paper"),
                   help="tiny: seconds, for tests; cpu: this 2-core machine; paper: the paper's "
                        "settings, for GPU clusters (default: cpu)")
    p.add_argument("--data-dir", default=None, help="dataset folder (else $TIGER_DATA_DIR, else "
                   "../shared/datasets/amazon2014)")
    p.add_argument("--format", default=None, choices=("shared", "mcauley", "sequences"),
                   help="input format for prepare (default: shared)")
    p.add_argument("--sequences", default=None, help="--format sequences: sequences file")
    p.add_argument("--items", default=None, help="--format sequences: items JSONL")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers / encoder actors")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="GPU training, encoding and indexing (cluster)")
    p.add_argument("--from", dest="start", choices=STAGE_NAMES, default=None,
                   help="re-run from this stage on, even if it completed before")
    p.add_argument("--until", dest="stop", choices=STAGE_NAMES, default=None,
                   help="stop after this stage")
    p.add_argument("--serve-demo", action=argparse.BooleanOptionalAction, default=True,
                   help="at the end, start the HTTP service, send one real request, shut it down")
    p.set_defaults(func=_pipeline)


def _pipeline(args: argparse.Namespace) -> int:
    from tiger_ray.ray_env import ray_session

    run = RunDir(args.run)
    overrides = {k: v for k, v in {
        "dataset": args.dataset, "data_dir": args.data_dir, "format": args.format,
        "sequences": args.sequences, "items": args.items, "workers": args.workers,
        "use_gpu": args.use_gpu}.items() if v is not None}
    with ray_session():
        result = run_pipeline(run, args.preset, overrides, args.start, args.stop)
        comparison = run.compare / "comparison.md"
        # The comparison has the quality table plus latency, index size and training time; a
        # pipeline stopped before `compare` prints the quality table alone.
        print(comparison.read_text() if comparison.exists() and args.stop in (None, "compare")
              else results_table(run))
        if args.serve_demo and (args.stop is None or args.stop == STAGE_NAMES[-1]):
            from tiger_ray.serving.demo import serve_demo

            serve_demo(run)
    print(f"pipeline finished in {result['seconds']['total'] / 60:.1f} min; run directory {run.root}")
    return 0


def results_table(run: RunDir) -> str:
    """Test metrics of every evaluated model beside the paper's Table 1 row for the dataset."""
    from tiger_ray.evaluation.metrics import PAPER_KEYS, PAPER_TABLE1

    dataset = json.loads(run.stats.read_text()).get("dataset") if run.stats.exists() else None
    lines = [f"Test split, {dataset or 'unknown dataset'} (leave-one-out, full ranking)",
             "| model | " + " | ".join(PAPER_KEYS) + " |", "|---|" + "---|" * len(PAPER_KEYS)]
    for model in ("tiger", "ann"):
        path = run.eval_dir(model, "test") / "metrics.json"
        if path.exists():
            metrics = json.loads(path.read_text())
            lines.append(f"| {model} (this run) | " + " | ".join(f"{metrics[k]:.4f}" for k in PAPER_KEYS) + " |")
    for name, row in PAPER_TABLE1.get(dataset or "", {}).items():
        lines.append(f"| {name} (paper) | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    return "\n".join(lines)
