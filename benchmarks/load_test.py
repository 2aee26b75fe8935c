"""Load test of the recommendation API: QPS, latency percentiles and errors, per model and concurrency.

Sends real histories (the test split of a run, cycled) to POST /recommend at a fixed concurrency
for a fixed number of requests, after a short warm-up that is not counted, for every model and
concurrency given, in one run:

    tiger serve --run runs/beauty &                      # 127.0.0.1:8000
    python benchmarks/load_test.py --run runs/beauty --concurrency 1,32 --requests 2000 \\
        --json runs/beauty/serving/load_test.json

A request is an error unless it returns 200 with k items; latency is measured at the client,
from sending the request to the parsed response. Traffic is bounded by --requests and
--max-seconds per (model, concurrency); only loopback URLs are accepted unless --allow-remote.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiger_ray.serving.client import LOOPBACK_HOSTS  # noqa: E402  (the client's own rule)


@dataclass
class LoadResult:
    model: str
    concurrency: int
    requests: int  # counted requests completed (errors included)
    errors: int
    seconds: float
    qps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    mean_batch_size: float  # how many requests the model replica answered together, on average
    error_examples: list[str]


def real_histories(run_dir: str | Path, split: str = "test", max_history: int = 50,
                   limit: int = 5000) -> tuple[list[list[int]], list[int]]:
    """(histories, user ids) of the first ``limit`` users of a split, most recent items kept."""
    from tiger_ray.data.schema import read_sequences
    from tiger_ray.data.split import build_examples
    from tiger_ray.runs import RunDir

    run = RunDir(run_dir)
    examples = build_examples(read_sequences(run.require(run.sequences, "tiger prepare")), split,
                              max_history=max_history)
    n = min(limit, len(examples))
    return ([examples.history(i).tolist() for i in range(n)],
            examples.user_ids[:n].astype(int).tolist())


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies) * 1000.0, q)) if latencies else float("nan")


async def drive(url: str, model: str, histories: list[list[int]], user_ids: list[int], *,
                concurrency: int, count: int, k: int = 10, warmup: int = 0,
                max_seconds: float = 600.0, timeout_s: float = 60.0) -> LoadResult:
    """``count`` requests (after ``warmup``) from ``concurrency`` concurrent senders."""
    import aiohttp

    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []
    next_index = 0
    deadline = 0.0

    async def one(session: aiohttp.ClientSession, i: int, record: bool) -> None:
        j = i % len(histories)
        body = {"history": histories[j], "user_id": user_ids[j], "k": k, "model": model}
        start = time.perf_counter()
        try:
            async with session.post(url + "/recommend", json=body) as response:
                payload = await response.json(content_type=None)
                ok = response.status == 200 and len(payload.get("items", [])) == k
                problem = None if ok else f"HTTP {response.status}: {str(payload)[:200]}"
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:
            payload, problem = {}, f"{type(err).__name__}: {err}"
        elapsed = time.perf_counter() - start
        if record:
            latencies.append(elapsed)
            if problem:
                errors.append(problem)
            else:
                batch_sizes.append(int(payload.get("batch_size", 0)))

    async def sender(session: aiohttp.ClientSession, total: int, record: bool) -> None:
        nonlocal next_index
        while next_index < total and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            await one(session, i, record)

    async def phase(session: aiohttp.ClientSession, total: int, record: bool) -> float:
        nonlocal next_index, deadline
        next_index = 0
        start = time.perf_counter()
        deadline = start + max_seconds
        await asyncio.gather(*(sender(session, total, record) for _ in range(concurrency)))
        return time.perf_counter() - start

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        await phase(session, warmup, record=False)
        seconds = await phase(session, count, record=True)
    n = len(latencies)
    return LoadResult(
        model=model, concurrency=concurrency, requests=n, errors=len(errors), seconds=seconds,
        qps=n / seconds if seconds > 0 else 0.0,
        p50_ms=percentile_ms(latencies, 50), p95_ms=percentile_ms(latencies, 95),
        p99_ms=percentile_ms(latencies, 99),
        mean_ms=float(np.mean(latencies) * 1000.0) if n else float("nan"),
        max_ms=float(np.max(latencies) * 1000.0) if n else float("nan"),
        mean_batch_size=float(np.mean(batch_sizes)) if batch_sizes else 0.0,
        error_examples=sorted(set(errors))[:5])


def run_load_test(url: str, run_dir: str | Path, models: list[str], concurrencies: list[int],
                  count: int, k: int = 10, warmup: int = 20, max_seconds: float = 600.0,
                  split: str = "test", allow_remote: bool = False) -> list[LoadResult]:
    host = urlparse(url).hostname
    if host not in LOOPBACK_HOSTS and not allow_remote:
        raise ValueError(f"--url {url}: only loopback hosts ({', '.join(sorted(LOOPBACK_HOSTS))}) "
                         f"unless --allow-remote")
    histories, user_ids = real_histories(run_dir, split)
    if not histories:
        raise ValueError(f"{run_dir}: no {split} users to take histories from")
    results = []
    for model in models:
        for concurrency in concurrencies:
            result = asyncio.run(drive(url.rstrip("/"), model, histories, user_ids,
                                       concurrency=concurrency, count=count, k=k,
                                       warmup=min(warmup, count), max_seconds=max_seconds))
            print(format_row(result), flush=True)
            results.append(result)
    return results


HEADER = (f"{'model':<6} {'conc':>4} {'requests':>8} {'errors':>6} {'QPS':>8} {'p50 ms':>8} "
          f"{'p95 ms':>8} {'p99 ms':>8} {'batch':>6}")


def format_row(r: LoadResult) -> str:
    return (f"{r.model:<6} {r.concurrency:>4} {r.requests:>8} {r.errors:>6} {r.qps:>8.1f} "
            f"{r.p50_ms:>8.1f} {r.p95_ms:>8.1f} {r.p99_ms:>8.1f} {r.mean_batch_size:>6.1f}")


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"comma-separated positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    parser.add_argument("--run", required=True, help="run directory to take real histories from")
    parser.add_argument("--models", default="tiger,ann", help="comma-separated models to drive")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 32],
                        help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=2000, help="counted requests per level")
    parser.add_argument("--warmup", type=int, default=20, help="uncounted requests per level first")
    parser.add_argument("--k", type=int, default=10, help="items per request")
    parser.add_argument("--split", choices=["valid", "test"], default="test",
                        help="whose histories to send")
    parser.add_argument("--max-seconds", type=float, default=600.0,
                        help="stop a level after this long even if --requests are not done")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    parser.add_argument("--json", "--out", dest="out", default=None,
                        help="also write the results as JSON here (--out: the old name)")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be >= 1")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    print(HEADER, flush=True)
    results = run_load_test(args.url, args.run, models, args.concurrency, args.requests, k=args.k,
                            warmup=args.warmup, max_seconds=args.max_seconds, split=args.split,
                            allow_remote=args.allow_remote)
    if args.out:
        from tiger_ray import atomic

        atomic.write_json(args.out, {"url": args.url, "run": str(args.run), "k": args.k,
                                     "results": [asdict(r) for r in results]})
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
