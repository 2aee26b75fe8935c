"""One real request against the running service, printed as a user would send it with curl.

Used by `tiger serve --demo` and by the end of `tiger pipeline` (``serve_demo``): the history is
the first test-split user's (as ASINs, most recent 20), so the printed response can be checked
against the held-out next item.
"""

from __future__ import annotations

import json
import socket

from tiger_ray.runs import RunDir
from tiger_ray.serving.settings import PRESETS, ServeConfig

DEMO_HISTORY_ITEMS = 20


def demo_request(run: RunDir, max_items: int = DEMO_HISTORY_ITEMS) -> tuple[dict, int]:
    """(request body, held-out target item id) for the first user of the test split."""
    import numpy as np

    from tiger_ray.data.schema import read_items, read_sequences
    from tiger_ray.data.split import eval_example

    sequences = read_sequences(run.require(run.sequences, "tiger prepare"))
    history, target = eval_example(sequences[0], "test")
    asins = read_items(run.items, columns=["asin"]).column("asin").to_numpy(zero_copy_only=False)
    recent = np.asarray(history)[-max_items:]
    body = {"history": [str(asins[i - 1]) for i in recent], "user_id": int(sequences.user_ids[0]), "k": 10}
    return body, target


def show_demo_request(run: RunDir, url: str, model: str) -> dict:
    """Send the demo request to ``url`` and print it (as curl), the response and the target's rank."""
    from tiger_ray.serving.client import TigerClient

    body, target = demo_request(run)
    body["model"] = model
    with TigerClient(url) as client:
        response = client.recommend(**body)
    print(f"$ curl -s -X POST {url}/recommend -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
    print(json.dumps(response, indent=2))
    hit = [item["rank"] for item in response["items"] if item["item_id"] == target]
    print(f"held-out next item {target}: " + (f"rank {hit[0]}" if hit else "not in the top 10"), flush=True)
    return response


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def trained_models(run: RunDir) -> tuple[str, ...]:
    """The models served by default (tiger, ann) that ``run`` has trained."""
    from tiger_ray.serving.app import REQUIRED_FILES
    from tiger_ray.serving.settings import DEFAULT_MODELS

    return tuple(m for m in DEFAULT_MODELS
                 if all((run.root / path).exists() for path, _ in REQUIRED_FILES[m]))


def serve_demo(run: RunDir, config: ServeConfig | None = None, keep_running: bool = False) -> dict:
    """Start the service for ``run`` (Ray must be initialised), show one real request, then shut
    it down, or keep serving until Ctrl-C / SIGTERM with ``keep_running``."""
    from tiger_ray.serving.app import start, stop

    if config is None:
        models = trained_models(run)
        if not models:
            raise FileNotFoundError(f"{run.root}: no trained model to serve; run `tiger "
                                    f"train-seq2seq` or `tiger train-baseline` first")
        config = ServeConfig(**{**PRESETS["cpu"], "models": models})
        if not port_is_free(config.host, config.port):  # e.g. a `tiger serve` already on 8000
            config.port = free_port(config.host)
    try:
        url = start(run, config)
        print(f"serving {run.root} ({', '.join(config.models)}) at {url}  (API docs: {url}/docs)",
              flush=True)
        response = show_demo_request(run, url, config.models[0])
        if keep_running:
            from tiger_ray.serving.app import wait_for_signal

            wait_for_signal()
    finally:
        stop(config.app_name)
    return response
