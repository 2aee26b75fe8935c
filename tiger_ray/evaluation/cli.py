"""`tiger evaluate`: full-ranking leave-one-out metrics of a trained model, next to the paper's.

    tiger evaluate --run runs/beauty --split test                    # TIGER, beam 20
    tiger evaluate --run runs/beauty --split test --model ann        # dual encoder + FAISS
    tiger evaluate --run runs/beauty --split test --temperature 1.5  # diverse sampling (Entropy@10)
    tiger evaluate --run runs/beauty --cold-start --epsilon 0.1      # paper Sec. 4.3

Writes RUN/eval/<model>/<split>/{metrics.json, predictions.parquet/ (parts)}: Recall/NDCG@5/10, the
invalid-ID rate (TIGER), Entropy@10 of the top-10's item categories, throughput.
"""

from __future__ import annotations

import argparse

from tiger_ray.config import build_config, stage_parser
from tiger_ray.evaluation.evaluate import PRESETS, EvaluateConfig


def register(subparsers) -> None:
    stage_parser(
        subparsers, "evaluate", config_cls=EvaluateConfig, presets=PRESETS, func=_evaluate,
        help="Recall/NDCG@5/10, invalid-ID rate and Entropy@10 on the valid or test split",
        description="Rank the whole catalog for every user's leave-one-out history and write "
        "RUN/eval/<model>/<split>/metrics.json and predictions.parquet; prints the paper's Table 1 "
        "row for the run's dataset beside ours.",
        preset_help="accepted for symmetry with the other stages; evaluation is the same at every scale")


def _evaluate(args: argparse.Namespace) -> int:
    from tiger_ray.evaluation.evaluate import dataset_of, run_evaluate
    from tiger_ray.runs import RunDir

    run = RunDir(args.run)
    config = build_config(EvaluateConfig, args, PRESETS[args.preset])
    for split, result in run_evaluate(run, config).items():
        if config.cold_start:
            print(format_cold(result, run))
            continue
        print(format_table(result, dataset_of(run)))
        print(f"wrote {run.eval_dir(result['model'], split)}/metrics.json, predictions.parquet")
    return 0


def format_table(result: dict, dataset: str | None) -> str:
    """Our row under the paper's Table 1 rows for the same dataset (when it has them)."""
    from tiger_ray.evaluation.metrics import PAPER_KEYS, PAPER_TABLE1

    header = f"{'':24}" + "".join(f"{key:>11}" for key in PAPER_KEYS)
    label = f"ours ({result['model']}, {result['split']})"
    rows = [header, f"{label:24}" + "".join(
        f"{result[key]:>11.4f}" if key in result else f"{'-':>11}" for key in PAPER_KEYS)]
    for name, values in PAPER_TABLE1.get((dataset or "").lower(), {}).items():
        rows.append(f"{'paper ' + name:24}" + "".join(f"{v:>11.4f}" for v in values))
    extras = [f"{result['count']} users ({dataset or 'dataset unknown'})"]
    if "invalid_id_rate" in result:
        extras.append(f"invalid-ID rate {result['invalid_id_rate']:.4f}")
    extras += [f"{key} {value:.3f}" for key, value in result.items() if key.startswith("entropy@")]
    if "beam_size" in result:
        extras.append(f"beam {result['beam_size']}" + (
            f", temperature {result['temperature']}" if result.get("temperature") else ""))
    if result.get("queries_per_second"):
        extras.append(f"{result['queries_per_second']:.0f} users/s")
    return "\n".join(rows + ["  ".join(extras)])


def format_cold(result: dict, run) -> str:
    recalls = "  ".join(f"{key} {value:.4f}" for key, value in result.items()
                        if key.startswith(("recall@", "ndcg@")))
    n = result["count"]
    return (f"cold start: {n} {result['split']} users whose target is one of {result['cold_items']} "
            f"unseen items, epsilon {result['epsilon']}, prefix {result['prefix_len']} codes"
            + (f", unseen beam {result['unseen_beam']}" if result.get("unseen_beam") else "")
            + (", unseen quota" if result.get("quota") else "") + "\n"
            f"{recalls}  unseen share of top-k {result['unseen_share']:.4f}\n"
            f"reach: {result['prefix_reachable_items']} unseen items share their prefix with a seen "
            f"item ({result['prefix_reachable_users']} of the {n} targets); the beam generated an "
            f"unseen item's own ID for {result['generated_unseen_users']} users\n"
            f"wrote {run.eval_dir(result['model'], result['split'])}")
