"""How the whole system scales with the catalog: synthetic catalogs of N items, every stage.

    python benchmarks/bench_scale.py --items 12000,100000,1000000 --out runs/scale
    python benchmarks/bench_scale.py --items 10000000 --out runs/scale --json runs/scale/10m.json

For each N: `tiger synth` (users = N / 2 by default, 64-d embeddings), then every stage as its own
`tiger` command with step-bounded training (scaling, not quality, is measured here), each run as a
subprocess whose whole process tree (driver, raylet, Ray workers and actors) is sampled for peak
RSS. Reported per N and stage: wall time, time per item, peak RSS of every process kind; per
artifact: bytes per item; TIGER batch-1 decode latency p50/p99 (the same 200 histories decoded one
at a time, in a fresh process that opens the run's memory-mapped index); IVF-PQ recall@10 against
exact search on sampled queries. The reference for every ratio is the smallest N of the same run
(12k = a Beauty-size catalog): decode latency at N / at the smallest N should stay near 1, time per
item should stay flat (linear total time), and no process may exceed --rss-limit-gib.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tiger_ray.testing.memory import PeakMemorySampler  # noqa: E402

TIGER = [sys.executable, "-m", "tiger_ray.cli"]


def stage_commands(run: Path, n_items: int, n_users: int, dim: int, steps: int,
                   eval_users: int, rqvae_steps: int, rqvae_sample: int) -> list[tuple[str, list[str]]]:
    """The pipeline at scale: step-bounded trainings, evaluation on a user sample."""
    r = ["--run", str(run)]
    return [
        ("synth", [*TIGER, "synth", "--items", str(n_items), "--users", str(n_users),
                   "--dim", str(dim), "--out", str(run)]),
        # The paper's RQ-VAE trained on a fixed-size sample for a fixed number of steps; every
        # item is then assigned by the Ray Data pass.
        ("train-rqvae", [*TIGER, "train-rqvae", *r, "--preset", "cpu", "--train-sample", str(rqvae_sample),
                         "--steps", str(rqvae_steps)]),
        ("train-seq2seq", [*TIGER, "train-seq2seq", *r, "--preset", "cpu", "--max-steps", str(steps),
                           "--eval-every", str(steps), "--val-users", "500"]),
        ("evaluate-tiger", [*TIGER, "evaluate", *r, "--model", "tiger", "--split", "test",
                            "--limit", str(eval_users), "--workers", "1"]),
        ("train-baseline", [*TIGER, "train-baseline", *r, "--preset", "cpu", "--data", "stream",
                            "--loss", "in_batch", "--epochs", "1", "--steps-per-epoch", str(steps),
                            "--valid-users", "2000", "--index-type", "ivfpq", "--ivf-shards", "2",
                            "--ivf-refine", "2"]),
        ("evaluate-ann", [*TIGER, "evaluate", *r, "--model", "ann", "--split", "test",
                          "--limit", str(eval_users), "--workers", "1"]),
    ]


DECODE_SCRIPT = r"""
import json, sys, time
import numpy as np
from tiger_ray.runs import RunDir
from tiger_ray.data.schema import iter_batches
from tiger_ray.seq2seq.retriever import load_retriever
import torch
torch.set_num_threads(1)
run = RunDir(sys.argv[1]); n = int(sys.argv[2])
histories, users = [], []
for batch in iter_batches(run.sequences, ["user_id", "item_ids"], 1024):
    for u, seq in zip(batch.column("user_id").to_pylist(), batch.column("item_ids").to_pylist()):
        histories.append(np.asarray(seq[:-1], dtype=np.int64)); users.append(u)
        if len(histories) == n: break
    if len(histories) == n: break
t0 = time.perf_counter(); retriever = load_retriever(run); load_s = time.perf_counter() - t0
retriever.recommend(histories[:5], np.array(users[:5]), 10)  # warm-up
times = []
for h, u in zip(histories, users):
    t0 = time.perf_counter(); retriever.recommend([h], np.array([u]), 10); times.append(time.perf_counter() - t0)
times = np.array(times) * 1000
print(json.dumps({"decode_p50_ms": float(np.percentile(times, 50)), "decode_p99_ms": float(np.percentile(times, 99)),
                  "queries": len(times), "load_seconds": load_s}))
