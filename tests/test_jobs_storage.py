"""tiger_ray.storage: staging a run that lives at a URI, on file:// and pyarrow's local filesystems."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tiger_ray import storage


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def remote(tmp_path) -> Path:
    """A run as a remote store would hold it (a plain folder behind file://)."""
    root = tmp_path / "bucket" / "runs" / "beauty"
    write(root / "items.parquet", "items v1")
    write(root / "sequences.parquet", "sequences v1")
    write(root / "embeddings" / "part-00000.parquet", "shard 0")
    write(root / "embeddings" / "part-00001.parquet", "shard 1")
    write(root / "embeddings" / "manifest.json", '{"shards": 2}')
    return root


def uri(path: Path) -> str:
    return "file://" + str(path)


def record_copies(monkeypatch) -> list[list[str]]:
    """Spy on every batch of copies: the relative destination paths, in order."""
    batches: list[list[str]] = []
    real = storage._copy_all

    def spy(pairs, source_fs, destination_fs):
        pairs = list(pairs)
        batches.append([destination for _, destination in pairs])
        real(pairs, source_fs, destination_fs)

    monkeypatch.setattr(storage, "_copy_all", spy)
    return batches


def test_is_uri_and_local_copy_dir(tmp_path):
    assert storage.is_uri("s3://bucket/runs/beauty")
    assert storage.is_uri("gs://b/r") and storage.is_uri("file:///tmp/r")
    assert not storage.is_uri("runs/beauty")
    assert not storage.is_uri("/abs/runs/beauty")
    assert not storage.is_uri(r"C:\runs\beauty")  # a drive letter is not a scheme
    assert not storage.is_uri(tmp_path)  # Path objects are always local
    assert storage.local_copy_dir(tmp_path, "s3://bucket/runs/beauty/") == tmp_path / "s3/bucket/runs/beauty"
    with pytest.raises(ValueError, match=r"\.\."):
        storage.local_copy_dir(tmp_path, "s3://bucket/../etc")


def test_local_path_is_used_in_place(tmp_path):
    with storage.staged_run(str(tmp_path / "run")) as local:
        assert local == (tmp_path / "run").resolve()


def test_round_trip_uploads_changes_and_deletions(remote, monkeypatch):
    batches = record_copies(monkeypatch)
    with storage.staged_run(uri(remote)) as local:
        scratch = local
        assert tree(local) == tree(remote)
        # A stage replaces embeddings/ with one shard and writes a new folder.
        (local / "embeddings" / "part-00001.parquet").unlink()
        write(local / "embeddings" / "part-00000.parquet", "shard 0, v2")
        write(local / "embeddings" / "manifest.json", '{"shards": 1}')
        write(local / "semantic_ids" / "semantic_ids.parquet", "codes")
        write(local / "semantic_ids" / "report.json", "{}")
    assert not scratch.exists(), "the temporary working copy is removed"
    assert tree(remote) == {
        "items.parquet": "items v1",
        "sequences.parquet": "sequences v1",
        "embeddings/part-00000.parquet": "shard 0, v2",
        "embeddings/manifest.json": '{"shards": 1}',
        "semantic_ids/semantic_ids.parquet": "codes",
        "semantic_ids/report.json": "{}",
    }
    uploaded = [Path(p).relative_to(remote).as_posix() for p in batches[-1]]
    assert sorted(uploaded) == ["embeddings/manifest.json", "embeddings/part-00000.parquet",
                                "semantic_ids/report.json", "semantic_ids/semantic_ids.parquet"]
    assert [p.endswith(".json") for p in uploaded] == [False, False, True, True], "JSON goes last"


def test_new_run_location_is_created(tmp_path):
    target = tmp_path / "bucket" / "new-run"
    with storage.staged_run(uri(target)) as local:
        assert list(local.iterdir()) == []
        write(local / "stats.json", "{}")
    assert tree(target) == {"stats.json": "{}"}


def test_failure_uploads_nothing(remote):
    before = tree(remote)
    with pytest.raises(RuntimeError, match="stage crashed"):
        with storage.staged_run(uri(remote)) as local:
            write(local / "items.parquet", "half-written")
            (local / "sequences.parquet").unlink()
            raise RuntimeError("stage crashed")
    assert tree(remote) == before


def test_kept_copy_downloads_only_what_changed(remote, tmp_path, monkeypatch):
    stage_dir = tmp_path / "stage"
    batches = record_copies(monkeypatch)
    with storage.staged_run(uri(remote), stage_dir=stage_dir) as local:
        assert local == storage.local_copy_dir(stage_dir, uri(remote))
        write(local / "seq2seq" / "model.pt", "weights")
    assert len(batches[0]) == 5  # first time: everything

    # Another job rewrites a file remotely; a failed job leaves junk and an edit in the copy.
    write(remote / "items.parquet", "items v2 (re-prepared)")
    with pytest.raises(RuntimeError):
        with storage.staged_run(uri(remote), stage_dir=stage_dir) as local:
            write(local / "junk.tmp", "left behind")
            write(local / "sequences.parquet", "edited, not uploaded")
            raise RuntimeError("failed job")

    batches.clear()
    with storage.staged_run(uri(remote), stage_dir=stage_dir) as local:
        assert tree(local) == tree(remote), "the copy mirrors the remote run again"
    downloaded = sorted(Path(p).relative_to(local).as_posix() for p in batches[0])
    assert downloaded == ["sequences.parquet"], "only the file the failed job touched"
    assert batches[1] == [], "nothing changed, nothing uploaded"


def test_a_change_made_remotely_is_downloaded(remote, tmp_path):
    stage_dir = tmp_path / "stage"
    with storage.staged_run(uri(remote), stage_dir=stage_dir):
        pass
    write(remote / "items.parquet", "items v2, longer")
    (remote / "embeddings" / "part-00001.parquet").unlink()
    with storage.staged_run(uri(remote), stage_dir=stage_dir) as local:
        assert tree(local) == tree(remote)


def test_delete_spares_a_file_another_job_rewrote(remote, tmp_path):
    with storage.staged_run(uri(remote)) as local:
        (local / "items.parquet").unlink()
        (local / "sequences.parquet").unlink()
        write(remote / "items.parquet", "items rewritten meanwhile by another job")
        os.utime(remote / "items.parquet", ns=(1, 1))  # make sure its signature differs
    assert tree(remote).get("items.parquet") == "items rewritten meanwhile by another job"
    assert "sequences.parquet" not in tree(remote)


def test_subtree_filesystem_paths_like_an_object_store(remote, tmp_path):
    """Bucket-relative paths without a leading slash, as S3/GCS give them."""
    filesystem = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    root = "bucket/runs/beauty"
    assert set(storage.remote_files(filesystem, root)) == set(tree(remote))
    local = tmp_path / "copy"
    state = storage.download(filesystem, root, local, storage.SyncState({}, {}))
    assert tree(local) == tree(remote)
    write(local / "compare" / "table.md", "| model | recall |")
    state = storage.upload(filesystem, root, local, state)
    assert tree(remote)["compare/table.md"] == "| model | recall |"
    assert state.remote["compare/table.md"][0] == len("| model | recall |")


def test_a_file_is_not_a_run_location(tmp_path):
    write(tmp_path / "file.txt", "x")
    with pytest.raises(ValueError, match="is a file"):
        with storage.staged_run(uri(tmp_path / "file.txt")):
            pass


def test_unknown_scheme_names_the_location():
    with pytest.raises(ValueError, match="nosuchfs://bucket/run"):
        with storage.staged_run("nosuchfs://bucket/run"):
            pass
