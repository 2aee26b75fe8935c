"""PeakMemorySampler tells a process's own memory from pages it shares (mmap, object store)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from tiger_ray.testing.memory import PeakMemorySampler

MIB = 1 << 20

CHILD = """
import sys, time
import numpy as np
private = np.ones(int(sys.argv[1]) * 2**20, dtype=np.uint8)        # touched: anonymous pages
shared = np.load(sys.argv[2], mmap_mode="r"); int(shared.sum())    # touched: file-backed pages
print("ready", flush=True); time.sleep(1.0)
"""


def test_private_peak_excludes_memory_mapped_pages(tmp_path):
    mapped = tmp_path / "mapped.npy"
    np.save(mapped, np.ones(200 * MIB, dtype=np.uint8))
    with PeakMemorySampler(interval=0.05) as peaks:
        # (this process may have other children, e.g. a session-wide Ray: look at ours only)
        child = subprocess.Popen([sys.executable, "-c", CHILD, "100", str(mapped)],
                                 stdout=subprocess.PIPE, text=True)
        out, _ = child.communicate(timeout=120)
    assert child.returncode == 0 and "ready" in out
    rss, private = peaks.peaks[child.pid], peaks.private_peaks[child.pid]
    assert rss >= 290 * MIB  # 100 MiB private + 200 MiB mapped file
    assert 95 * MIB <= private < 200 * MIB  # the mapped file is not the process's own
    assert peaks.max_private_bytes >= private
