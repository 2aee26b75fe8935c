"""jobs/local_head.py stops only its own head: processes naming its session dir, and their children,
never the caller or the caller's parents (whose command lines may mention the temp dir too)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

spec = importlib.util.spec_from_file_location("tiger_jobs_local_head", REPO / "jobs" / "local_head.py")
local_head = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = local_head  # dataclasses look their module up while it executes
spec.loader.exec_module(local_head)

SLEEPER = "import subprocess, sys, time; subprocess.Popen(['sleep', '120']); time.sleep(120)"


@pytest.fixture
def fake_head(tmp_path):
    """A process that names <temp_dir>/session_x on its command line, with a child that does not."""
    temp_dir = tmp_path / "head"
    process = subprocess.Popen([sys.executable, "-c", SLEEPER, f"--log-dir={temp_dir}/session_1/logs"])
    deadline = time.monotonic() + 10
    while len(local_head.head_processes(temp_dir)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    yield temp_dir, process
    local_head.stop(temp_dir, grace=1)  # the child too
    process.wait(timeout=10)


def test_finds_the_head_and_its_children_and_stops_them(fake_head):
    temp_dir, process = fake_head
    pids = local_head.head_processes(temp_dir)
    assert process.pid in pids and len(pids) == 2, pids
    assert local_head.stop(temp_dir, grace=5) == []
    process.wait(timeout=5)
    assert not any(local_head._alive(pid) for pid in pids)


def test_never_the_caller_or_its_parents(tmp_path, fake_head):
    temp_dir, process = fake_head
    # A caller whose own command line names the session dir, like `bash -c '... /tmp/x/session_1'`.
    probe = ("import json, sys; sys.path.insert(0, sys.argv[1]); import local_head, os; "
             "print(json.dumps([os.getpid(), os.getppid(), local_head.head_processes(sys.argv[2])]))")
    out = subprocess.run([sys.executable, "-c", probe, str(REPO / "jobs"), str(temp_dir),
                          f"{temp_dir}/session_1"], capture_output=True, text=True, timeout=60)
    me, parent, pids = __import__("json").loads(out.stdout)
    assert me not in pids and parent not in pids
    assert process.pid in pids


def test_other_temp_dirs_are_left_alone(tmp_path, fake_head):
    temp_dir, process = fake_head
    assert local_head.head_processes(tmp_path / "other-head") == []
    assert local_head.stop(tmp_path / "other-head", grace=1) == []
    assert local_head._alive(process.pid)
