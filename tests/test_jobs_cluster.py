"""The jobs on a real Ray cluster: a local head on 127.0.0.1 (`ray start --head`, its own temp dir,
free ports, its own auth token), jobs sent with `ray job submit` exactly as the README shows, a run
kept at a file:// URI, and only this head stopped afterwards."""

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
    env.pop("RAY_ADDRESS", None)
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


def test_pipeline_jobs_on_a_local_head(ray_head, tmp_path):
    from tiger_ray.pipeline import STAGES

    sequences, items = write_dataset(tmp_path / "data")
    remote = tmp_path / "bucket" / "runs" / "synthetic"
    location = f"file://{remote}"

    # One stage on its own, then the pipeline continues the same run from the URI.
    submission, result = submit(ray_head, "jobs/prepare.py", "--dataset", "synthetic", "--format",
                                "sequences", "--sequences", str(sequences), "--items", str(items),
                                "--run", location, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert job_status(ray_head, submission) == "SUCCEEDED"
    assert pq.read_table(remote / "sequences.parquet").num_rows == 96

    submission, result = submit(ray_head, "jobs/pipeline.py", "--preset", "tiny", "--dataset",
                                "synthetic", "--run", location, "--no-serve-demo", timeout=1500)
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-6000:]
    assert job_status(ray_head, submission) == "SUCCEEDED"
    assert "[prepare] already complete" in logs  # the staged copy held the first job's output
    assert "files downloaded" in logs and "uploaded" in logs

    run = RunDir(remote)
    for stage in STAGES:
        assert stage.done(run).exists(), f"{stage.name}: {stage.done(run)} missing at {location}"
    for model in ("tiger", "ann"):
        metrics = json.loads((run.eval_dir(model, "test") / "metrics.json").read_text())
        values = [v for k, v in metrics.items() if k.startswith(("recall", "ndcg"))]
        assert values and all(0.0 <= v <= 1.0 for v in values), metrics


def test_a_relative_run_is_refused_inside_a_job(ray_head):
    submission, result = submit(ray_head, "jobs/prepare.py", "--dataset", "beauty", "--run",
                                "runs/beauty", timeout=300)
    assert result.returncode != 0
    assert "relative path" in result.stdout + result.stderr
    assert job_status(ray_head, submission) == "FAILED"
