"""Peak memory of a process and everything it starts (Ray's raylet, workers, actors), on Linux.

A background thread walks the process tree every ``interval`` seconds and keeps, per process, the
kernel's own high-water mark (``VmHWM`` in /proc/<pid>/status: the peak resident set since the
process started, so a spike between two samples is not missed while the process lives), and the
largest private part seen (``RssAnon``: the resident set minus shared pages, i.e. without the
Ray object store's shared memory and memory-mapped files that every process of a node shares). Each
process is labelled by its command line, which Ray sets to ``ray::<Actor or task name>`` for
workers, so a report says "RayTrainWorker peaked at 1.2 GiB" rather than naming a pid.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (from /proc/<pid>/stat; the comm field may hold spaces)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return parents


def _label(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    args = [a for a in raw.decode(errors="replace").split("\0") if a]
    if not args:
        return "?"
    if args[0].startswith("ray::"):
        return args[0].split()[0][:60]  # ray::RayTrainWorker.train_fn, ray::MapBatches(...) ...
    name = Path(args[0]).name
    if name.startswith("python") and len(args) > 1:
        script = next((a for a in args[1:] if not a.startswith("-")), args[1])
        return f"python {Path(script).name}"[:60]
    return name[:60]


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


@dataclass
class PeakMemory:
    """Peak RSS (bytes) per process of a tree, filled by ``sample``."""

    root: int
    peaks: dict[int, int] = field(default_factory=dict)
    private_peaks: dict[int, int] = field(default_factory=dict)  # sampled, so a lower bound
    labels: dict[int, str] = field(default_factory=dict)

    def sample(self) -> None:
        for pid in process_tree(self.root):
            hwm = _status_kib(pid, "VmHWM")
            if hwm is None:
                continue
            self.peaks[pid] = max(self.peaks.get(pid, 0), hwm * 1024)
            anon = _status_kib(pid, "RssAnon")
            if anon is not None:
                self.private_peaks[pid] = max(self.private_peaks.get(pid, 0), anon * 1024)
            label = _label(pid)
            # Ray renames a worker for the task or actor it runs (and back to ray::IDLE after a
            # task): keep the most specific name seen.
            generic = ("?", "ray::IDLE")
            if label not in generic and (pid not in self.labels or self.labels[pid] in generic
                                         or self.labels[pid].startswith("python")):
                self.labels[pid] = label
            elif pid not in self.labels:
                self.labels[pid] = label

    def by_label(self, private: bool = False) -> dict[str, int]:
        """The largest peak among processes with the same label (``private``: of RssAnon)."""
        out: dict[str, int] = {}
        for pid, peak in (self.private_peaks if private else self.peaks).items():
            label = "driver" if pid == self.root else self.labels.get(pid, "?")
            out[label] = max(out.get(label, 0), peak)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    @property
    def max_bytes(self) -> int:
        return max(self.peaks.values(), default=0)

    @property
    def max_private_bytes(self) -> int:
        return max(self.private_peaks.values(), default=0)


class PeakMemorySampler:
    """``with PeakMemorySampler(pid) as peaks: ...`` samples the tree of ``pid`` until exit."""

    def __init__(self, root: int | None = None, interval: float = 0.2):
        self.result = PeakMemory(root or os.getpid())
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-memory")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.result.sample()
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self.result

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.result.sample()
