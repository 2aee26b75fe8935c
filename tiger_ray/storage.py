"""Run locations: a local directory, or a URI that ``pyarrow.fs`` understands, as Ray's ``storage_path``.

Every stage reads and writes a local run directory. A run may instead live at a URI (``s3://``,
``gs://``, ``abfs://``, ``hdfs://``, ``file://``): ``staged_run`` then brings it into a local working
copy, yields that path to the stage, and when the stage succeeds sends back what it changed:

- files the stage created or modified are uploaded, data files first and ``*.json`` last (stages
  write their manifest / summary JSON after their data, so a reader that waits for the JSON never
  sees a half-uploaded stage);
- files the stage removed (e.g. old shards of a directory it replaced) are deleted remotely;
- nothing else is touched, so two jobs working on different stages of one run do not undo each
  other's results. A stage that fails uploads nothing.

The working copy is a temporary directory removed afterwards, or, with ``stage_dir``, the folder
``<stage_dir>/<scheme>/<bucket>/<path>``, kept between jobs: a later job then downloads only the
files that changed remotely. On a multi-node cluster the working copy must be on a filesystem every
node mounts at the same path (Ray Train workers and Serve replicas open run files by path); see
``cluster.yaml``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

# A scheme of two or more letters, so that Windows drive letters (C:\...) stay paths.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
# Copies are I/O bound and pyarrow releases the GIL while it transfers.
COPY_THREADS = 8

Signature = tuple[int, "int | None"]  # (size in bytes, modification time in ns or None)


def is_uri(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and bool(_URI.match(location))


def resolve(uri: str):
    """``(filesystem, path)`` of a URI; the error names the URI when pyarrow cannot open it."""
    import pyarrow.fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid / ArrowIOError subclass these
        raise ValueError(f"run location {uri}: {err}") from err
    return filesystem, path.rstrip("/")


def local_copy_dir(stage_dir: str | os.PathLike, uri: str) -> Path:
    """Where ``uri`` is kept under ``stage_dir``: ``s3://bucket/runs/x`` -> ``stage_dir/s3/bucket/runs/x``."""
    scheme, rest = uri.split("://", 1)
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"run location {uri}: expected scheme://bucket/path without '..'")
    return Path(stage_dir).expanduser().resolve() / scheme.lower() / Path(*parts)


# ---------------------------------------------------------------- listing

def remote_files(filesystem, root: str) -> dict[str, Signature]:
    """Every file under ``root`` as ``{relative posix path: (size, mtime_ns)}``; {} if absent."""
    import pyarrow.fs as pafs

    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return {}
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"run location {root} is a file, expected a directory")
    files = {}
    for entry in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
        if entry.type == pafs.FileType.File:
            files[posixpath.relpath(entry.path, root)] = (entry.size, entry.mtime_ns)
    return files


