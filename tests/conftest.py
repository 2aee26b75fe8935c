"""Shared fixtures: loopback-only Ray, offline hubs, synthetic runs, the shared data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiger_ray.ray_env import apply_env

apply_env(offline=True)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TIGER_DATA_DIR", REPO.parent / "shared" / "datasets" / "amazon2014"))


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session, bound to 127.0.0.1, shut down at the end."""
    import ray

    from tiger_ray.ray_env import init_ray

    # Workers must import functions defined in test modules (train loops, map_batches classes).
    pythonpath = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    started = init_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not (SHARED_DATA / "beauty" / "sequences.txt.gz").exists():
        pytest.skip(f"shared Amazon 2014 data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def synthetic_run(tmp_path):
    from tiger_ray.testing.synthetic import make_synthetic_run

    return make_synthetic_run(tmp_path / "run")
