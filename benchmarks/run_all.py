"""`make bench`: every ratio benchmark that needs no running service, one after the other.

    python benchmarks/run_all.py                       # on runs/beauty (after `make demo`)
    python benchmarks/run_all.py --run runs/toys

Each benchmark measures ours against a reference in the same run and writes its figures to
RUN/benchmarks/<name>.json. The serving load test needs a live endpoint (`tiger serve`), so it is
run by hand: see benchmarks/load_test.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, extra arguments); each script takes --run and --json.
BENCHMARKS = {
    "embed_vs_sentence_transformers": ("bench_embed.py", []),
    "seq2seq_vs_hf_t5": ("bench_seq2seq_vs_t5.py", []),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/beauty", help="a run directory the pipeline has filled")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append",
                        help="run just this benchmark (repeatable)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if not (run / "sequences.parquet").exists():
        parser.error(f"{run}: no sequences.parquet; run `make demo` (or `tiger pipeline`) first")
    out = run / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only or BENCHMARKS:
        script, extra = BENCHMARKS[name]
        command = [sys.executable, str(HERE / script), "--run", str(run), "--json",
                   str(out / f"{name}.json"), *extra]
        print(f"== {name}: {' '.join(command)}", flush=True)
        if subprocess.call(command) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
