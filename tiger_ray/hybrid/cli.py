"""`tiger tune-hybrid`: the TIGER + dual-encoder hybrid's weight, chosen on validation.

    tiger tune-hybrid --run runs/beauty                         # grid 0, 0.1, ..., 1 on valid
    tiger evaluate --run runs/beauty --model hybrid --split test  # then uses the chosen weight
"""

from __future__ import annotations

import argparse

from tiger_ray.config import build_config, stage_parser
from tiger_ray.hybrid.tune import PRESETS, TuneHybridConfig


def register(subparsers) -> None:
    stage_parser(
        subparsers, "tune-hybrid", config_cls=TuneHybridConfig, presets=PRESETS, func=_tune,
        help="choose the TIGER + dual-encoder hybrid's weight on the validation split",
        description="Decode every validation user once (TIGER beam + dual-encoder neighbours, "
        "both models' scores), re-rank at each weight of the grid, and write the weight with the "
        "best validation NDCG@10 to RUN/hybrid/tuning.json (and tuning.png). Needs "
        "`tiger train-seq2seq` and `tiger train-baseline` first.",
        preset_help="accepted for symmetry with the other stages")


def _tune(args: argparse.Namespace) -> int:
    from tiger_ray.hybrid.tune import run_tune_hybrid
    from tiger_ray.runs import RunDir

    result = run_tune_hybrid(RunDir(args.run), build_config(TuneHybridConfig, args, PRESETS[args.preset]))
    print(f"{'TIGER weight':>12}  {'R@5':>7}  {'N@5':>7}  {'R@10':>7}  {'N@10':>7}   "
          f"({result['users']} validation users)")
    for row in result["grid"]:
        mark = "  <- chosen" if row["tiger_weight"] == result["tiger_weight"] else ""
        print(f"{row['tiger_weight']:>12.2f}  {row['recall@5']:>7.4f}  {row['ndcg@5']:>7.4f}  "
              f"{row['recall@10']:>7.4f}  {row['ndcg@10']:>7.4f}{mark}")
    print(f"wrote RUN/hybrid/tuning.json and tuning.png under {args.run}; "
          f"`tiger evaluate --model hybrid` now uses weight {result['tiger_weight']:.2f}")
    return 0
