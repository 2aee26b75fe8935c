"""The README's Python API example runs as written, and bad settings fail clearly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import tiger_ray

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.ray
def test_readme_example_runs(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)  # our own README, not data
    metrics = namespace["metrics"]["test"]
    assert metrics["count"] == 200 and 0.0 <= metrics["recall@10"] <= 1.0
    shown = capsys.readouterr().out.strip().splitlines()[-1]
    items = [int(i) for i in re.findall(r"\d+", shown)]
    assert len(items) == 10 and len(set(items)) == 10
    assert all(1 <= i <= 2000 for i in items)  # catalog ids of the tiny synthetic run
    assert (tmp_path / "runs/api-demo/seq2seq/best").is_dir()


def test_unknown_settings_and_presets_are_errors(tmp_path):
    with pytest.raises(TypeError, match="unknown setting.*learning_rate.*choose from"):
        tiger_ray.train_seq2seq(tmp_path, learning_rate=0.1)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        tiger_ray.train_rqvae(tmp_path, preset="huge")
    assert not any(tmp_path.iterdir())  # nothing ran
    with pytest.raises(AttributeError):
        tiger_ray.no_such_stage
