"""`tiger train-baseline` (dual encoder on Ray Train + FAISS index) and `tiger baseline-index`."""

from __future__ import annotations

import argparse
import json

from tiger_ray.baseline.ann_index import IndexConfig
from tiger_ray.baseline.config import PRESETS, BaselineConfig
from tiger_ray.config import add_config_args, build_config, stage_parser


def register(subparsers) -> None:
    stage_parser(
        subparsers, "train-baseline", config_cls=BaselineConfig, presets=PRESETS, func=_train,
        help="train the dual-encoder baseline with Ray Train and build its FAISS index",
        description="Train a SASRec-style query tower and an ID + text item tower on the run's "
        "training examples (sampled softmax with log-Q correction, or full-catalog softmax), select "
        "the epoch by validation recall@10, then index the item vectors with FAISS in "
        "RUN/baseline/. Re-running resumes from the latest Ray Train checkpoint.",
        run_help="run directory (after tiger embed)",
        preset_help="tiny (tests), cpu (this 2-core machine), paper (GPU clusters)",
        also=(IndexConfig,))  # the FAISS index built after training

    index = subparsers.add_parser(
        "baseline-index", help="build another FAISS index for the trained dual encoder and measure "
        "its recall against exact search",
        description="Index the trained dual encoder's item vectors (RUN/baseline/model.pt) with the "
        "given FAISS index type and parameters, save it as RUN/baseline/index-<type>/, and report "
        "its recall@10 against exact (flat) search on validation queries and its latency.")
    index.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory (after train-baseline)")
    index.add_argument("--queries", type=int, default=5000, help="validation queries to measure on")
    index.add_argument("--eval-splits", nargs="*", choices=("valid", "test"), default=[],
                       help="also compute Recall/NDCG@5/10 through this index on these splits "
                            "(reported only; RUN/eval/ is left to `tiger evaluate`)")
    add_config_args(index, IndexConfig)
    index.set_defaults(func=_index)


def _train(args: argparse.Namespace) -> int:
    from tiger_ray.baseline.ray_train import run_train_baseline
    from tiger_ray.ray_env import ray_session
    from tiger_ray.runs import RunDir

    config = build_config(BaselineConfig, args, PRESETS[args.preset])
    index_config = build_config(IndexConfig, args)
    with ray_session():
        summary = run_train_baseline(RunDir(args.run), config, index_config)
    index = summary["index"]
    print(f"dual encoder ({summary['loss']} softmax): best epoch {summary['best_epoch']}/"
          f"{summary['epochs_run']}, valid recall@10 {summary['valid']['recall@10']:.4f} "
          f"ndcg@10 {summary['valid']['ndcg@10']:.4f}, {summary['train_seconds']:.0f}s training")
    print(f"{index['index_type']} index: {index['bytes_per_item']:.0f} bytes/item, "
          f"ann recall@10 vs exact {index['ann_recall@10']:.4f} -> {index['path']}")
    print_nprobe_curve(index)
    return 0


def print_nprobe_curve(index: dict) -> None:
    """IVF-PQ: recall vs exact and latency at other nprobe values (what --ivf-nprobe trades)."""
    if not index.get("nprobe_curve"):
        return
    print(f"  nprobe (of {index['nlist']} lists)  recall@10 vs exact  ms/query (batched)")
    for point in index["nprobe_curve"]:
        mark = "  <- built with" if point["nprobe"] == index["nprobe"] else ""
        print(f"  {point['nprobe']:>6}  {point['ann_recall@10']:>18.4f}  {point['batched_ms_per_query']:>18.4f}{mark}")
    if index.get("refine_curve"):
        print("  refine (x k candidates re-ranked exactly)  recall@10 vs exact  ms/query (batched)")
        built = index.get("params", {}).get("ivf_refine")
        for point in index["refine_curve"]:
            mark = "  <- built with" if point["refine"] == built else ""
            print(f"  {point['refine']:>6}  {point['ann_recall@10']:>37.4f}  "
                  f"{point['batched_ms_per_query']:>18.4f}{mark}")


def _index(args: argparse.Namespace) -> int:
    from tiger_ray.baseline.retriever import build_run_index
    from tiger_ray.runs import RunDir

    summary = build_run_index(RunDir(args.run), build_config(IndexConfig, args),
                              measure_queries=args.queries, eval_splits=tuple(args.eval_splits))
    print(json.dumps(summary, indent=2))
    return 0
