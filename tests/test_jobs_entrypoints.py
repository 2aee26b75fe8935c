"""jobs/*.py: every entrypoint answers --help with the `tiger` command's own flags, and a --run URI
is staged in and uploaded only on success (in process, no Ray)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
ENTRYPOINTS = sorted(p for p in JOBS.glob("*.py") if not p.name.startswith("_") and p.name != "local_head.py")


def load_job_module():
    spec = importlib.util.spec_from_file_location("tiger_jobs_common", JOBS / "_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_job = load_job_module()


def stage_command(path: Path) -> str:
    """The `tiger` command an entrypoint runs, read from its `main("...")` call."""
    text = path.read_text()
    start = text.index('main("') + len('main("')
    return text[start:text.index('"', start)]


def test_one_entrypoint_per_stage_and_the_pipeline():
    names = {p.stem for p in ENTRYPOINTS}
    assert names == {"prepare", "synth", "embed", "train_rqvae", "train_seq2seq", "train_baseline",
                     "tune_hybrid", "evaluate", "compare", "deploy", "pipeline"}
    assert stage_command(JOBS / "deploy.py") == "serve"
    for path in ENTRYPOINTS:
        if path.stem != "deploy":
            assert stage_command(path) == path.stem.replace("_", "-")


def tiger_help(command: str, capsys) -> str:
    from tiger_ray.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("path", [*ENTRYPOINTS, JOBS / "local_head.py"], ids=lambda p: p.name)
def test_help(path, capsys):
    result = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python jobs/{path.name}")
    if path in ENTRYPOINTS:
        # The command's own flags (one config system) plus the job options.
        flags = {w.rstrip(",") for w in tiger_help(stage_command(path), capsys).split() if w.startswith("--")}
        assert flags
        assert all(flag in result.stdout for flag in flags), flags
        assert "--stage-dir" in result.stdout and "--run" in result.stdout


def test_a_bad_flag_is_refused_before_anything_is_staged(tmp_path, capsys):
    remote = tmp_path / "remote"
    with pytest.raises(SystemExit) as exit_info:
        _job.main("prepare", ["--run", f"file://{remote}", "--no-such-flag"], prog="python jobs/prepare.py")
    assert exit_info.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err
    assert not remote.exists()


def test_replace_location():
    argv = ["--preset", "tiny", "--run", "s3://b/r", "--out=s3://b/r", "--items", "x"]
    assert _job.replace_location(argv, "s3://b/r", "/tmp/w") == [
        "--preset", "tiny", "--run", "/tmp/w", "--out=/tmp/w", "--items", "x"]


def write_sequences_dataset(folder: Path) -> tuple[Path, Path]:
    """A tiny catalog in `tiger prepare --format sequences` form (string ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    sequences, items = folder / "sequences.txt", folder / "items.jsonl"
    sequences.write_text("alice a b c d e\nbob b c d e f\ncarol c d e f a\ndave d e f a b\n")
    items.write_text("".join(json.dumps({"item_id": i, "title": f"item {i}"}) + "\n" for i in "abcdef"))
    return sequences, items


def test_prepare_into_a_uri(tmp_path):
    sequences, items = write_sequences_dataset(tmp_path / "data")
    remote = tmp_path / "bucket" / "runs" / "mini"
    code = _job.main("prepare", ["--format", "sequences", "--sequences", str(sequences), "--items",
                                 str(items), "--run", f"file://{remote}"], prog="python jobs/prepare.py")
    assert code == 0
    assert pq.read_table(remote / "sequences.parquet").num_rows == 4
    assert pq.read_table(remote / "items.parquet").num_rows == 6
    assert json.loads((remote / "stats.json").read_text())["users"] == 4


def test_a_failed_command_uploads_nothing(tmp_path, capsys):
    remote = tmp_path / "bucket" / "run"
    remote.mkdir(parents=True)
    (remote / "keep.txt").write_text("untouched")
    stage_dir = tmp_path / "stage"
    # train-rqvae before embed: the command fails with its own message and exit code 2.
    code = _job.main("train-rqvae", ["--preset", "tiny", "--run", f"file://{remote}",
                                     "--stage-dir", str(stage_dir)], prog="python jobs/train_rqvae.py")
    assert code == 2
    err = capsys.readouterr().err
    assert "tiger embed" in err and "nothing was uploaded" in err
    assert sorted(p.name for p in remote.iterdir()) == ["keep.txt"]


def test_relative_run_inside_a_ray_job_is_refused(monkeypatch, capsys):
    monkeypatch.setenv(_job.RAY_JOB_CONFIG_ENV,
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}, "metadata": {}}))
    code = _job.main("prepare", ["--dataset", "beauty", "--run", "runs/beauty"], prog="python jobs/prepare.py")
    assert code == 2
    assert "relative path" in capsys.readouterr().err


def test_serving_a_uri_needs_a_kept_working_copy(monkeypatch, capsys):
    monkeypatch.delenv(_job.STAGE_DIR_ENV, raising=False)
    code = _job.main("serve", ["--run", "s3://bucket/runs/beauty", "--detach"], prog="python jobs/deploy.py")
    assert code == 2
    assert "--stage-dir" in capsys.readouterr().err
