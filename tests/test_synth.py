"""`tiger synth`: canonical files in parts, determinism, learnable structure, nothing in the driver."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tiger_ray import cli
from tiger_ray.data import cli as data_cli
from tiger_ray.data import synth
from tiger_ray.data.schema import (ITEMS_SCHEMA, SEQUENCES_SCHEMA, count_rows, parquet_files,
                                   read_items, read_sequences)
from tiger_ray.data.synth import SynthConfig, leaf_of, run_synth, top_cluster_of
from tiger_ray.embedding.store import load_embeddings, read_embeddings_dataset
from tiger_ray.runs import RunDir

# 5 item chunks in 2 parts, 3 user chunks in 2 parts: enough to cross every boundary.
CONFIG = SynthConfig(items=5_000, users=3_000, dim=16, clusters=8, sub_clusters=4, seed=7,
                     min_len=3, max_len=12, chunk_rows=1_000, parts=2)

# Dataset methods that bring rows into the calling process, and constructors from driver data.
ROWS_INTO_DRIVER = ["take", "take_all", "take_batch", "iter_rows", "iter_batches",
                    "iter_torch_batches", "to_pandas", "show"]
DRIVER_DATA_INTO_RAY = ["from_items", "from_numpy", "from_pandas", "from_arrow"]


def _forbidden(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"synth called {name} in the driver")
    return fail


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory, ray_local):
    """One synthetic run, generated while every way of moving rows through the driver fails."""
    import ray.data

    run = RunDir(tmp_path_factory.mktemp("synth") / "run")
    with pytest.MonkeyPatch.context() as patch:
        for name in ROWS_INTO_DRIVER:
            patch.setattr(ray.data.Dataset, name, _forbidden(f"Dataset.{name}"))
        for name in DRIVER_DATA_INTO_RAY:
            patch.setattr(ray.data, name, _forbidden(f"ray.data.{name}"))
        stats = run_synth(run, CONFIG)
    return run, stats


# --- without Ray: the generator functions ---------------------------------------------------


def test_chunks_have_the_schemas_and_depend_only_on_seed_and_chunk():
    items = synth.items_table(CONFIG, 1)
    assert items.schema == ITEMS_SCHEMA
    np.testing.assert_array_equal(items.column("item_id").to_numpy(), np.arange(1_001, 2_001))
    row = items.slice(0, 1).to_pylist()[0]
    assert row["asin"] == "S0000001001" and row["title"].endswith(" 1001")
    assert row["categories"][0][0] == "Synthetic" and row["brand"] in row["text"]
    sequences = synth.sequences_table(CONFIG, 2)  # the last, short chunk: users 2001..3000
    assert sequences.schema == SEQUENCES_SCHEMA and sequences.num_rows == 1_000
    assert synth.sequences_table(CONFIG, 2).equals(sequences)
    assert not synth.sequences_table(dataclasses.replace(CONFIG, seed=8), 2).equals(sequences)


@pytest.mark.parametrize("change, message", [
    ({"min_len": 2}, "--min-len"),
    ({"max_len": 2}, "--min-len <= --max-len"),
    ({"clusters": 5_000}, "leaves but only 5000 items"),
    ({"stay": 0.9, "sibling": 0.2}, "sum <= 1"),
    ({"items": 0}, "--items must be >= 1"),
    ({"parts": 0}, "--parts must be >= 1"),
])
def test_bad_configs_name_the_flag(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CONFIG, **change).validate()


# --- a generated run ------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize("items", [12_000, 100_000, 1_000_000, 10_000_000])
def test_default_sub_clusters_grow_with_the_catalog(items):
    # A leaf's items differ only in the last Semantic-ID code (256 values): a fixed 256 leaves
    # put ~3,900 items in one leaf at 1M and overflowed the collision token.
    config = SynthConfig(items=items)
    assert config.sub_clusters >= synth.MIN_SUB_CLUSTERS
    assert items / config.leaves <= synth.ITEMS_PER_LEAF
    assert SynthConfig(items=items, sub_clusters=3).sub_clusters == 3  # explicit wins


def test_run_has_the_canonical_files_in_parts(synth_run):
    run, stats = synth_run
    assert [p.name for p in parquet_files(run.items)] == ["part-00000-0.parquet", "part-00001-0.parquet"]
    assert len(parquet_files(run.sequences)) == 2
    assert all(pq.read_schema(p) == ITEMS_SCHEMA for p in parquet_files(run.items))
    assert all(pq.read_schema(p) == SEQUENCES_SCHEMA for p in parquet_files(run.sequences))
    items, sequences = read_items(run.items), read_sequences(run.sequences)
    np.testing.assert_array_equal(items.column("item_id").to_numpy(), np.arange(1, 5_001))
    np.testing.assert_array_equal(sequences.user_ids, np.arange(1, 3_001))
    assert len(set(items.column("asin").to_pylist())) == 5_000
    assert sequences.lengths.min() >= 3 and sequences.lengths.max() <= 12
    assert set(np.unique(sequences.flat)) <= set(range(1, 5_001))
    saved = json.loads(run.stats.read_text())
    assert saved == stats
    assert {k: stats[k] for k in ("dataset", "items", "users", "interactions")} == {
        "dataset": "synthetic", "items": 5_000, "users": 3_000,
        "interactions": int(sequences.lengths.sum())}
    assert stats["config"] == dataclasses.asdict(CONFIG)
    assert not [p for p in run.root.parent.iterdir() if p.name.startswith(".")]  # no temp left


@pytest.mark.ray
def test_embeddings_are_a_complete_store_that_clusters(synth_run):
    run, _ = synth_run
    manifest = json.loads((run.embeddings / "manifest.json").read_text())
    assert (manifest["model"], manifest["dim"], manifest["count"]) == ("synthetic", 16, 5_000)
    assert manifest["source"] == synth.source_key(CONFIG)
    item_ids, vectors = load_embeddings(run)
    np.testing.assert_array_equal(item_ids, np.arange(1, 5_001))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert read_embeddings_dataset(run).count() == 5_000

    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 5_001, (2, 20_000))
    cosine = np.sum(vectors[a - 1] * vectors[b - 1], axis=1)
    same_leaf = leaf_of(CONFIG, a) == leaf_of(CONFIG, b)
    same_top = top_cluster_of(CONFIG, a) == top_cluster_of(CONFIG, b)
    leaf, sibling, far = (cosine[same_leaf].mean(), cosine[same_top & ~same_leaf].mean(),
                          cosine[~same_top].mean())
    assert leaf > sibling + 0.1 and sibling > far + 0.2, (leaf, sibling, far)


@pytest.mark.ray
def test_users_walk_between_related_clusters_with_a_popularity_skew(synth_run):
    run, _ = synth_run
    sequences = read_sequences(run.sequences)
    current = np.concatenate([s[:-1] for s in map(sequences.__getitem__, range(len(sequences)))])
    following = np.concatenate([s[1:] for s in map(sequences.__getitem__, range(len(sequences)))])
    same_top = np.mean(top_cluster_of(CONFIG, current) == top_cluster_of(CONFIG, following))
    same_leaf = np.mean(leaf_of(CONFIG, current) == leaf_of(CONFIG, following))
    assert same_top > 0.9 and same_leaf > 0.7  # chance: 1/8 and 1/32
    # Rank 0 of every leaf (ids 1..leaves, 0.6% of the catalog) is drawn far more than its share.
    assert np.mean(sequences.flat <= CONFIG.leaves) > 0.1


@pytest.mark.ray
def test_same_seed_gives_the_same_content_however_it_is_split(synth_run, tmp_path):
    run, _ = synth_run
    other = RunDir(tmp_path / "other")
    run_synth(other, dataclasses.replace(CONFIG, parts=3))
    assert len(parquet_files(other.items)) == 3
    assert read_items(other.items).equals(read_items(run.items))
    assert read_items(other.sequences).equals(read_items(run.sequences))
    np.testing.assert_array_equal(load_embeddings(other)[1], load_embeddings(run)[1])


@pytest.mark.ray
def test_a_failed_synth_leaves_no_run_and_an_existing_run_is_kept(ray_local, tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    small = dataclasses.replace(CONFIG, items=500, users=200, chunk_rows=100, parts=None)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_write_embeddings", killed)
    with pytest.raises(KeyboardInterrupt):
        run_synth(run, small)
    assert list(tmp_path.iterdir()) == []  # neither the run nor its staging directory

    run.root.mkdir()
    (run.root / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty.*--overwrite"):
        run_synth(run, small)
    assert [p.name for p in run.root.iterdir()] == ["notes.txt"]


@pytest.mark.ray
def test_large_synthetic_run_helper_for_other_tests(ray_local, tmp_path):
    from tiger_ray.testing.synthetic import make_large_synthetic_run

    run = make_large_synthetic_run(tmp_path / "run", n_items=1_000, n_users=300, dim=8,
                                   clusters=4, chunk_rows=400)
    assert count_rows(run.items) == 1_000 and count_rows(run.sequences) == 300
    assert load_embeddings(run)[1].shape == (1_000, 8)


@pytest.mark.ray
def test_tiger_synth_command(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", (data_cli,))
    out = tmp_path / "run"
    code = cli.main(["synth", "--out", str(out), "--items", "300", "--users", "50", "--dim", "8",
                     "--clusters", "4", "--sub-clusters", "2", "--seed", "3", "--min-len", "4",
                     "--max-len", "6"])
    assert code == 0
    assert "300 items, 50 users" in capsys.readouterr().out
    assert count_rows(RunDir(out).items) == 300
    assert json.loads((out / "stats.json").read_text())["config"]["seed"] == 3
    assert cli.main(["synth", "--out", str(out), "--items", "300", "--users", "50"]) == 2
