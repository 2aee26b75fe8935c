"""Settings resolve as defaults < preset < --config FILE < flags, for every stage."""

from __future__ import annotations

import json

import pytest

from tiger_ray import cli
from tiger_ray.config import build_config, read_config_file
from tiger_ray.seq2seq.presets import PRESETS, Seq2SeqTrainConfig


def print_config(capsys, *argv) -> dict:
    assert cli.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_file_overrides_the_preset_and_flags_override_the_file(tmp_path, capsys):
    settings = tmp_path / "seq2seq.yaml"
    settings.write_text("lr: 0.5\nbatch-size: 7\nmax_steps: 11\n")
    shown = print_config(capsys, "train-seq2seq", "--preset", "tiny", "--config", str(settings),
                         "--max-steps", "3", "--print-config")
    assert shown["lr"] == 0.5 and shown["batch_size"] == 7  # the file beat the tiny preset
    assert shown["max_steps"] == 3  # the flag beat the file
    assert shown["num_user_buckets"] == PRESETS["tiny"]["num_user_buckets"]  # preset kept
    # the handler builds the very config --print-config shows
    args = cli.build_parser().parse_args(["train-seq2seq", "--run", str(tmp_path), "--preset", "tiny",
                                          "--config", str(settings), "--max-steps", "3"])
    config = build_config(Seq2SeqTrainConfig, args, PRESETS["tiny"])
    assert (config.lr, config.batch_size, config.max_steps) == (0.5, 7, 3)


def test_json_file_and_a_stage_with_two_configs(tmp_path, capsys):
    settings = tmp_path / "baseline.json"
    settings.write_text(json.dumps({"dim": 48, "index_type": "ivfpq"}))
    shown = print_config(capsys, "train-baseline", "--config", str(settings), "--print-config")
    assert shown["BaselineConfig"]["dim"] == 48
    assert shown["IndexConfig"]["index_type"] == "ivfpq"


def test_evaluate_flags_come_from_its_config(capsys):
    shown = print_config(capsys, "evaluate", "--split", "valid", "test", "--beam-size", "30",
                         "--cold-start", "--print-config")
    assert shown["split"] == ["valid", "test"] and shown["beam_size"] == 30 and shown["cold_start"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["evaluate", "--model", "sasrec"])


@pytest.mark.parametrize("name, text, message", [
    ("bad.json", '{"lr": 0.1,\n "dim": }', "bad.json:2: not valid JSON"),
    ("bad.yaml", "lr: 0.1\n  dim: [\n", "bad.yaml:2: not valid YAML"),
    ("list.yaml", "- lr\n", "expected a mapping"),
])
def test_a_malformed_file_names_itself_and_the_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_config_file(path)


def test_an_unknown_setting_is_an_error_naming_it(tmp_path, capsys):
    settings = tmp_path / "typo.yaml"
    settings.write_text("learning_rate: 0.1\n")
    assert cli.main(["train-seq2seq", "--run", str(tmp_path), "--config", str(settings)]) == 2
    err = capsys.readouterr().err
    assert "typo.yaml: unknown setting(s) learning_rate" in err and "--print-config" in err
    assert not (tmp_path / "seq2seq").exists()  # nothing ran


def test_run_is_required_unless_printing(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train-rqvae"])
    assert "--run" in capsys.readouterr().err
