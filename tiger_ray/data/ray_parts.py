"""Ray Data writes of the canonical tables: Parquet parts whose name order is row order.

schema.py reads a table's parts in name order as its rows in id order, so a Ray Data write must
hand block i to write task i (``preserve_order``) and name the file by task index.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


def part_names():
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        """part-00000-0.parquet, ...: named by write task, which follows block order when the
        execution preserves order (Ray appends "-0", the file's number within its task)."""

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}.parquet"

    return PartNames()


@contextlib.contextmanager
def data_context(**options) -> Iterator[None]:
    """Set Ray Data ``DataContext`` attributes (``preserve_order`` is one of its execution
    options) for a block and restore them after. Enter it before creating the Datasets too: a
    Dataset may keep the context it was created under."""
    import ray.data

    context = ray.data.DataContext.get_current()

    def owner(name: str):
        return context.execution_options if name == "preserve_order" else context

    before = {name: getattr(owner(name), name) for name in options}
    for name, value in options.items():
        setattr(owner(name), name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(owner(name), name, value)


def write_parts(ds, path: str | Path) -> None:
    """Write ``ds`` as part-*.parquet in block order (call inside data_context(preserve_order=True))."""
    import ray.data

    # OVERWRITE: the names carry no write id (they sort in row order); the directory is new.
    ds.write_parquet(str(path), filename_provider=part_names(), mode=ray.data.SaveMode.OVERWRITE)
