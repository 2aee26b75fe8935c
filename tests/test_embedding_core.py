"""Embedding without Ray: duplicate-text planning, shard trust rules, encoder loading errors."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tiger_ray import atomic
from tiger_ray.data.schema import ITEMS_SCHEMA
from tiger_ray.embedding.encoder import (DEFAULT_MODEL, EncoderLoadError, check_model, encode,
                                         load_encoder, resolve_model)
from tiger_ray.embedding.plan import AliasMap, IdRanges, text_groups
from tiger_ray.embedding.store import (MANIFEST, SHARD_KEY, load_embeddings, scan_shards,
                                       write_manifest, write_shard)
from tiger_ray.runs import RunDir

KEY = {"model": "m", "normalized": True, "items_sha256": "abc"}


def _write_items(path, texts):
    rows = [{"item_id": i, "asin": None, "title": None, "brand": None, "categories": None,
             "price": None, "text": t} for i, t in enumerate(texts, 1)]
    atomic.write_parquet(path, pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA))


def test_text_groups_map_each_duplicate_to_the_smallest_item_id(tmp_path):
    _write_items(tmp_path / "items.parquet", ["a", "b", "a", "c", "b", "a", "A"])
    groups = text_groups(tmp_path / "items.parquet", batch_rows=2)  # several record batches
    assert groups.item_ids.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert groups.canonical.tolist() == [1, 2, 1, 4, 2, 1, 7]  # "A" != "a": exact text only
    assert groups.num_texts == 4
    aliases = groups.aliases
    assert sorted(zip(aliases.alias.tolist(), aliases.canonical.tolist())) == [(3, 1), (5, 2), (6, 1)]
    # a shard with items 1 and 4 carries copies for 3 and 6, taken from item 1's row (index 1)
    alias_ids, source = aliases.expand(np.array([4, 1]))
    assert sorted(zip(alias_ids.tolist(), source.tolist())) == [(3, 1), (6, 1)]
    assert groups.partial_groups(np.array([1, 3, 6, 2])).tolist() == [2]  # 5 missing from b's group


def test_id_ranges_and_empty_alias_map():
    ranges = IdRanges.from_ids(np.array([8, 1, 2, 3, 7, 10, 2]))
    assert list(zip(ranges.starts, ranges.ends)) == [(1, 3), (7, 8), (10, 10)]
    assert len(ranges) == 6
    assert ranges.contains(np.array([0, 1, 3, 4, 6, 7, 9, 10, 11])).tolist() == \
        [False, True, True, False, False, True, False, True, False]
    assert not IdRanges.from_ids(np.array([], np.int64)).contains(np.array([1])).any()
    empty = AliasMap(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert [len(a) for a in empty.expand(np.array([1, 2]))] == [0, 0]


def test_scan_trusts_only_complete_shards_of_the_same_key(tmp_path):
    vectors = np.eye(4, dtype=np.float32)
    first = write_shard(tmp_path, np.array([2, 1]), vectors[:2], KEY)
    assert first == "part-0000000001-0000000002.parquet"
    table = pq.read_table(tmp_path / first)
    assert table.column("item_id").to_pylist() == [1, 2]  # sorted, vectors follow their ids
    assert np.array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                          vectors[[1, 0]])
    assert json.loads(table.schema.metadata[SHARD_KEY]) == {**KEY, "dim": 4, "count": 2}
    write_shard(tmp_path, np.array([3]), vectors[2:3], KEY)
    other = write_shard(tmp_path, np.array([4]), vectors[3:], {**KEY, "model": "other"})
    overlap = write_shard(tmp_path, np.array([2, 5]), vectors[:2], KEY)  # a redone batch
    (tmp_path / ".part-0000000006-0000000006.parquet.tmp-1234abcd").write_bytes(b"PAR1 half")
    good = (tmp_path / first).read_bytes()
    (tmp_path / "part-0000000007-0000000008.parquet").write_bytes(good[: len(good) // 2])

    scan = scan_shards(tmp_path, KEY)
    assert [s.name for s in scan.trusted] == [first, "part-0000000003-0000000003.parquet"]
    assert sorted(p.name for p in scan.untrusted) == sorted([
        other, overlap, ".part-0000000006-0000000006.parquet.tmp-1234abcd",
        "part-0000000007-0000000008.parquet"])


def test_manifest_lists_shards_for_load_embeddings(tmp_path):
    run = RunDir(tmp_path)
    run.embeddings.mkdir()
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 3)).astype(np.float32)
    files = [write_shard(run.embeddings, np.array([5, 3]), vectors[[4, 2]], KEY),
             write_shard(run.embeddings, np.array([1, 2, 4]), vectors[[0, 1, 3]], KEY)]
    write_manifest(run.embeddings, files, model="m", dim=3, normalized=False, count=5, source=KEY)
    ids, loaded = load_embeddings(run)
    assert ids.tolist() == [1, 2, 3, 4, 5] and np.array_equal(loaded, vectors)
    manifest = json.loads((run.embeddings / MANIFEST).read_text())
    assert manifest["files"] == sorted(files) and manifest["source"] == KEY


def test_unknown_hub_model_fails_at_once_with_offline_instructions():
    start = time.perf_counter()
    with pytest.raises(EncoderLoadError) as err:
        load_encoder("sentence-transformers/no-such-model-xyz")
    assert time.perf_counter() - start < 5  # no hub retries
    message = str(err.value)
    assert "sentence-transformers/no-such-model-xyz" in message
    assert "--model DIR" in message and "--allow-download" in message


def test_bad_local_paths_fail_with_the_path(tmp_path):
    with pytest.raises(EncoderLoadError, match="does not exist"):
        check_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderLoadError, match="neither modules.json nor config.json"):
        check_model(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(EncoderLoadError, match="cannot load encoder model"):
        load_encoder(str(tmp_path / "broken"))
    assert resolve_model(str(tmp_path / "empty")) == str((tmp_path / "empty").resolve())
    assert resolve_model("org/name") == "org/name" and resolve_model(DEFAULT_MODEL) == DEFAULT_MODEL


def test_cli_reports_an_unloadable_model_without_traceback(synthetic_run, capsys):
    from tiger_ray.cli import main

    code = main(["embed", "--run", str(synthetic_run.root), "--model", "no-such-encoder-xyz"])
    assert code == 2
    err = capsys.readouterr().err
    assert "tiger embed: error: encoder model 'no-such-encoder-xyz'" in err and "Traceback" not in err
    assert not (synthetic_run.embeddings / MANIFEST).exists()


def test_default_encoder_gives_unit_vectors_and_identical_rows_for_identical_texts():
    encoder = load_encoder(DEFAULT_MODEL)
    texts = ["red lipstick, matte", "hiking tent for two", "red lipstick, matte"]
    vectors = encode(encoder, texts, batch_size=2)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(vectors[0], vectors[2], atol=1e-6) and not np.allclose(vectors[0], vectors[1])
    assert encode(encoder, [], batch_size=2).shape == (0, 384)


# ---------------------------------------------------------------- actor pool vs cluster resources

def _pool(cluster, can_autoscale, shards=100, **config):
    from tiger_ray.embedding.config import EmbedConfig
    from tiger_ray.embedding.ray_embed import plan_actor_pool

    return plan_actor_pool(EmbedConfig(**config), cluster, can_autoscale, shards)


def test_an_actor_pool_that_fits_runs_at_its_size_without_asking_the_autoscaler():
    for can_autoscale in (False, True):
        pool = _pool({"CPU": 2.0}, can_autoscale, workers=2, cpus_per_worker=0.5)
        assert (pool.min_size, pool.max_size, pool.resources, pool.request) == (2, 2, {"num_cpus": 0.5}, [])
        pool = _pool({"CPU": 8.0, "GPU": 4.0}, can_autoscale, workers=0, use_gpu=True)  # one per GPU
        assert (pool.min_size, pool.max_size, pool.resources, pool.request) == (4, 4, {"num_gpus": 1}, [])
    # never more actors than shards to write
    assert _pool({"CPU": 2.0}, False, shards=1, workers=2).max_size == 1


def test_too_many_actors_fail_on_a_local_ray_and_are_requested_on_a_cluster():
    with pytest.raises(ValueError, match="4 encoder actors x 1.0 CPUs do not fit in the Ray cluster's 2 "):
        _pool({"CPU": 2.0}, False, workers=4, cpus_per_worker=1.0)
    pool = _pool({"CPU": 2.0}, True, workers=4, cpus_per_worker=1.0)
    assert (pool.min_size, pool.max_size) == (2, 4)  # starts on what is there, grows as nodes join
    assert pool.request == [{"CPU": 1.0}] * 4  # the whole pool: the autoscaler counts what exists

    with pytest.raises(ValueError, match="cluster has 1 GPUs"):
        _pool({"CPU": 8.0, "GPU": 1.0}, False, workers=3, use_gpu=True)
    pool = _pool({"CPU": 8.0, "GPU": 1.0}, True, workers=3, use_gpu=True)
    assert (pool.min_size, pool.max_size, pool.request) == (1, 3, [{"GPU": 1}] * 3)


def test_gpu_actors_on_a_cluster_without_gpus_yet():
    with pytest.raises(ValueError, match="one per GPU encoder actors, but the Ray cluster has 0 GPUs"):
        _pool({"CPU": 8.0}, False, workers=0, use_gpu=True)
    # An autoscaling cluster whose GPU workers are all scaled down: one actor, waiting for its node.
    pool = _pool({"CPU": 8.0}, True, workers=0, use_gpu=True)
    assert (pool.min_size, pool.max_size, pool.request) == (1, 1, [{"GPU": 1}])
    pool = _pool({"CPU": 8.0}, True, workers=2, use_gpu=True)
    assert (pool.min_size, pool.max_size, pool.request) == (1, 2, [{"GPU": 1}] * 2)


# ------------------------------------------------------------------ vectors.npy (memory-mapped)


def _sharded_embeddings(run: RunDir, n: int = 50, dim: int = 4) -> np.ndarray:
    """n items in three shards written out of id order; returns the [n+1, dim] expected matrix."""
    run.embeddings.mkdir(parents=True)
    rng = np.random.default_rng(1)
    expected = np.zeros((n + 1, dim), np.float32)
    expected[1:] = rng.normal(size=(n, dim))
    ids = rng.permutation(np.arange(1, n + 1))
    files = [write_shard(run.embeddings, part, expected[part], KEY) for part in np.array_split(ids, 3)]
    write_manifest(run.embeddings, files, model="m", dim=dim, normalized=False, count=n, source=KEY)
    atomic.write_json(run.stats, {"items": n})
    return expected


@pytest.mark.ray
def test_vectors_file_rows_are_item_ids_and_open_read_only(tmp_path, ray_local):
    from tiger_ray.embedding.store import VECTORS_FILE, open_vectors, write_vectors_file

    run = RunDir(tmp_path)
    expected = _sharded_embeddings(run)
    path = write_vectors_file(run)
    assert path == run.embeddings / VECTORS_FILE
    assert np.lib.format.open_memmap(path, mode="r").shape == (51, 4)
    vectors = open_vectors(run)
    assert isinstance(vectors, np.memmap) and not vectors.flags.writeable
    np.testing.assert_array_equal(np.asarray(vectors), expected)
    assert not vectors[0].any()
    with pytest.raises(ValueError):
        vectors[1, 0] = 1.0
    half = write_vectors_file(run, dtype="float16")
    np.testing.assert_allclose(np.load(half, mmap_mode="r"), expected, atol=2e-3)


@pytest.mark.ray
def test_half_written_vectors_are_never_opened_as_complete(tmp_path, ray_local):
    from tiger_ray.embedding.store import VECTORS_FILE, VECTORS_META, open_vectors

    run = RunDir(tmp_path)
    expected = _sharded_embeddings(run)
    # A writer killed mid-way leaves its temp file (garbage rows) and no vectors.npy.
    tmp = run.embeddings / f".{VECTORS_FILE}.tmp-deadbeef"
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(51, 4))[:] = 7.0
    vectors = open_vectors(run)
    np.testing.assert_array_equal(np.asarray(vectors), expected)
    assert not tmp.exists() and not list(run.embeddings.glob(".*.tmp-*"))
    # Killed after the rename but before vectors.json: the matrix is rebuilt, not trusted.
    del vectors
    (run.embeddings / VECTORS_META).unlink()
    np.lib.format.open_memmap(run.embeddings / VECTORS_FILE, mode="r+")[:] = 7.0
    np.testing.assert_array_equal(np.asarray(open_vectors(run)), expected)
    # New embeddings (a changed manifest) make it stale too.
    atomic.write_json(run.embeddings / MANIFEST, {**json.loads((run.embeddings / MANIFEST).read_text()),
                                                  "model": "other"})
    before = (run.embeddings / VECTORS_FILE).stat().st_mtime_ns
    open_vectors(run)
    assert (run.embeddings / VECTORS_FILE).stat().st_mtime_ns != before


@pytest.mark.ray
def test_vectors_file_refuses_embeddings_that_miss_items(tmp_path, ray_local):
    from tiger_ray.embedding.store import VECTORS_FILE, write_vectors_file

    run = RunDir(tmp_path)
    _sharded_embeddings(run)
    atomic.write_json(run.stats, {"items": 60})
    with pytest.raises(ValueError, match="60 items"):
        write_vectors_file(run)
    assert not (run.embeddings / VECTORS_FILE).exists()
