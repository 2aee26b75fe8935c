"""Training throughput of the two training modes: per-example against all-positions windows.

Both modes train on the same users' (history, target) examples: per_example encodes every
example's history on its own with the bidirectional encoder; all_positions encodes a window of a
user's items once with the item-causal encoder and decodes all its targets against their own
history prefixes (``seq2seq/data.py: training_windows``). Each mode gets the `cpu` preset's model
(d_model 128, 4 + 4 layers, 6 heads x 64, MLP 1024, dropout 0.1), optimizer and precision, and
batches of the same number of examples; their steps are interleaved batch by batch in one
process, so load from other processes on a shared machine hits both alike. A step is forward +
backward + optimizer + LR schedule. We report (history, target) examples per second (wall clock
and per CPU-second), the source tokens encoded per example, and the ratio all_positions /
per_example.

    python benchmarks/bench_all_positions.py                          # runs/beauty
    python benchmarks/bench_all_positions.py --run runs/toys --steps 60
    python benchmarks/bench_all_positions.py --synthetic --json out.json   # a synthetic run
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiger_ray import atomic  # noqa: E402
from tiger_ray.data.schema import read_sequences  # noqa: E402
from tiger_ray.runs import RunDir  # noqa: E402
from tiger_ray.semantic_ids.table import read_semantic_ids, write_semantic_ids  # noqa: E402
from tiger_ray.seq2seq.data import (TrainingWindows, bucketed_batches, collate,  # noqa: E402
                                    collate_rows, examples_from_columns, training_examples,
                                    training_windows)
from tiger_ray.seq2seq.model import TigerSeq2Seq  # noqa: E402
from tiger_ray.seq2seq.presets import CPU_PRESET, Seq2SeqTrainConfig  # noqa: E402
from tiger_ray.seq2seq.schedule import inverse_sqrt_schedule  # noqa: E402
from tiger_ray.seq2seq.tokenizer import SemanticIdTokenizer  # noqa: E402
from tiger_ray.seq2seq.train import (make_optimizer, model_config, resolve_precision,  # noqa: E402
                                     training_step)

MODES = ("per_example", "all_positions")


def synthetic_run(root: Path, users: int, items: int, seed: int = 0) -> RunDir:
    """A ``make_synthetic_run`` of Beauty's shape (5-13 items per user, mean ~9) with random
    unique 4-code Semantic IDs of 256 codes per position, as RQ-VAE gives Beauty."""
    from tiger_ray.testing.synthetic import make_synthetic_run

    run = make_synthetic_run(root, n_items=items, n_users=users, min_len=5, max_len=13, seed=seed)
    rng = np.random.default_rng(seed)
    codes = np.zeros((items, 4), dtype=np.int64)
    codes[:, :3] = rng.integers(0, 256, size=(items, 3))
    _, group = np.unique(codes[:, :3], axis=0, return_inverse=True)
    for g in np.unique(group):  # c3 disambiguates collisions, as in the real table
        rows = np.flatnonzero(group == g)
        codes[rows, 3] = np.arange(len(rows))
    write_semantic_ids(run, np.arange(1, items + 1), codes)
    return run


def mode_batches(mode: str, sequences, tokenizer, cfg: Seq2SeqTrainConfig, count: int) -> list:
    """The first ``count`` batches of epoch 0 of ``mode``, as its trainer would collate them."""
    args = (sequences.user_ids, sequences.offsets, sequences.flat, tokenizer)
    if mode == "per_example":
        data = examples_from_columns(training_examples(*args))
        plan = bucketed_batches(data.lengths, cfg.batch_size, seed=cfg.seed, epoch=0,
                                chunk_batches=cfg.bucket_chunk_batches)
        return [collate(data, b, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id)
                for b in plan[:count]]
    windows = TrainingWindows.from_arrays(training_windows(*args))
    plan = bucketed_batches(windows.lengths, cfg.batch_size, seed=cfg.seed, epoch=0,
                            chunk_batches=cfg.bucket_chunk_batches, sizes=windows.sizes)
    return [collate_rows(windows.to_arrays(), b, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id)
            for b in plan[:count]]


def time_interleaved(models: dict, batches: dict, cfg: Seq2SeqTrainConfig, precision: str,
                     warmup: int) -> dict:
    """Step i of every mode in turn; wall and process CPU time summed over the timed steps."""
    stats = {}
    for mode, model in models.items():
        optimizer = make_optimizer(model, cfg)
        stats[mode] = {"optimizer": optimizer,
                       "scheduler": inverse_sqrt_schedule(optimizer, cfg.warmup_steps, cfg.decay_start),
                       "seconds": 0.0, "cpu_seconds": 0.0, "examples": 0, "source_tokens": 0,
                       "losses": []}
    steps = min(len(b) for b in batches.values())
    for i in range(steps):
        for mode, model in models.items():
            s, batch = stats[mode], batches[mode][i]
            wall, cpu = time.perf_counter(), time.process_time()
            loss = training_step(model, s["optimizer"], s["scheduler"], batch, precision=precision,
                                 grad_clip=cfg.grad_clip)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if i >= warmup:
                s["seconds"] += wall
                s["cpu_seconds"] += cpu
                s["examples"] += batch.examples
                s["source_tokens"] += int((~batch.source_pad).sum())
                s["losses"].append(loss)
    return stats


def measure(run: RunDir, source: str, args: argparse.Namespace) -> dict:
    """Both modes on the run's users; prints and returns the figures."""
    sequences, sids = read_sequences(run.sequences), read_semantic_ids(run)
    cfg = Seq2SeqTrainConfig(**{**CPU_PRESET, "batch_size": args.batch_size,
                                "precision": args.precision})
    tokenizer = SemanticIdTokenizer(sids, num_user_buckets=cfg.num_user_buckets,
                                    max_history=cfg.max_history)
    precision = resolve_precision(cfg.precision, torch.device("cpu"))
    models, batches = {}, {}
    for mode in MODES:
        mode_cfg = dataclasses.replace(cfg, training_mode=mode)
        torch.manual_seed(0)
        models[mode] = TigerSeq2Seq(model_config(mode_cfg, tokenizer))
        batches[mode] = mode_batches(mode, sequences, tokenizer, mode_cfg, args.warmup + args.steps)
    stats = time_interleaved(models, batches, cfg, precision, args.warmup)

    results = {"source": source, "users": len(sequences), "batch_size": cfg.batch_size,
               "precision": precision, "threads": torch.get_num_threads(),
               "timed_steps": len(stats[MODES[0]]["losses"]), "torch": torch.__version__}
    for mode in MODES:
        s = stats[mode]
        steps = len(s["losses"])
        results[mode] = {"seconds": s["seconds"], "cpu_seconds": s["cpu_seconds"],
                         "examples": s["examples"],
                         "examples_per_second": s["examples"] / s["seconds"],
                         "examples_per_cpu_second": s["examples"] / s["cpu_seconds"],
                         "source_tokens_per_example": s["source_tokens"] / s["examples"],
                         "ms_per_step": 1000 * s["seconds"] / steps,
                         "loss_first": s["losses"][0], "loss_last": s["losses"][-1]}
        r = results[mode]
        print(f"{mode:14s} {r['examples_per_second']:7.0f} examples/s "
              f"({r['examples_per_cpu_second']:6.0f} per CPU-second) {r['ms_per_step']:7.1f} ms/step "
              f"{r['source_tokens_per_example']:5.1f} source tokens/example  "
              f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    wall = results["all_positions"]["examples_per_second"] / results["per_example"]["examples_per_second"]
    cpu = (results["all_positions"]["examples_per_cpu_second"]
           / results["per_example"]["examples_per_cpu_second"])
    results["speedup"] = {"wall_clock": wall, "cpu_time": cpu}
    print(f"({source}; {cfg.batch_size} examples per step, {results['timed_steps']} timed steps "
          f"per mode, {results['threads']} threads, {precision})")
    print(f"speed-up all_positions / per_example: {wall:.2f}x wall-clock, {cpu:.2f}x CPU time")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/beauty",
                        help="run directory with sequences.parquet + semantic_ids (default: %(default)s)")
    parser.add_argument("--synthetic", action="store_true",
                        help="measure on a synthetic run (tiger_ray.testing.synthetic) made in a "
                             "temporary directory instead of --run")
    parser.add_argument("--users", type=int, default=22363, help="--synthetic: users (Beauty's count)")
    parser.add_argument("--items", type=int, default=12101, help="--synthetic: items (Beauty's count)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("--batch-size", type=int, default=CPU_PRESET["batch_size"],
                        help="examples per step, both modes (default: the cpu preset's)")
    parser.add_argument("--threads", type=int, default=CPU_PRESET["torch_threads"],
                        help="torch threads (default: the cpu preset's per worker)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:  # the run's files are read while it exists
        if args.synthetic:
            run = synthetic_run(Path(tmp) / "run", args.users, args.items)
            source = f"synthetic run ({args.users} users, {args.items} items)"
        else:
            run = RunDir(args.run)
            source = str(run.root)
        results = measure(run, source, args)
    if args.json:
        atomic.write_json(args.json, results)  # creates the directory, writes via a temp name
    return 0


if __name__ == "__main__":
    sys.exit(main())
