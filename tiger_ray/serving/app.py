"""Build the Serve application from a run directory and a ``ServeConfig``; start and stop it.

Three ways in, one builder:

    tiger serve --run RUN                        cli.py -> start()
    serve run tiger_ray/serving/serve_config.yaml   (or `serve deploy` on a cluster) -> app_builder()
    Python: serve.run(build_app(RunDir("runs/beauty"), ServeConfig()))
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from tiger_ray.config import build_config, to_dict
from tiger_ray.ray_env import owns_local_ray
from tiger_ray.runs import RunDir
from tiger_ray.serving.deployments import DEPLOYMENT_NAMES, INGRESS_NAME, ModelDeployment, RecommenderApi
from tiger_ray.serving.settings import PRESETS, ServeConfig

log = logging.getLogger(__name__)

MODEL_LOAD_ATTEMPTS = 3

# What each model needs on disk (the registry's loaders read these), and who writes it.
REQUIRED_FILES = {
    "tiger": [("seq2seq/best/config.json", "tiger train-seq2seq")],
    "ann": [("baseline/model.pt", "tiger train-baseline")],
    "hybrid": [("seq2seq/best/config.json", "tiger train-seq2seq"),
               ("baseline/model.pt", "tiger train-baseline"),
               ("hybrid/tuning.json", "tiger tune-hybrid")],
}


def check_run(run: RunDir, config: ServeConfig, loaders: dict[str, str]) -> None:
    """Fail on the driver, naming the command to run, before replicas try (and retry) to load."""
    run.require(run.items, "tiger prepare")
    for model in config.models:
        if model not in loaders:
            for path, produced_by in REQUIRED_FILES[model]:
                run.require(run.root / path, produced_by)


def build_app(run: RunDir, config: ServeConfig, loaders: dict[str, str] | None = None) -> Application:
    """The ingress bound to one model deployment per served model.

    ``loaders`` maps a model name to a custom "module:function" returning a ``Retriever``
    (default: ``tiger_ray.retrievers``).
    """
    loaders = dict(loaders or {})
    check_run(run, config, loaders)
    logging_config = {"enable_access_log": config.access_log}
    models = {}
    for model in config.models:
        cpus = config.cpus(model)
        deployment = ModelDeployment.options(
            name=DEPLOYMENT_NAMES[model],
            num_replicas=config.replicas(model),
            max_ongoing_requests=max(config.max_ongoing_requests, config.max_batch_size(model)),
            ray_actor_options={"num_cpus": cpus, "num_gpus": 1 if config.use_gpu else 0},
            user_config={"max_batch_size": config.max_batch_size(model),
                         "batch_wait_timeout_s": config.batch_wait_timeout_s},
            # A model that cannot load fails the same way every time: report it after a few tries.
            max_constructor_retry_count=MODEL_LOAD_ATTEMPTS,
            logging_config=logging_config,
        )
        threads = config.torch_threads or max(1, int(cpus))
        models[model] = deployment.bind(str(run.root), model, config.model_options(model),
                                        loaders.get(model), threads)
    ingress = RecommenderApi.options(
        name=INGRESS_NAME,
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress_cpus},
        logging_config=logging_config,
    )
    return ingress.bind(str(run.root), models, to_dict(config))


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for Serve config files: ``import_path: tiger_ray.serving.app:app_builder``.

    ``args``: ``run`` (required), ``preset`` (tiny, cpu, paper; default cpu), ``loaders``
    (optional), and any ``ServeConfig`` field. Host and port come from the file's http_options.
    """
    args = dict(args)
    if "run" not in args:
        raise ValueError("args.run: the run directory to serve is required")
    run = RunDir(args.pop("run"))
    preset = args.pop("preset", "cpu")
    if preset not in PRESETS:
        raise ValueError(f"args.preset: choose from {', '.join(PRESETS)}, got {preset!r}")
    loaders = args.pop("loaders", None)
    known = set(to_dict(ServeConfig()))
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"args: unknown fields {unknown}; see tiger_ray.serving.settings.ServeConfig")
    return build_app(run, build_config(ServeConfig, args, PRESETS[preset]), loaders)


def start(run: RunDir, config: ServeConfig, loaders: dict[str, str] | None = None) -> str:
    """Start Serve's HTTP proxy on config.host:config.port, deploy, wait until ready; returns the URL.

    Ray must already be initialised (``tiger_ray.ray_env.init_ray``).
    """
    app = build_app(run, config, loaders)
    serve.start(http_options={"host": config.host, "port": config.port})
    _proxy_addresses.add((config.host, config.port))
    try:
        serve.run(app, name=config.app_name, route_prefix="/", blocking=False)
    except RuntimeError as err:
        # Serve's own message only names the deployment; the cause is in its status.
        raise RuntimeError(f"{err}\n{failed_deployments(config.app_name)}") from err
    url = f"http://{config.host}:{config.port}"
    log.info("serving %s (%s) at %s; docs at %s/docs", run.root, ", ".join(config.models), url, url)
    return url


def failed_deployments(app_name: str, lines: int = 3) -> str:
    """The last lines (the exception) of each failed deployment's status message."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return f"application {app_name!r} is not deployed"
    failed = []
    for name, deployment in app.deployments.items():
        if deployment.status.name in ("HEALTHY", "UPDATING", "UPSCALING", "DOWNSCALING"):
            continue
        tail = [line for line in (deployment.message or "").splitlines() if line.strip()][-lines:]
        failed.append(f"{name} ({deployment.status.name}):\n  " + "\n  ".join(tail))
    return "\n".join(failed) or app.message


def stop(app_name: str) -> None:
    """Delete our application; Ray itself keeps running.

    On a cluster other applications may share Serve, so only ours goes. Serve itself (controller
    and HTTP proxy) is shut down only on the embedded local Ray this process started, and only
    when no other application is left on it.
    """
    if app_name in serve.status().applications:  # not there if start() failed before deploying
        serve.delete(app_name)
    if owns_local_ray() and not serve.status().applications:
        serve.shutdown()
        # The proxy actor is killed asynchronously; return only once its port is closed, so a
        # caller may start again on the same port (or assume nothing listens any more).
        for host, port in _proxy_addresses:
            _wait_until_closed(host, port)
        _proxy_addresses.clear()


# (host, port) of the HTTP proxies start() opened in this process.
_proxy_addresses: set[tuple[str, int]] = set()


def _wait_until_closed(host: str, port: int, timeout_s: float = 60.0) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) != 0:
                return
        time.sleep(0.2)
    log.warning("Serve was shut down but %s:%d still accepts connections after %.0f s",
                host, port, timeout_s)


def wait_for_signal() -> None:
    """Block until Ctrl-C or SIGTERM (the previous SIGTERM handler is restored afterwards)."""
    import signal
    import threading

    done = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("press Ctrl-C to stop", flush=True)
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("shutting down", flush=True)
