"""Ray settings in one place: every process we start binds to loopback only.

Ray 2.60 replaces 127.0.0.1 by the machine's own address unless told otherwise; these settings
keep every socket (GCS, raylets, dashboard, Serve) on 127.0.0.1 for local runs. When a cluster
address is given (``RAY_ADDRESS`` or ``address=``), we connect to it and change nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

LOOPBACK = "127.0.0.1"

# Set before `import ray` starts anything; workers inherit them through runtime_env below.
RAY_ENV_VARS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Tests and offline machines: never reach for a model hub.
OFFLINE_ENV_VARS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# Set by init_ray: True when this process started the Ray it uses (loopback, no cluster address),
# so nobody else's work runs on it and cluster-wide actions (shutting Serve down) are ours to take.
_started_local_ray = False


def apply_env(offline: bool = False) -> None:
    """Export the loopback/usage-stats settings (and optionally hub-offline) for this process."""
    for key, value in RAY_ENV_VARS.items():
        os.environ.setdefault(key, value)
    if offline:
        for key, value in OFFLINE_ENV_VARS.items():
            os.environ.setdefault(key, value)


VERBOSE_ENV = "TIGER_VERBOSE"  # set by `tiger --verbose`: workers keep Ray's chatty INFO logs


def worker_env_vars() -> dict[str, str]:
    """Environment that Ray workers must see too (passed as runtime_env env_vars)."""
    keys = [*RAY_ENV_VARS, *OFFLINE_ENV_VARS, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "TIGER_DATA_DIR",
            VERBOSE_ENV]
    return {k: os.environ[k] for k in keys if k in os.environ}


# Ray Train starts a detached "placement group cleaner" beside every training run, which asks the
# State API once a second whether the controller is still alive. The State API is served by the
# dashboard, which the embedded Ray does not start, so every check fails and logs a warning:
# thousands of lines per training run, and nothing lost by silencing them, since on the embedded
# Ray the placement group goes away with the driver anyway.
_TRAIN_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


# Every ray.train.report logs the whole TrainingReport (metrics dict, checkpoint path) at INFO
# from each rank; our loops log one progress line per eval themselves. The logger is named after
# the module's file path.
_TRAIN_REPORT_MODULE = "ray.train.v2._internal.execution.context"


def quiet_train_cleaner_logs() -> None:
    """Worker-process setup hook of the embedded Ray (see ``_TRAIN_CLEANER_LOGGER``); without
    ``tiger --verbose`` it also hides the per-report ``TrainingReport(...)`` dumps."""
    import importlib.util
    import logging

    logging.getLogger(_TRAIN_CLEANER_LOGGER).setLevel(logging.ERROR)
    if os.environ.get(VERBOSE_ENV):
        return
    spec = importlib.util.find_spec(_TRAIN_REPORT_MODULE)
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> bool:
    """Start an embedded loopback-only Ray, or connect to ``address`` / ``RAY_ADDRESS``.

    Returns True if this call started (or connected) Ray, False if it was already initialised,
    so callers know whether they own the shutdown. ``owns_local_ray`` tells the two apart.
    """
    global _started_local_ray
    apply_env()
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = kwargs.pop("runtime_env", {}) or {}
    env_vars = {**worker_env_vars(), **runtime_env.get("env_vars", {})}
    runtime_env = {**runtime_env, "env_vars": env_vars}
    if address:
        # Inside a submitted job the job's runtime_env already carries its env_vars; passing
        # overlapping keys again makes Ray refuse to merge the two, so send only new ones.
        job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
        job_vars = (job_env.get("runtime_env") or {}).get("env_vars") or {}
        runtime_env["env_vars"] = {k: v for k, v in env_vars.items() if k not in job_vars}
        ray.init(address=address, runtime_env=runtime_env, **kwargs)
        _started_local_ray = False
    else:
        if not kwargs.get("include_dashboard"):
            runtime_env.setdefault("worker_process_setup_hook",
                                   "tiger_ray.ray_env.quiet_train_cleaner_logs")
        ray.init(
            # "local": a new instance even if a `ray start` cluster runs on this machine (without
            # it Ray would join that one, which is neither loopback-only nor ours).
            address="local",
            _node_ip_address=LOOPBACK,
            dashboard_host=LOOPBACK,
            include_dashboard=kwargs.pop("include_dashboard", False),
            num_cpus=num_cpus,
            runtime_env=runtime_env,
            **kwargs,
        )
        _started_local_ray = True
    return True


def owns_local_ray() -> bool:
    """True if Ray is running as the embedded local instance this process started (not a cluster
    it connected to), so no other driver or application can be using it."""
    import ray

    return _started_local_ray and ray.is_initialized()


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, **kwargs) -> Iterator[None]:
    """Use Ray for a block; shut it down afterwards only if this block started it."""
    started = init_ray(address=address, num_cpus=num_cpus, **kwargs)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
