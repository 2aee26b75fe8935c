"""The jobs on a real Ray cluster: a local head on 127.0.0.1 (`ray start --head`, its own temp dir,
free ports, its own auth token), jobs sent with `ray job submit` exactly as the README shows, a run
kept at a file:// URI, and only this head stopped afterwards.

The pipeline job runs every stage; evaluate and compare run again as their own entrypoints, and
the job's run directory is checked against the one `tiger pipeline` (the README's main job)
writes from the same input.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tiger_ray.runs import RunDir

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).parent / "ray")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"tiger_jobs_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


local_head = _load("local_head")


@pytest.fixture(scope="module")
def ray_head():
    # Short, private temp dir: Ray's Unix sockets live below it, and `stop` finds our processes by it.
    temp_dir = Path(tempfile.mkdtemp(prefix="tg-", dir="/tmp"))
    head = local_head.start(temp_dir, num_cpus=2, object_store_mb=256)
    try:
        yield head
    finally:
        left = local_head.stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes of {temp_dir} still running: {left}"


def ray_cli(head, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, **head.client_env}
    # Not the Ray of this process (the session's embedded one), nor a token overriding this head's.
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    return subprocess.run([RAY_CLI, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def submit(head, *entrypoint: str, timeout: float) -> tuple[str, subprocess.CompletedProcess]:
    """`ray job submit` as the README shows it; waits, following the logs. Returns (id, result)."""
    submission_id = f"tiger-test-{uuid.uuid4().hex[:8]}"
    try:
        result = ray_cli(head, "job", "submit", "--address", head.dashboard_url,
                         "--submission-id", submission_id, "--working-dir", ".",
                         "--runtime-env", "jobs/runtime_env.yaml", "--", "python", *entrypoint,
                         timeout=timeout)
    except subprocess.TimeoutExpired:
        ray_cli(head, "job", "stop", "--address", head.dashboard_url, submission_id)
        raise
    return submission_id, result


def job_status(head, submission_id: str) -> str:
    return local_head.job_info(head, submission_id)["status"]


def write_dataset(folder: Path) -> tuple[Path, Path]:
    """The synthetic learnable catalog as a user would bring it: `tiger prepare --format sequences`."""
    from tiger_ray.testing.synthetic import make_synthetic_run

    run = make_synthetic_run(folder / "source")
    sequences, items = folder / "sequences.txt", folder / "items.jsonl"
    with sequences.open("w") as out:
        for row in pq.read_table(run.sequences).to_pylist():
            out.write(f"user{row['user_id']} " + " ".join(f"sku{i}" for i in row["item_ids"]) + "\n")
    with items.open("w") as out:
        for row in pq.read_table(run.items).to_pylist():
            out.write(json.dumps({"item_id": f"sku{row['item_id']}", "title": row["title"],
                                  "brand": row["brand"], "price": row["price"],
                                  "categories": row["categories"]}) + "\n")
    return sequences, items


def submit_ok(head, *entrypoint: str, timeout: float = 600) -> str:
    """Submit, wait, and return the job's logs; fails the test unless the job SUCCEEDED."""
    submission, result = submit(head, *entrypoint, timeout=timeout)
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-6000:]
    assert job_status(head, submission) == "SUCCEEDED", logs[-6000:]
    return logs


def test_pipeline_jobs_on_a_local_head(ray_head, tmp_path):
    """prepare as its own job, then the whole tiny pipeline as one job on a run kept at a file://
    URI; evaluate and compare again as their own entrypoints; and the same run directory as the
    README's main job (`tiger pipeline` on an embedded Ray) would have written."""
    from tiger_ray.pipeline import STAGES

    sequences, items = write_dataset(tmp_path / "data")
    source = ["--dataset", "synthetic", "--format", "sequences", "--sequences", str(sequences),
              "--items", str(items)]
    remote = tmp_path / "bucket" / "runs" / "synthetic"
    run = RunDir(remote)
    location = f"file://{remote}"
    # A kept working copy, as cluster.yaml's $TIGER_STAGE_DIR on the shared mount.
    stage_dir = ["--stage-dir", str(tmp_path / "stage")]

    submit_ok(ray_head, "jobs/prepare.py", *source, "--run", location, *stage_dir)
    assert pq.read_table(run.sequences).num_rows == 96

    logs = submit_ok(ray_head, "jobs/pipeline.py", "--preset", "tiny", *source, "--run", location,
                     "--no-serve-demo", *stage_dir, timeout=1500)
    # The kept copy already held the first job's output: nothing to download, prepare skipped.
    assert "0 files downloaded, 3 already there" in logs
    assert "[prepare] already complete" in logs
    assert f"changed files to {location}" in logs
    for stage in STAGES:
        assert stage.done(run).exists(), f"{stage.name}: {stage.done(run)} missing at {location}"
    assert "# TIGER vs dual encoder on synthetic" in logs, logs[-3000:]  # the comparison, printed
    job_layout = run.layout()

    # Evaluation and comparison as their own jobs; a temporary working copy this time.
    for model in ("tiger", "ann"):
        submit_ok(ray_head, "jobs/evaluate.py", "--run", location, "--model", model, "--split", "valid")
        metrics = json.loads((run.eval_dir(model, "valid") / "metrics.json").read_text())
        values = [v for k, v in metrics.items() if k.startswith(("recall", "ndcg"))]
        assert values and all(0.0 <= v <= 1.0 for v in values), metrics
        test_metrics = json.loads((run.eval_dir(model, "test") / "metrics.json").read_text())
        # The synthetic catalog is learnable: well above a random top 10 of its 64 items.
        assert test_metrics["recall@10"] > 2 * 10 / 64, (model, test_metrics)
    submit_ok(ray_head, "jobs/compare.py", "--run", location)
    assert any(run.compare.glob("*.json")) and any(run.compare.glob("*.md"))

    # The README's main job on the same input: an embedded local Ray, a local run directory.
    local = RunDir(tmp_path / "local" / "synthetic")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    result = subprocess.run([sys.executable, "-m", "tiger_ray.cli", "pipeline", "--preset", "tiny",
                             *source, "--run", str(local.root), "--no-serve-demo"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    local_layout = local.layout()
    assert local_layout == job_layout, (
        f"only from the job: {sorted(job_layout - local_layout)}; "
        f"only from `tiger pipeline`: {sorted(local_layout - job_layout)}")


def test_a_relative_run_is_refused_inside_a_job(ray_head):
    submission, result = submit(ray_head, "jobs/prepare.py", "--dataset", "beauty", "--run",
                                "runs/beauty", timeout=300)
    assert result.returncode != 0
    assert "relative path" in result.stdout + result.stderr
    assert job_status(ray_head, submission) == "FAILED"
