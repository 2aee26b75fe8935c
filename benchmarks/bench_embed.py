"""Catalog embedding throughput: the `tiger embed` Ray Data pipeline against plain
``SentenceTransformer.encode`` in one process, same items, same model, same cores, one run.

The pipeline runs ``run_embed`` end to end on an already started loopback Ray (as a submitted job
finds its cluster): reading items.parquet, starting the actor pool and loading the model in every
actor, encoding, writing the shards and the manifest. The baseline is a fresh Python process that
imports sentence-transformers, loads the model and calls ``encode`` once over all texts (which
sorts them by length itself); its import + load and its encode are timed separately, and we report
the pipeline against both: against ``encode`` alone (every fixed cost of Ray counts against the
pipeline) and against the whole plain script. Torch threads are equal in total:
``workers x threads_per_worker`` for the pipeline, the same number for the baseline. The two
alternate ``--repeats`` times and the medians are compared, because other processes on a shared
machine slow whichever happens to run beside them.

    python benchmarks/bench_embed.py --run runs/beauty                 # all 12,101 Beauty items
    python benchmarks/bench_embed.py --run runs/beauty --limit 3000    # a subset: the first 3,000
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tiger_ray import atomic  # noqa: E402
from tiger_ray.embedding.encoder import DEFAULT_MODEL  # noqa: E402
from tiger_ray.embedding.ray_embed import PRESETS, EmbedConfig, run_embed  # noqa: E402
from tiger_ray.embedding.store import load_embeddings  # noqa: E402
from tiger_ray.ray_env import ray_session  # noqa: E402
from tiger_ray.runs import RunDir  # noqa: E402


def subset_run(items: Path, limit: int | None, root: Path) -> RunDir:
    """A scratch run directory holding the first ``limit`` items (all if None)."""
    table = pq.read_table(items)
    if limit is not None:
        table = table.slice(0, limit)
    run = RunDir(root)
    run.root.mkdir(parents=True, exist_ok=True)
    atomic.write_parquet(run.items, table)
    return run


def baseline_process(items: Path, model: str, batch_size: int, normalize: bool, threads: int,
                     out: Path) -> None:
    """Body of the baseline process (``--baseline-out``): plain sentence-transformers, no tiger_ray."""
    start = time.perf_counter()
    import torch
    from sentence_transformers import SentenceTransformer

    from tiger_ray.embedding.encoder import _load_target

    torch.set_num_threads(threads)
    texts = pq.read_table(items, columns=["text"]).column("text").to_pylist()
    encoder = SentenceTransformer(_load_target(model)[0], device="cpu", local_files_only=True)
    loaded = time.perf_counter()
    vectors = encoder.encode(texts, batch_size=batch_size, normalize_embeddings=normalize,
                             convert_to_numpy=True, show_progress_bar=False)
    done = time.perf_counter()
    np.save(out, vectors.astype(np.float32))
    atomic.write_json(out.with_suffix(".json"), {"load_s": loaded - start, "encode_s": done - loaded})


def time_baseline(run: RunDir, config: EmbedConfig, threads: int, scratch: Path) -> tuple[dict, np.ndarray]:
    out = scratch / "baseline.npy"
    subprocess.run([sys.executable, __file__, "--run", str(run.root), "--model", config.model,
                    "--batch-size", str(config.batch_size), "--baseline-threads", str(threads),
                    "--baseline-out", str(out)], check=True)
    return atomic.read_json(out.with_suffix(".json")), np.load(out)


def time_pipeline(run: RunDir, config: EmbedConfig) -> dict:
    shutil.rmtree(run.embeddings, ignore_errors=True)  # encode everything, every repeat
    start = time.perf_counter()
    summary = run_embed(run, config)
    seconds = time.perf_counter() - start
    assert summary["items"] == summary["encoded"] + summary["copied_duplicates"]
    return {"total_s": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/beauty", help="run directory with items.parquet")
    parser.add_argument("--limit", type=int, default=None, help="only the first N items")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--workers", type=int, default=PRESETS["cpu"]["workers"])
    parser.add_argument("--threads-per-worker", type=int, default=PRESETS["cpu"]["threads_per_worker"])
    parser.add_argument("--batch-size", type=int, default=PRESETS["cpu"]["batch_size"])
    parser.add_argument("--shard-size", type=int, default=PRESETS["cpu"]["shard_size"])
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of both")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--baseline-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--baseline-threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_out:  # we are the baseline process
        baseline_process(RunDir(args.run).items, args.model, args.batch_size, True,
                         args.baseline_threads, args.baseline_out)
        return 0

    config = EmbedConfig(**{**PRESETS["cpu"], "model": args.model, "workers": args.workers,
                            "threads_per_worker": args.threads_per_worker,
                            "batch_size": args.batch_size, "shard_size": args.shard_size})
    threads = args.workers * args.threads_per_worker
    scratch = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    try:
        run = subset_run(RunDir(args.run).require(RunDir(args.run).items, "tiger prepare"),
                         args.limit, scratch / "run")
        texts = pq.read_table(run.items, columns=["text"]).column("text").to_pylist()
        n = len(texts)
        print(f"{n} items, model {args.model}, {threads} torch threads in total "
              f"(pipeline: {args.workers} actors x {args.threads_per_worker}; baseline: 1 process x "
              f"{threads}), batch {args.batch_size}, shard {args.shard_size}, {os.cpu_count()} cores")
        baseline, pipeline = [], []
        with ray_session(num_cpus=os.cpu_count()):
            for round_ in range(args.repeats):
                b, vectors = time_baseline(run, config, threads, scratch)
                baseline.append(b)
                pipeline.append(time_pipeline(run, config))
                print(f"round {round_ + 1}: baseline encode {b['encode_s']:.1f} s (+{b['load_s']:.1f} s "
                      f"import + load), pipeline {pipeline[-1]['total_s']:.1f} s end to end", flush=True)
        _, ray_vectors = load_embeddings(run)
        max_diff = float(np.abs(ray_vectors - vectors).max())

        base_s = statistics.median(b["encode_s"] for b in baseline)
        base_total_s = statistics.median(b["encode_s"] + b["load_s"] for b in baseline)
        pipe_s = statistics.median(p["total_s"] for p in pipeline)
        result = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "cores": os.cpu_count(), "items": n, "model": args.model,
            "torch_threads_total": threads, "workers": args.workers, "batch_size": args.batch_size,
            "shard_size": args.shard_size, "repeats": args.repeats,
            "baseline_encode_items_per_s": round(n / base_s, 1),
            "baseline_load_and_encode_items_per_s": round(n / base_total_s, 1),
            "pipeline_items_per_s": round(n / pipe_s, 1),
            "ratio": round(base_s / pipe_s, 3),
            "ratio_vs_load_and_encode": round(base_total_s / pipe_s, 3),
            "max_abs_diff_vs_baseline": max_diff,
            "rounds": {"baseline": baseline, "pipeline": pipeline},
        }
        print(f"\nplain SentenceTransformer.encode: {result['baseline_encode_items_per_s']} items/s "
              f"({result['baseline_load_and_encode_items_per_s']} counting import + model load)")
        print(f"tiger embed pipeline (end to end): {result['pipeline_items_per_s']} items/s")
        print(f"ratio pipeline / plain encode: {result['ratio']:.3f}x "
              f"({result['ratio_vs_load_and_encode']:.3f}x against import + load + encode); "
              f"max |difference| of the vectors {max_diff:.2e}")
        if args.json:
            atomic.write_json(args.json, result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
