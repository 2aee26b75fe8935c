"""tiger_ray/mapped.py: a scan over a memory-mapped array does not stay in the process's RSS."""

from __future__ import annotations

import numpy as np

from tiger_ray.mapped import is_mapped, release, scan_blocks


def rss_file_bytes() -> int:
    """Resident file-backed pages of this process (RssFile in /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssFile in /proc/self/status")


def test_scan_releases_the_pages_it_read_and_returns_every_row(tmp_path):
    rows, dim = 262_144, 64  # 64 MiB of float32
    path = tmp_path / "table.npy"
    np.save(path, np.arange(rows * dim, dtype=np.float32).reshape(rows, dim))

    touched = np.load(path, mmap_mode="r")
    before = rss_file_bytes()
    assert float(np.asarray(touched[::1024, 0]).sum()) >= 0  # warm-up of numpy internals only
    total = float(np.asarray(touched, dtype=np.float64).sum())  # a plain pass: every page stays
    grown_plain = rss_file_bytes() - before
    release(touched)
    assert rss_file_bytes() - before < grown_plain / 4

    scanned = np.load(path, mmap_mode="r")[1:]  # a slice of the map, as the item tables are read
    assert is_mapped(scanned) and not is_mapped(np.zeros(3))
    before = rss_file_bytes()
    seen, first_rows = 0.0, []
    for lo, block in scan_blocks(scanned, 4096, release_every=8):
        seen += float(block.astype(np.float64).sum())
        first_rows.append(lo)
    assert first_rows == list(range(0, rows - 1, 4096))
    assert seen == total - float(np.arange(dim).sum())  # every row but the one sliced off
    assert grown_plain > 48 * 2**20 and rss_file_bytes() - before < 16 * 2**20


def test_dual_encoder_reads_text_rows_without_keeping_the_table_resident(tmp_path):
    import torch

    from tiger_ray.baseline.dual_encoder import DualEncoder, DualEncoderConfig

    items, text_dim = 131_072, 128  # 64 MiB of text vectors, row = item id
    path = tmp_path / "vectors.npy"
    table = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(items + 1, text_dim))
    table[:] = np.arange(items + 1, dtype=np.float32)[:, None]
    table.flush()
    del table
    text = np.load(path, mmap_mode="r")
    model = DualEncoder(DualEncoderConfig(num_items=items, text_dim=text_dim, dim=8), text)
    before = rss_file_bytes()
    for lo in range(1, items + 1, 8192):  # every row once, as an epoch of training windows does
        ids = torch.arange(lo, min(lo + 8192, items + 1))
        assert torch.equal(model.text_vectors(ids)[:, 0], ids.float())
    assert rss_file_bytes() - before < 16 * 2**20
