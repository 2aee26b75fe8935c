"""Count the catalog and user rows that reach the driver process while a stage runs.

A stage that scales streams its data through Ray Data workers and memory-mapped files; the driver
only plans and collects small summaries. This counter wraps the calls through which rows reach
Python in the driver (Ray Data's consumption APIs and pyarrow's Parquet/dataset readers) and adds
up the rows they return, so a test can assert that the driver saw O(sample) rows, not O(N):

    with DriverRowCounter() as rows:
        run_stage(...)
    assert rows.held < 5_000, rows.by_call

Rows are counted in two kinds: ``held`` rows arrive all at once (a table read whole, ``take_all``,
a full ``np.load``, a ``ray.get`` result), so the driver's memory grows with them; ``streamed``
rows pass through in bounded batches (``iter_batches``), costing time in the driver but not memory.

It only counts calls made in this process (Ray workers are other processes and are not patched),
which is exactly the driver's share.
"""

from __future__ import annotations

import functools
from collections import Counter


def _rows_of(value) -> int:
    """Rows in what a reader returned: a table, a record batch, a dict of columns, a DataFrame, a list."""
    for attr in ("num_rows",):
        if hasattr(value, attr):
            return int(getattr(value, attr))
    if isinstance(value, dict) and value:
        first = next(iter(value.values()))
        return len(first) if hasattr(first, "__len__") else 1
    if hasattr(value, "shape") and getattr(value, "shape", None):
        return int(value.shape[0])
    if isinstance(value, list):
        return len(value)
    return 1


class DriverRowCounter:
    """Patches, while active, the ways rows reach the driver and counts the rows they return."""

    # (module, function): readers the stages call; patched in every tiger_ray module that imported
    # them by name too. Every np.load without mmap_mode is a full read; ray.get returns task results.
    FUNCTIONS = [("pyarrow.parquet", "read_table"), ("numpy", "load"), ("ray", "get"),
                 ("tiger_ray.data.schema", "read_items"), ("tiger_ray.data.schema", "read_sequences"),
                 ("tiger_ray.data.schema", "iter_batches")]
    DATASET_RETURNING = ("take", "take_all", "take_batch", "to_pandas")
    DATASET_ITERATING = ("iter_batches", "iter_rows", "iter_torch_batches")

    def __init__(self):
        self.by_call: Counter[str] = Counter()
        self._streaming: set[str] = set()
        self._undo: list[tuple[object, str, object]] = []

    @property
    def total(self) -> int:
        return sum(self.by_call.values())

    @property
    def streamed(self) -> int:
        return sum(n for label, n in self.by_call.items() if label in self._streaming)

    @property
    def held(self) -> int:
        return self.total - self.streamed

    def _count(self, label: str, value) -> None:
        if label == "numpy.load" and type(value).__name__ == "memmap":
            return  # a memory map: pages are read on demand, nothing is materialised
        self.by_call[label] += _rows_of(value)

    def _returning(self, original, label: str):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            value = original(*args, **kwargs)
            self._count(label, value)
            return value
        return counted

    def _iterating(self, original, label: str):
        self._streaming.add(label)
        @functools.wraps(original)
        def counted(*args, **kwargs):
            for value in original(*args, **kwargs):
                self._count(label, value)
                yield value
        return counted

    def _set(self, owner, name: str, replacement) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def __enter__(self) -> "DriverRowCounter":
        import importlib
        import inspect
        import sys

        import pyarrow.parquet as pq
        from ray.data import Dataset

        for name in self.DATASET_RETURNING:
            self._set(Dataset, name, self._returning(getattr(Dataset, name), f"Dataset.{name}"))
        for name in self.DATASET_ITERATING:
            self._set(Dataset, name, self._iterating(getattr(Dataset, name), f"Dataset.{name}"))
        self._set(pq.ParquetFile, "read", self._returning(pq.ParquetFile.read, "ParquetFile.read"))
        self._set(pq.ParquetFile, "iter_batches",
                  self._iterating(pq.ParquetFile.iter_batches, "ParquetFile.iter_batches"))
        for module_name, name in self.FUNCTIONS:
            module = importlib.import_module(module_name)
            original = getattr(module, name, None)
            if original is None:
                continue
            label = f"{module_name}.{name}"
            wrap = self._iterating if inspect.isgeneratorfunction(original) else self._returning
            replacement = wrap(original, label)
            holders = [module] + [m for key, m in list(sys.modules.items())
                                  if key.startswith("tiger_ray") and m is not module
                                  and getattr(m, name, None) is original]
            for holder in holders:
                self._set(holder, name, replacement)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()