"""


def run_measured(name: str, command: list[str], log_path: Path) -> dict:
    """Run one stage as a subprocess; wall time and peak RSS of its whole process tree."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        with PeakMemorySampler(process.pid, interval=0.25) as peaks:
            code = process.wait()
    seconds = time.perf_counter() - start
    result = {"stage": name, "seconds": seconds, "exit_code": code,
              "peak_rss_bytes": peaks.by_label(), "max_process_rss_bytes": peaks.max_bytes,
              # without shared pages (object store, memory-mapped files): what a process owns
              "peak_private_bytes": peaks.by_label(private=True),
              "max_process_private_bytes": peaks.max_private_bytes}
    if code != 0:
        tail = log_path.read_text().splitlines()[-20:]
        raise RuntimeError(f"{name} failed ({code}); {log_path}:\n" + "\n".join(tail))
    return result


def artifact_bytes(run: Path, n_items: int) -> dict[str, float]:
    """Bytes per item of each top-level artifact (files and folders of the run)."""
    out = {}
    for entry in sorted(run.iterdir()):
        if entry.name in ("logs",):
            continue
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        out[entry.name] = sum(p.stat().st_size for p in files) / n_items
    index = run / "baseline" / "index-ivfpq"
    if index.is_dir():
        out["baseline/index-ivfpq"] = sum(p.stat().st_size for p in index.rglob("*") if p.is_file()) / n_items
    for name in ("codes.npy", "index_keys.npy", "index_items.npy"):  # the <= 16 B/item goal
        path = run / "semantic_ids" / name
        if path.exists():
            out[f"semantic_ids/{name}"] = path.stat().st_size / n_items
    return out


