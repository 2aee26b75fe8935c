"""`tiger serve` in-process: start on 127.0.0.1, one real demo request, clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

import pytest

from serving_helpers import free_port, serving_run  # noqa: F401 - the shared tiny run fixture


def _accepts_connections(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.ray
def test_tiger_serve_demo_then_shut_down(ray_local, serving_run, capsys):
    from tiger_ray import cli

    port = free_port()
    code = cli.main(["serve", "--run", str(serving_run.root), "--preset", "tiny", "--port", str(port),
                     "--models", "tiger", "--demo", "--no-blocking"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"at http://127.0.0.1:{port}" in out
    assert f"curl -s -X POST http://127.0.0.1:{port}/recommend" in out
    response = json.loads(out[out.index("\n{") + 1: out.index("\n}\n") + 2])
    assert response["model"] == "tiger" and len(response["items"]) == 10 and response["user_id"] == 1
    assert "held-out next item" in out
    assert not _accepts_connections(port)  # --no-blocking shuts the service down before returning


@pytest.mark.ray
def test_detach_leaves_the_service_up_and_stop_removes_only_it(ray_local, serving_run, capsys):
    from ray import serve

    from tiger_ray import cli

    port = free_port()
    # Ray is already initialised by the fixture, so --address names "the cluster we are on".
    address = ["--address", "127.0.0.1:6379"]
    common = ["serve", "--run", str(serving_run.root), "--preset", "tiny", "--port", str(port),
              "--models", "tiger", "--app-name", "detached-tiger"]
    assert cli.main([*common, *address, "--detach"]) == 0
    assert "--stop` removes it" in capsys.readouterr().out
    assert _accepts_connections(port)
    assert "detached-tiger" in serve.status().applications
    assert cli.main([*common, *address, "--stop"]) == 0
    assert "detached-tiger" not in serve.status().applications
    assert cli.main([*common, "--stop"]) == 2  # no cluster named: a clear error, nothing stopped
    assert "--stop needs the Ray cluster" in capsys.readouterr().err


def test_blocking_mode_stops_on_sigterm_and_restores_the_handler(capsys):
    from tiger_ray.serving.app import wait_for_signal

    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    wait_for_signal()
    assert "shutting down" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.ray
def test_pipeline_serve_demo_serves_every_trained_model_and_stops(ray_local, serving_run, capsys):
    from tiger_ray.serving.demo import serve_demo

    response = serve_demo(serving_run)  # what the end of `tiger pipeline` calls
    out = capsys.readouterr().out
    assert "(tiger, ann)" in out and response["model"] == "tiger" and len(response["items"]) == 10
    port = int(out.split("at http://127.0.0.1:")[1].split()[0])
    assert not _accepts_connections(port)
