"""`tiger prepare --engine ray`: the Ray Data engine writes the in-memory engine's rows, holds no
rows in the driver, reports bad input by file and line, and leaves a failed run untouched."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from tiger_ray import cli
from tiger_ray.data import cli as data_cli
from tiger_ray.data import prepare_config, prepare_stream
from tiger_ray.data.prepare import PrepareConfig, run_prepare
from tiger_ray.data.schema import (ITEMS_SCHEMA, SEQUENCES_SCHEMA, count_rows, parquet_files,
                                   read_items, read_sequences)
from tiger_ray.runs import RunDir
from tiger_ray.testing.driver_rows import DriverRowCounter

N_USERS, N_ITEMS, N_COLD = 2_000, 1_000, 100
# Keys that differ between two runs of different engines on differently split copies of one input.
RUN_KEYS = ("dataset", "inputs", "config")
# What reaches the driver: per-file counts, a length histogram, per-block sums. DriverRowCounter
# also counts each result of Ray Data's own bookkeeping ray.get calls (task metadata, None) as a
# row, which grows with the number of tasks, not with users or items; hence the margin.
DRIVER_ROWS = 500

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_module():
    """One Ray for this module, shut down at its end."""
    import ray

    from tiger_ray.ray_env import init_ray

    # On a busy 2-core machine the local node may miss Ray's fixed 30 s to register; try again.
    for attempt in range(3):
        try:
            started = init_ray(num_cpus=2)
            break
        except Exception as err:
            if "timed out during startup" not in str(err) or attempt == 2:
                raise
            ray.shutdown()
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    if started:
        ray.shutdown()


def write_lines(path, lines):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return path


def write_parts(folder, name, lines, parts, suffixes):
    """``lines`` split into ``parts`` files of ``folder`` (name order = line order)."""
    folder.mkdir(parents=True)
    size = -(-len(lines) // parts)
    for i in range(parts):
        write_lines(folder / f"{name}-{i}{suffixes[i % len(suffixes)]}", lines[i * size:(i + 1) * size])
    return folder


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """String ids, items shared by many users, lengths 3..12, metadata in shuffled order with
    missing fields and cold rows; as part files (ray) and as single files (local)."""
    rng = random.Random(5)
    base = tmp_path_factory.mktemp("catalog")
    sequences = [f"user-{u:04d} " + " ".join(f"sku-{rng.randrange(N_ITEMS)}"
                                              for _ in range(rng.randint(3, 12)))
                 for u in range(N_USERS)]
    keys = [f"sku-{i}" for i in range(N_ITEMS + N_COLD)]
    rng.shuffle(keys)
    items = [json.dumps({"item_id": key, "title": f"Item {key}" if i % 3 else None,
                         "brand": "Acme" if i % 4 else None, "price": i * 0.5 if i % 5 else None,
                         "categories": [["Shop", f"Aisle {i % 7}"]] if i % 6 else None})
             for i, key in enumerate(keys)]
    return {
        "ray": (write_parts(base / "sequences", "part", sequences, 3, [".txt", ".txt.gz"]),
                write_parts(base / "items", "items", items, 2, [".jsonl.gz", ".jsonl"])),
        "local": (write_lines(base / "sequences.txt", sequences),
                  write_lines(base / "items.jsonl", items)),
    }


def prepare(run, files, engine, **options):
    sequences, items = files
    return run_prepare(run, PrepareConfig(format="sequences", sequences=str(sequences),
                                          items=str(items), engine=engine, **options))


def assert_same_run(streamed: RunDir, local: RunDir, streamed_stats: dict, local_stats: dict):
    assert len(parquet_files(streamed.items)) >= 1 and streamed.items.is_dir()
    assert all(read_items(p).schema == ITEMS_SCHEMA for p in parquet_files(streamed.items))
    assert all(read_items(p).schema == SEQUENCES_SCHEMA for p in parquet_files(streamed.sequences))
    assert read_items(streamed.items).equals(read_items(local.items))
    assert read_items(streamed.sequences).equals(read_items(local.sequences))
    assert {k: v for k, v in streamed_stats.items() if k not in RUN_KEYS} == {
        k: v for k, v in local_stats.items() if k not in RUN_KEYS}
    assert json.loads(streamed.stats.read_text()) == streamed_stats
    assert streamed_stats["config"]["engine"] == "ray" and local_stats["config"]["engine"] == "local"
    # No scratch or temporary directory left in the run or beside it.
    assert not [p for p in [*streamed.root.iterdir(), *streamed.root.parent.iterdir()]
                if p.name.startswith(".")]


def test_streamed_rows_equal_the_in_memory_rows_and_stay_out_of_the_driver(
        ray_module, catalog, tmp_path):
    local = RunDir(tmp_path / "local")
    local_stats = prepare(local, catalog["local"], "local")
    streamed = RunDir(tmp_path / "streamed")
    with DriverRowCounter() as rows:
        streamed_stats = prepare(streamed, catalog["ray"], "ray")
    assert_same_run(streamed, local, streamed_stats, local_stats)
    assert streamed_stats["users"] == N_USERS and streamed_stats["items"] < N_ITEMS + N_COLD
    assert streamed_stats["metadata_rows_without_interactions_dropped"] >= N_COLD
    assert rows.total < DRIVER_ROWS, dict(rows.by_call)
    consumed = sum(n for call, n in rows.by_call.items() if call.startswith("Dataset."))
    assert consumed < 50, dict(rows.by_call)  # what the engine itself takes from Datasets


@pytest.mark.slow  # k-core passes are several Ray Data jobs each
def test_k_core_and_cold_items_match_too(ray_module, catalog, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_stream, "BUCKET_BYTES", 20_000)  # several join buckets
    options = {"k_core": 6, "keep_cold_items": True}
    local = RunDir(tmp_path / "local")
    local_stats = prepare(local, catalog["local"], "local", **options)
    streamed = RunDir(tmp_path / "streamed")
    streamed_stats = prepare(streamed, catalog["ray"], "ray", **options)
    assert_same_run(streamed, local, streamed_stats, local_stats)
    report = streamed_stats["k_core"]
    assert report["passes"] >= 2 and report["users_removed"] > 0  # the filter really iterated
    assert streamed_stats["items"] == N_ITEMS + N_COLD  # cold items kept, after the rest


ITEMS_ABCD = [json.dumps({"item_id": x}) for x in "abcd"]


@pytest.mark.parametrize("sequence_parts, item_parts, message", [
    ([["u1 a b c"], ["u2 a b c", "u3 a ghost b"]], [ITEMS_ABCD],
     r"^1 item ids in the sequences have no metadata row: ghost \(first in .*s-1\.txt:2\)$"),
    ([["u1 a b c", "u2 b c d"], ["u3 a b c", "u1 c b a"]], [ITEMS_ABCD],
     r"s-1\.txt:2: user 'u1' appears again \(first at .*s-0\.txt:1\)"),
    ([["u1 a b c", "u2 a b"], ["u3 a b c d"]], [ITEMS_ABCD],
     r"^1 of 3 users have fewer than 3 items .*: u2 \(2 items, .*s-0\.txt:2\)"),
    ([["u1 a b c"], ["u2 a b c"]], [ITEMS_ABCD[:2], [ITEMS_ABCD[2], '{"item_id": "d"']],
     r"i-1\.jsonl:2: not valid JSON"),
])
def test_bad_input_names_file_and_line_and_leaves_the_run_as_it_was(
        ray_module, tmp_path, sequence_parts, item_parts, message):
    sequences, items = tmp_path / "seqs", tmp_path / "items"
    sequences.mkdir(), items.mkdir()
    for i, lines in enumerate(sequence_parts):
        write_lines(sequences / f"s-{i}.txt", lines)
    for i, lines in enumerate(item_parts):
        write_lines(items / f"i-{i}.jsonl", lines)
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    (run.root / "notes.txt").write_text("mine")
    run.stats.write_text("{}")
    before = {p.name: p.read_bytes() for p in run.root.iterdir()}
    with pytest.raises(ValueError, match=message) as err:
        prepare(run, (sequences, items), "ray")
    assert type(err.value) is ValueError  # unwrapped from Ray's task error
    assert {p.name: p.read_bytes() for p in run.root.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items", "run", "seqs"]


def test_cli_engine_ray_replaces_a_local_run_with_parts_the_readers_open(
        ray_module, catalog, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", (data_cli,))
    sequences, items = catalog["ray"]
    out = tmp_path / "run"
    prepare(RunDir(out), catalog["local"], "local")  # one-file tables, replaced by parts below
    code = cli.main(["prepare", "--engine", "ray", "--format", "sequences", "--sequences",
                     str(sequences), "--items", str(items), "--out", str(out)])
    assert code == 0
    assert "interactions" in capsys.readouterr().out
    run = RunDir(out)
    assert run.items.is_dir() and run.sequences.is_dir()
    assert count_rows(run.sequences) == N_USERS
    loaded = read_sequences(run.sequences)
    assert loaded.user_ids.tolist() == list(range(1, N_USERS + 1))
    assert loaded.flat.max() == count_rows(run.items)
    assert json.loads(run.stats.read_text())["config"]["engine"] == "ray"
    assert sorted(p.name for p in out.iterdir()) == ["items.parquet", "sequences.parquet",
                                                     "stats.json"]


# --- engine choice, without Ray ---------------------------------------------------------------


def test_auto_engine_streams_parts_and_large_inputs_only(catalog, monkeypatch):
    def engine(files, **options) -> str:
        sequences, items = files
        return prepare_config.choose_engine(PrepareConfig(
            format="sequences", sequences=str(sequences), items=str(items), **options))

    assert engine(catalog["local"]) == "local"
    assert engine(catalog["ray"]) == "ray"  # directories of parts
    assert engine((catalog["ray"][0] / "part-*", catalog["ray"][1])) == "ray"  # a glob
    monkeypatch.setattr(prepare_config, "AUTO_RAY_BYTES", 1_000)
    assert engine(catalog["local"]) == "ray"
    assert engine(catalog["local"], engine="local") == "local"


def test_mcauley_format_is_refused_by_the_streaming_engine(tmp_path):
    with pytest.raises(ValueError, match="--format mcauley is not supported by the streaming "
                                         r"engine \(--engine ray\); use --engine local"):
        run_prepare(RunDir(tmp_path / "run"), PrepareConfig(format="mcauley", dataset="beauty",
                                                            engine="ray"))
    assert not (tmp_path / "run").exists()
