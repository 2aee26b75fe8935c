"""A loopback-only Ray head on this machine, to try the jobs with `ray job submit` before a cluster.

    python jobs/local_head.py start --temp-dir /tmp/tiger-head --num-cpus 2
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/tiger-head/auth_token   # as printed
    ray job submit --address http://127.0.0.1:PORT --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- python jobs/pipeline.py ...
    python jobs/local_head.py stop --temp-dir /tmp/tiger-head

Every socket binds to 127.0.0.1 and every port is a free one picked at start, so it runs beside
other Ray instances (an embedded `ray.init`, another head). Ray's token authentication is on, with
a token of this head's own in its temp dir (not the machine-wide ~/.ray/auth_token), so clients
need the two variables above. `stop` ends only this head (`ray stop` would end every Ray on the
machine): its processes name its session directory on their command lines, and their children
(workers, job drivers) go with them; Linux only. The environment of `start` (e.g. TIGER_DATA_DIR)
is inherited by every job's driver and workers.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
STATE_FILE = "tiger-head.json"
TOKEN_FILE = "auth_token"
# Unix socket paths (under the temp dir) must stay below ~107 bytes.
MAX_TEMP_DIR_LENGTH = 40


@dataclass
class Head:
    temp_dir: str
    gcs_address: str
    dashboard_url: str  # the Jobs API: JobSubmissionClient / ray job submit --address
    client_env: dict[str, str]  # what a client (ray job submit, ray.init) needs to authenticate


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _ray_cli() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


def _get(url: str, token: str, timeout: float = 10):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def job_info(head: Head, submission_id: str) -> dict:
    """The Jobs API's record of a job: status, message, start_time, end_time (ms) ..."""
    token = Path(head.client_env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    return _get(f"{head.dashboard_url}/api/jobs/{submission_id}", token)


def _wait_for_jobs_api(url: str, token: str, timeout: float) -> None:
    """Until the Jobs API answers an authenticated request."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _get(f"{url}/api/version", token, timeout=5)
            return
        except (urllib.error.URLError, OSError, ValueError) as err:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray Jobs API at {url} did not answer within "
                                   f"{timeout:.0f} s: {err}") from err
        time.sleep(0.5)


def start(temp_dir: str | os.PathLike, num_cpus: int = 2, object_store_mb: int = 512,
          env: dict[str, str] | None = None, timeout: float = 120.0) -> Head:
    """Start the head, wait until its Jobs API answers, record it in ``temp_dir``."""
    temp_dir = Path(temp_dir).resolve()
    if len(str(temp_dir)) > MAX_TEMP_DIR_LENGTH:
        raise ValueError(f"--temp-dir {temp_dir}: keep it under {MAX_TEMP_DIR_LENGTH} characters "
                         "(Ray's Unix socket paths live below it)")
    temp_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in (
        "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port")}
    command = [
        _ray_cli(), "start", "--head", f"--node-ip-address={LOOPBACK}",
        f"--dashboard-host={LOOPBACK}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
        f"--object-store-memory={object_store_mb * 1024 * 1024}", "--disable-usage-stats",
        # 0/0: workers take OS-assigned ports instead of the shared default range 10002-19999.
        "--min-worker-port=0", "--max-worker-port=0",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]
    token = secrets.token_hex(32)
    token_path = temp_dir / TOKEN_FILE
    token_path.touch(mode=0o600)
    token_path.write_text(token)
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    process_env = {**os.environ, **(env or {}), **client_env,
                   "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    process_env.pop("RAY_ADDRESS", None)  # start a new head, never join another cluster
    # `python` in a job's entrypoint is then this interpreter (this venv), as if it were activated.
    process_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), process_env.get("PATH", "")])
    process_env.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the token file
    try:
        result = subprocess.run(command, env=process_env, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(temp_dir)
        raise
    if result.returncode != 0:
        stop(temp_dir)
        raise RuntimeError(f"`ray start` failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    head = Head(temp_dir=str(temp_dir), gcs_address=f"{LOOPBACK}:{ports['port']}",
                dashboard_url=f"http://{LOOPBACK}:{ports['dashboard-port']}", client_env=client_env)
    (temp_dir / STATE_FILE).write_text(json.dumps(asdict(head), indent=2) + "\n")
    try:
        _wait_for_jobs_api(head.dashboard_url, token, timeout)
    except TimeoutError:
        stop(temp_dir)
        raise
    return head


# ---------------------------------------------------------------- stopping only this head

def _processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every process we can read."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            # The parent pid is the 2nd field after the parenthesised command name.
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile, or not ours to read
        table[int(entry.name)] = (ppid, cmdline)
    return table


def _ancestors(table: dict[int, tuple[int, str]]) -> set[int]:
    pids, pid = set(), os.getpid()
    while pid in table and pid not in pids:
        pids.add(pid)
        pid = table[pid][0]
    return pids


def head_processes(temp_dir: str | os.PathLike) -> list[int]:
    """Pids of this head's processes and all their descendants (workers, job drivers).

    Ray's own processes name their session directory, ``<temp_dir>/session_<time>``, on the
    command line (log dirs, sockets). This process and its parents (a shell whose command line
    mentions the temp dir) are never included.
    """
    marker = str(Path(temp_dir).resolve() / "session_")
    table = _processes()
    spared = _ancestors(table)
    found = {pid for pid, (_, cmdline) in table.items() if marker in cmdline and pid not in spared}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found and child not in spared:
                found.add(child)
                stack.append(child)
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; only its parent's wait() is missing.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop(temp_dir: str | os.PathLike, grace: float = 10.0) -> list[int]:
    """SIGTERM this head's processes, SIGKILL whatever is left after ``grace`` seconds."""
    pids = head_processes(temp_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)
        pids = [pid for pid in pids if _alive(pid)]
        if not pids:
            break
    return head_processes(temp_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python jobs/local_head.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    start_parser = sub.add_parser("start", help="start a head and print its Jobs API address")
    start_parser.add_argument("--temp-dir", required=True, help="Ray temp dir of this head (short path)")
    start_parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    start_parser.add_argument("--object-store-mb", type=int, default=512)
    stop_parser = sub.add_parser("stop", help="stop the head started with this temp dir, only it")
    stop_parser.add_argument("--temp-dir", required=True)
    args = parser.parse_args(argv)
    if args.action == "start":
        head = start(args.temp_dir, num_cpus=args.num_cpus, object_store_mb=args.object_store_mb)
        print(f"Ray head up (GCS {head.gcs_address}); submit jobs with:")
        print("  export " + " ".join(f"{k}={v}" for k, v in head.client_env.items()))
        print(f"  ray job submit --address {head.dashboard_url} --working-dir . "
              "--runtime-env jobs/runtime_env.yaml -- python jobs/pipeline.py ...")
        print(f"stop it with: python jobs/local_head.py stop --temp-dir {head.temp_dir}")
        return 0
    left = stop(args.temp_dir)
    if left:
        print(f"processes still running: {left}", file=sys.stderr)
        return 1
    print(f"stopped the Ray head of {Path(args.temp_dir).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
