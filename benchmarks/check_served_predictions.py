"""Does the HTTP service answer what `tiger evaluate` ranked? Same model, same users, same beam.

For the first --users users of a split, sends each user's evaluation history (and user id) to
POST /recommend and compares the ranked item ids with RUN/eval/<model>/<split>/predictions.parquet:

    tiger serve --run runs/beauty &
    python benchmarks/check_served_predictions.py --run runs/beauty --models tiger,ann --users 200 \\
        --json runs/beauty/serving/served_vs_evaluated.json

Exit code 1 if any list differs. Only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from load_test import real_histories  # noqa: E402

from tiger_ray.serving.client import LOOPBACK_HOSTS  # noqa: E402


def check(url: str, run_dir: str, model: str, split: str, users: int) -> dict:
    from tiger_ray.runs import RunDir
    from tiger_ray.serving.client import TigerClient

    run = RunDir(run_dir)
    path = run.eval_dir(model, split) / "predictions.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: run `tiger evaluate --run {run_dir} --model {model} "
                                f"--split {split}` first")
    table = pq.read_table(path, columns=["user_id", "item_ids"]).to_pydict()
    evaluated = dict(zip(table["user_id"], table["item_ids"]))
    histories, user_ids = real_histories(run_dir, split, limit=users)
    same, differ = 0, []
    with TigerClient(url, timeout=120.0) as client:
        for history, user_id in zip(histories, user_ids):
            expected = [i for i in evaluated[user_id] if i > 0]
            answer = client.recommend(history, k=len(evaluated[user_id]), model=model, user_id=user_id)
            served = [item["item_id"] for item in answer["items"]]
            if served == expected:
                same += 1
            else:
                differ.append({"user_id": user_id, "served": served, "evaluated": expected})
    return {"model": model, "split": split, "users": len(user_ids), "identical": same,
            "differences": differ[:10]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    parser.add_argument("--run", required=True, help="the run directory the service was started on")
    parser.add_argument("--models", default="tiger,ann", help="comma-separated models to check")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--users", type=int, default=200, help="how many users (the split's first N)")
    parser.add_argument("--json", "--out", dest="out",
                        help="also write the results to this JSON file (--out: the old name)")
    args = parser.parse_args(argv)
    if urlparse(args.url).hostname not in LOOPBACK_HOSTS:
        parser.error(f"--url {args.url}: only loopback addresses are checked")
    results = [check(args.url, args.run, m.strip(), args.split, args.users) for m in args.models.split(",")]
    for r in results:
        print(f"{r['model']:6s} {r['split']}: {r['identical']}/{r['users']} served lists identical "
              f"to tiger evaluate's predictions")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["identical"] == r["users"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