def local_files(root: Path) -> dict[str, Signature]:
    files = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            stat = path.stat()
            files[path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return files


# ---------------------------------------------------------------- sync state

@dataclass
class SyncState:
    """What the working copy held when it last matched the remote run, file by file."""

    remote: dict[str, Signature]
    local: dict[str, Signature]

    @classmethod
    def load(cls, path: Path) -> "SyncState":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls({k: tuple(v) for k, v in data["remote"].items()},
                       {k: tuple(v) for k, v in data["local"].items()})
        except (OSError, ValueError, KeyError, TypeError):
            return cls({}, {})  # no or unreadable record: everything counts as changed

    def save(self, path: Path) -> None:
        from tiger_ray import atomic

        atomic.write_json(path, {"remote": self.remote, "local": self.local})


def _copy_all(pairs, source_fs, destination_fs) -> None:
    import pyarrow.fs as pafs

    def copy(pair):
        source, destination = pair
        destination_fs.create_dir(posixpath.dirname(destination), recursive=True)
        pafs.copy_files(source, destination, source_filesystem=source_fs,
                        destination_filesystem=destination_fs, use_threads=False)

    with ThreadPoolExecutor(COPY_THREADS) as pool:
        list(pool.map(copy, pairs))  # list() re-raises the first failure


def _json_last(paths):
    return sorted(paths, key=lambda p: (p.endswith(".json"), p))


def download(filesystem, root: str, local: Path, state: SyncState, name: str | None = None) -> SyncState:
    """Make ``local`` an exact copy of the remote run, copying only files that differ.

    ``name`` is how logs call the remote run (its URI); ``root`` by default.
    """
    import pyarrow.fs as pafs

    remote = remote_files(filesystem, root)
    local.mkdir(parents=True, exist_ok=True)
    on_disk = local_files(local)
    # Unchanged remotely since we last synced, and untouched here (a failed job may have
    # left edits behind): keep. Remote times are required to trust a match.
    fresh = [rel for rel, sig in remote.items()
             if sig[1] is not None and state.remote.get(rel) == sig
             and rel in on_disk and state.local.get(rel) == on_disk[rel]]
    wanted = sorted(set(remote) - set(fresh))
    for rel in set(on_disk) - set(remote):
        (local / rel).unlink()  # not in the run (any more): a later stage must not see it
    _copy_all([(f"{root}/{rel}", str(local / rel)) for rel in wanted],
              filesystem, pafs.LocalFileSystem())
    log.info("staged %s into %s: %d files downloaded, %d already there",
             name or root, local, len(wanted), len(fresh))
    return SyncState(remote=remote, local=local_files(local))


def upload(filesystem, root: str, local: Path, state: SyncState, name: str | None = None) -> SyncState:
    """Send back what changed in ``local`` since ``state``: uploads, then deletions."""
    import pyarrow.fs as pafs

    now = local_files(local)
    changed = _json_last(rel for rel, sig in now.items() if state.local.get(rel) != sig)
    removed = sorted(set(state.local) - set(now))
    _copy_all([(str(local / rel), f"{root}/{rel}") for rel in changed],
              pafs.LocalFileSystem(), filesystem)
    remote = dict(state.remote)
    if changed:
        for info in filesystem.get_file_info([f"{root}/{rel}" for rel in changed]):
            remote[posixpath.relpath(info.path, root)] = (info.size, info.mtime_ns)
    deleted = 0
    if removed:
        infos = filesystem.get_file_info([f"{root}/{rel}" for rel in removed])
        for rel, info in zip(removed, infos):
            remote.pop(rel, None)
            # Delete only the version we downloaded: another job may have rewritten it since.
            if info.type == pafs.FileType.File and (info.size, info.mtime_ns) == state.remote.get(rel):
                filesystem.delete_file(info.path)
                deleted += 1
    log.info("uploaded %d changed files to %s, deleted %d", len(changed), name or root, deleted)
    return SyncState(remote=remote, local=now)


# ---------------------------------------------------------------- the context manager

@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One job at a time per kept working copy (the lock file sits beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def staged_run(location: str | os.PathLike, stage_dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a local directory holding the run at ``location``; upload changes if the block succeeds.

    A local path (or a plain path string) is yielded as it is: nothing to stage.
    """
    if not is_uri(location):
        yield Path(location).expanduser().resolve()
        return
    uri = str(location)
    filesystem, root = resolve(uri)
    if stage_dir is None:
        scratch = Path(tempfile.mkdtemp(prefix="tiger-run-"))
        try:
            local = scratch / "run"
            state = download(filesystem, root, local, SyncState({}, {}), name=uri)
            yield local
            upload(filesystem, root, local, state, name=uri)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    local = local_copy_dir(stage_dir, uri)
    record = local.with_name(local.name + ".sync.json")
    with _locked(local.with_name(local.name + ".lock")):
        state = download(filesystem, root, local, SyncState.load(record), name=uri)
        state.save(record)
        yield local
        upload(filesystem, root, local, state, name=uri).save(record)
