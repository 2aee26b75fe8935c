"""`tiger serve`: start the recommendation API on Ray Serve for a run directory.

    tiger serve --run runs/beauty                          # 127.0.0.1:8000, tiger + ann, Ctrl-C stops
    tiger serve --run runs/beauty --demo --no-blocking     # start, show one real request, shut down
    tiger serve --run RUN --address auto --host 0.0.0.0 --detach   # onto a running cluster, return
    tiger serve --run RUN --address auto --stop                     # remove that service again
"""

from __future__ import annotations

import argparse
import os
import sys

from tiger_ray.config import build_config, stage_parser
from tiger_ray.serving.settings import MODELS, PRESETS, ServeConfig


def _models(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(MODELS)} (comma-separated), got {text!r}")
    return models


def register(subparsers) -> None:
    parser = stage_parser(
        subparsers, "serve", config_cls=ServeConfig, presets=PRESETS, func=_serve,
        skip=("models",),  # --models below: a comma-separated list, checked by _models
        help="serve TIGER and the ANN baseline over HTTP with Ray Serve",
        description="Deploy a FastAPI ingress and one batched Ray Serve deployment per model for a "
        "run directory: POST /recommend, GET /items/{id}, GET /info, GET /healthz; OpenAPI docs at "
        "/docs. Binds to 127.0.0.1 unless --host says otherwise.",
        run_help="run directory to serve", preset_help="resource and batching preset (default: cpu)")
    parser.add_argument("--models", type=_models, default=None, metavar="tiger,ann",
                        help="comma-separated models to serve (default: tiger,ann)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to deploy onto (default: $RAY_ADDRESS, else an embedded "
                             "loopback-only Ray)")
    parser.add_argument("--demo", action="store_true",
                        help="after start-up, send one real request (a test-split user's history) "
                             "and print the request and the response")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--blocking", dest="blocking", action="store_true", default=True,
                      help="serve until Ctrl-C or SIGTERM, then shut down (default)")
    mode.add_argument("--no-blocking", dest="blocking", action="store_false",
                      help="return after start-up (and --demo), shutting the service down")
    mode.add_argument("--detach", action="store_true",
                      help="leave the service running on the cluster of --address and return; "
                           "`tiger serve --run RUN --address ADDR --stop` removes it")
    mode.add_argument("--stop", action="store_true",
                      help="remove this service (its --app-name) from the cluster of --address, "
                           "leaving other Serve applications running, and return")


def _serve(args: argparse.Namespace) -> int:
    from tiger_ray.ray_env import init_ray
    from tiger_ray.runs import RunDir
    from tiger_ray.serving.app import check_run, start, stop, wait_for_signal

    config = build_config(ServeConfig, args, PRESETS[args.preset])
    run = RunDir(args.run)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.detach and not address:
        raise ValueError("--detach needs a running Ray cluster to leave the service on (--address "
                         "or RAY_ADDRESS; e.g. `ray start --head --node-ip-address 127.0.0.1`); "
                         "an embedded Ray stops with this process")
    if args.stop:
        if not address:
            raise ValueError("--stop needs the Ray cluster the service runs on (--address or RAY_ADDRESS)")
        init_ray(address=address)
        stop(config.app_name)
        print(f"removed Serve application {config.app_name!r} from {address}")
        return 0
    check_run(run, config, loaders={})  # missing files: say so before starting Ray
    started_ray = init_ray(address=address)
    try:
        try:
            url = start(run, config)
        except RuntimeError as err:  # a deployment failed to start; the message says why
            print(f"tiger serve: error: {err}", file=sys.stderr)
            return 1
        print(f"serving {run.root} ({', '.join(config.models)}) at {url}  (API docs: {url}/docs)",
              flush=True)
        if args.demo:
            from tiger_ray.serving.demo import show_demo_request

            show_demo_request(run, url, config.models[0])
        if args.detach:
            print(f"detached: the service keeps running on the cluster; `tiger serve --run "
                  f"{args.run} --address {address} --stop` removes it")
            return 0
        if args.blocking:
            wait_for_signal()
    finally:
        if not args.detach:
            stop(config.app_name)
            if started_ray:
                import ray

                ray.shutdown()
    return 0
