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
from tiger_ray.runs import RunDir
from tiger_ray.serving.deployments import DEPLOYMENT_NAMES, INGRESS_NAME, ModelDeployment, RecommenderApi
from tiger_ray.serving.settings import PRESETS, ServeConfig

log = logging.getLogger(__name__)

# What each model needs on disk (the registry's loaders read these), and who writes it.
REQUIRED_FILES = {
    "tiger": ("seq2seq/best/config.json", "tiger train-seq2seq"),
    "ann": ("baseline/model.pt", "tiger train-baseline"),
}


def check_run(run: RunDir, config: ServeConfig, loaders: dict[str, str]) -> None:
    """Fail on the driver, with the command to run, instead of in replicas that retry forever."""
    run.require(run.items, "tiger prepare")
    for model in config.models:
        if model not in loaders:
            path, produced_by = REQUIRED_FILES[model]
            run.require(run.root / path, produced_by)


def build_app(run: RunDir, config: ServeConfig, loaders: dict[str, str] | None = None) -> Application:
    """The ingress bound to one model deployment per served model.

    ``loaders`` maps a model name to a custom "module:function" returning a ``Retriever``
    (default: ``tiger_ray.evaluation.registry``).
    """
    loaders = dict(loaders or {})
    check_run(run, config, loaders)
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
        )
        threads = config.torch_threads or max(1, int(cpus))
        models[model] = deployment.bind(str(run.root), model, config.model_options(model),
                                        loaders.get(model), threads)
    ingress = RecommenderApi.options(
        name=INGRESS_NAME,
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress_cpus},
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
    serve.run(app, name=config.app_name, route_prefix="/", blocking=False)
    url = f"http://{config.host}:{config.port}"
    log.info("serving %s (%s) at %s; docs at %s/docs", run.root, ", ".join(config.models), url, url)
    return url


def stop() -> None:
    """Shut down every Serve application and the HTTP proxy (Ray itself keeps running)."""
    serve.shutdown()