def measure(n_items: int, args) -> dict:
    run = Path(args.out) / f"n{n_items}"
    logs = Path(args.out) / "logs" / f"n{n_items}"
    logs.mkdir(parents=True, exist_ok=True)
    if run.exists() and not (args.keep or args.measure_only):
        import shutil

        shutil.rmtree(run)
    n_users = max(1000, int(n_items * args.users_per_item))
    stages = []
    previous = Path(args.out) / f"n{n_items}.json"
    if (args.measure_only or args.stages) and previous.exists():
        # Keep the stage figures already measured on this run; stages run now replace theirs.
        stages = [s for s in json.loads(previous.read_text()).get("stages", [])
                  if not args.stages or s["stage"] not in args.stages]
    commands = [] if args.measure_only else stage_commands(
        run, n_items, n_users, args.dim, args.steps, args.eval_users, args.rqvae_steps, args.rqvae_sample)
    if args.stages:
        commands = [(name, command) for name, command in commands if name in args.stages]
    for name, command in commands:
        print(f"[N={n_items:,}] {name}: {' '.join(command)}", flush=True)
        stages.append(run_measured(name, command, logs / f"{name}.log"))
        s = stages[-1]
        print(f"[N={n_items:,}] {name}: {s['seconds']:.1f} s, max process RSS "
              f"{s['max_process_rss_bytes'] / 2**30:.2f} GiB (private "
              f"{s['max_process_private_bytes'] / 2**30:.2f} GiB)", flush=True)
    decode = subprocess.run([sys.executable, "-c", DECODE_SCRIPT, str(run), "200"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    if decode.returncode != 0:
        raise RuntimeError(f"decode latency failed:\n{decode.stderr[-3000:]}")
    metrics = {}
    for model in ("tiger", "ann"):
        path = run / "eval" / model / "test" / "metrics.json"
        if path.exists():
            metrics[model] = json.loads(path.read_text())
    baseline_summary = run / "baseline" / "summary.json"
    result = {"items": n_items, "users": n_users, "dim": args.dim, "stages": stages,
            "bytes_per_item": artifact_bytes(run, n_items),
            "decode": json.loads(decode.stdout.strip().splitlines()[-1]),
            "metrics": metrics,
            "ann_index": (json.loads(baseline_summary.read_text()).get("index")
                          if baseline_summary.exists() else None)}
    from tiger_ray import atomic

    atomic.write_json(Path(args.out) / f"n{n_items}.json", result)  # each N as soon as it is done
    return result


def summarize(results: list[dict], rss_limit: float) -> list[str]:
    ref = results[0]
    lines = ["| N | stage | seconds | us/item | max process RSS (GiB) | largest process |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for s in r["stages"]:
            label, peak = next(iter(s["peak_rss_bytes"].items()))
            lines.append(f"| {r['items']:,} | {s['stage']} | {s['seconds']:.1f} | "
                         f"{1e6 * s['seconds'] / r['items']:.1f} | {peak / 2**30:.2f} | {label} |")
    lines += ["", "| N | decode p50 (ms) | p99 (ms) | p50 vs smallest N | semantic_ids B/item | "
              "IVF-PQ recall@10 vs exact | IVF-PQ B/item | max RSS any process (GiB) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        sid = sum(v for k, v in r["bytes_per_item"].items() if k.startswith("semantic_ids/"))
        worst = max((s["max_process_rss_bytes"] for s in r["stages"]), default=0) / 2**30
        flag = "" if worst <= rss_limit else " (over limit)"
        index = r.get("ann_index") or {}
        recall = next((v for k, v in index.items() if k.startswith("ann_recall@")), float("nan"))
        index_bytes = sum(v for k, v in r["bytes_per_item"].items() if k == "baseline/index-ivfpq")
        lines.append(f"| {r['items']:,} | {r['decode']['decode_p50_ms']:.1f} | "
                     f"{r['decode']['decode_p99_ms']:.1f} | "
                     f"{r['decode']['decode_p50_ms'] / ref['decode']['decode_p50_ms']:.2f}x | "
                     f"{sid:.1f} | {recall:.3f} | {index_bytes:.1f} | {worst:.2f}{flag} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="12000,100000,1000000",
                        help="comma-separated catalog sizes; the first is the reference")
    parser.add_argument("--users-per-item", type=float, default=0.5)
    parser.add_argument("--dim", type=int, default=64, help="synthetic embedding dimension")
    parser.add_argument("--steps", type=int, default=200,
                        help="seq2seq and dual-encoder training steps")
    # At 1M+ items, 600 steps on 65,536 items left one prefix with 473 items (over the 256 cap of
    # the collision token); 1,200 steps on 262,144 left at most 212 (synth with 400 items a leaf).
    parser.add_argument("--rqvae-steps", type=int, default=1200, help="RQ-VAE training steps")
    parser.add_argument("--rqvae-sample", type=int, default=262_144,
                        help="items the RQ-VAE trains on (all of them below this)")
    parser.add_argument("--eval-users", type=int, default=2000)
    parser.add_argument("--out", default="runs/scale")
    parser.add_argument("--json", default=None, help="write all figures here")
    parser.add_argument("--keep", action="store_true", help="reuse existing run directories")
    parser.add_argument("--measure-only", action="store_true",
                        help="run no stage: decode latency, bytes/item and metrics of existing runs")
    parser.add_argument("--rss-limit-gib", type=float, default=4.0)
    parser.add_argument("--stages", default=None, help="comma-separated stages to run (default: "
                        "all), e.g. synth,train-rqvae,train-seq2seq,evaluate-tiger for TIGER only")
    args = parser.parse_args(argv)
    if args.stages:
        known = [name for name, _ in stage_commands(Path("."), 1, 1, 1, 1, 1, 1, 1)]
        args.stages = args.stages.split(",")
        unknown = [s for s in args.stages if s not in known]
        if unknown:
            parser.error(f"--stages: unknown {unknown}; choose from {known}")
    sizes = [int(float(s)) for s in args.items.split(",")]
    results = [measure(n, args) for n in sizes]
    for line in summarize(results, args.rss_limit_gib):
        print(line)
    if args.json:
        from tiger_ray import atomic

        atomic.write_json(args.json, {"results": results, "argv": sys.argv})
    worst = max((s["max_process_rss_bytes"] for r in results for s in r["stages"]), default=0) / 2**30
    return 0 if worst <= args.rss_limit_gib else 1


if __name__ == "__main__":
    sys.exit(main())
