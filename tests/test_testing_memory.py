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
        child = subprocess.run([sys.executable, "-c", CHILD, "100", str(mapped)], check=True,
                               capture_output=True, text=True)
    assert "ready" in child.stdout
    child_peaks = {pid: peak for pid, peak in peaks.peaks.items() if pid != peaks.root}
    (pid, rss), = child_peaks.items()
    private = peaks.private_peaks[pid]
    assert rss >= 290 * MIB  # 100 MiB private + 200 MiB mapped file
    assert 95 * MIB <= private < 200 * MIB  # the mapped file is not the process's own
    assert peaks.max_private_bytes >= private
