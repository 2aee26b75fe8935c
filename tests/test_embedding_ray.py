"""`tiger embed` on Ray Data with 2 CPU actors: output, identical texts, re-runs, failures."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tiger_ray import atomic
from tiger_ray.data.schema import ITEMS_SCHEMA
from tiger_ray.embedding.encoder import DEFAULT_MODEL, encode, load_encoder
from tiger_ray.embedding.ray_embed import PRESETS, EmbedConfig, run_embed, source_key
from tiger_ray.embedding.store import (MANIFEST, load_embeddings, read_embeddings_dataset,
                                       scan_shards)
from tiger_ray.runs import MissingArtifactError, RunDir
from tiger_ray.testing.synthetic import make_synthetic_run

pytestmark = pytest.mark.ray

N_ITEMS = 50
# item -> the earlier item whose text it repeats; with 16-item shards the copies land far apart
DUPLICATES = {40: 3, 41: 3, 25: 12}
POISON = 30  # gets a text too long for the test-only encoder below


def _tiny_config(**overrides) -> EmbedConfig:
    return EmbedConfig(**{**PRESETS["tiny"], **overrides})


def _set_texts(run: RunDir, texts: dict[int, str]) -> None:
    rows = pq.read_table(run.items).to_pylist()
    for row in rows:
        row["text"] = texts.get(row["item_id"], row["text"])
    atomic.write_parquet(run.items, pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA))


def _item_texts(run: RunDir) -> dict[int, str]:
    table = pq.read_table(run.items, columns=["item_id", "text"])
    return dict(zip(table.column("item_id").to_pylist(), table.column("text").to_pylist()))


def _catalog_with_duplicates(root) -> RunDir:
    run = make_synthetic_run(root, n_items=N_ITEMS)
    texts = _item_texts(run)
    _set_texts(run, {item: texts[source] for item, source in DUPLICATES.items()})
    return run


def _mtimes(directory) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    """A test-only sentence-transformers model (16-d, random weights) saved as a local directory.

    It claims max_seq_length 128 but has only 24 position embeddings, so any text longer than 24
    tokens makes it raise inside the encoder actor: a real failure, injected through data.
    """
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tiger_ray.embedding.encoder import _packaged_model_dir

    root = tmp_path_factory.mktemp("tiny_encoder")
    tokenizer = AutoTokenizer.from_pretrained(str(_packaged_model_dir()))
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32, max_position_embeddings=24))
    bert.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    word = models.Transformer(str(root / "hf"), max_seq_length=128)
    SentenceTransformer(modules=[word, models.Pooling(16)], device="cpu").save(str(root / "st"))
    config_path = root / "st" / "sentence_bert_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "max_seq_length": 128}))
    return root / "st"


@pytest.fixture(scope="module")
def embedded_run(ray_local, tmp_path_factory):
    """The synthetic catalog (with duplicate texts) embedded once with the default encoder."""
    run = _catalog_with_duplicates(tmp_path_factory.mktemp("embedded") / "run")
    summary = run_embed(run, _tiny_config())
    return run, summary


def _copy_run(run: RunDir, root) -> RunDir:
    shutil.copytree(run.root, root, dirs_exist_ok=False)
    return RunDir(root)


def test_output_schema_count_manifest_and_vectors(embedded_run):
    run, summary = embedded_run
    assert summary["items"] == N_ITEMS and summary["encoded"] == N_ITEMS - len(DUPLICATES)
    assert summary["copied_duplicates"] == len(DUPLICATES) and summary["dim"] == 384
    manifest = json.loads((run.embeddings / MANIFEST).read_text())
    assert {k: manifest[k] for k in ("model", "dim", "normalized", "count")} == \
        {"model": DEFAULT_MODEL, "dim": 384, "normalized": True, "count": N_ITEMS}
    assert manifest["files"] == sorted(p.name for p in run.embeddings.glob("part-*.parquet"))
    assert len(manifest["files"]) >= 3  # 47 distinct texts in 16-item shards, over 2 actors
    schema = pq.read_schema(run.embeddings / manifest["files"][0])
    assert schema.field("item_id").type == pa.int64()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 384)

    ids, vectors = load_embeddings(run)
    assert ids.tolist() == list(range(1, N_ITEMS + 1))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    # every row is the vector of its own item's text (same model, one process, no Ray)
    texts = _item_texts(run)
    expected = encode(load_encoder(DEFAULT_MODEL), [texts[i] for i in ids.tolist()], batch_size=64)
    assert np.allclose(vectors, expected, atol=1e-5)
    for item, source in DUPLICATES.items():  # identical texts: bit-identical vectors
        assert np.array_equal(vectors[item - 1], vectors[source - 1])
    assert len(np.unique(vectors, axis=0)) == N_ITEMS - len(DUPLICATES)


def test_streaming_reader_matches_numpy_loader(embedded_run):
    run, _ = embedded_run
    ids, vectors = load_embeddings(run)
    parts = list(read_embeddings_dataset(run).iter_batches(batch_size=7, batch_format="numpy"))
    got_ids = np.concatenate([b["item_id"] for b in parts])
    got = np.concatenate([b["embedding"] for b in parts])
    assert got.dtype == np.float32 and got.shape == (N_ITEMS, 384)
    order = np.argsort(got_ids)
    assert np.array_equal(got_ids[order], ids) and np.array_equal(got[order], vectors)


def test_rerun_skips_complete_work_and_resumes_after_a_crash(embedded_run, tmp_path):
    run = _copy_run(embedded_run[0], tmp_path / "run")
    before = _mtimes(run.embeddings)
    ids_before, vectors_before = load_embeddings(run)

    again = run_embed(run, _tiny_config())
    assert again["encoded"] == 0 and again["reused"] == N_ITEMS
    assert _mtimes(run.embeddings) == before  # not a single file rewritten

    # A crash: the manifest and one shard gone, a killed writer's temp file and a torn shard left.
    manifest = json.loads((run.embeddings / MANIFEST).read_text())
    lost = manifest["files"][1]
    lost_rows = pq.read_metadata(run.embeddings / lost).num_rows
    (run.embeddings / lost).unlink()
    (run.embeddings / MANIFEST).unlink()
    (run.embeddings / f".{lost}.tmp-0badf00d").write_bytes(b"PAR1 partial")
    (run.embeddings / "part-0000000090-0000000099.parquet").write_bytes(b"PAR1 torn")

    resumed = run_embed(run, _tiny_config())
    assert resumed["reused"] == N_ITEMS - lost_rows
    assert resumed["encoded"] + resumed["copied_duplicates"] == lost_rows  # only the lost shard
    after = _mtimes(run.embeddings)
    kept = [f for f in manifest["files"] if f != lost]
    assert all(after[f] == before[f] for f in kept)
    assert sorted(after) == sorted(before)  # junk removed, nothing else added
    ids, vectors = load_embeddings(run)
    assert np.array_equal(ids, ids_before) and np.allclose(vectors, vectors_before, atol=1e-6)


def test_another_model_replaces_the_output(embedded_run, tiny_encoder_dir, tmp_path):
    run = _copy_run(embedded_run[0], tmp_path / "run")
    summary = run_embed(run, _tiny_config(model=str(tiny_encoder_dir), normalize=False))
    assert summary["encoded"] == N_ITEMS - len(DUPLICATES) and summary["reused"] == 0
    manifest = json.loads((run.embeddings / MANIFEST).read_text())
    assert manifest["model"] == str(tiny_encoder_dir) and manifest["dim"] == 16
    assert manifest["normalized"] is False
    on_disk = sorted(run.embeddings.glob("part-*.parquet"))
    assert {p.name for p in on_disk} == set(manifest["files"])
    assert all(pq.read_schema(p).field("embedding").type.list_size == 16 for p in on_disk)
    ids, vectors = load_embeddings(run)
    assert vectors.shape == (N_ITEMS, 16) and ids.tolist() == list(range(1, N_ITEMS + 1))


def test_failed_batch_leaves_no_partial_output(ray_local, tiny_encoder_dir, tmp_path):
    run = make_synthetic_run(tmp_path / "run", n_items=N_ITEMS)
    _set_texts(run, {POISON: "a very long product description " * 12})
    config = _tiny_config(model=str(tiny_encoder_dir))
    with pytest.raises(RuntimeError, match="encoder actors failed") as err:
        run_embed(run, config)
    # the message names the failing items and the underlying error, and says how to go on
    assert "item_id 17..32" in str(err.value) and "size of tensor" in str(err.value)
    assert "re-run `tiger embed" in str(err.value)

    files = sorted(p.name for p in run.embeddings.iterdir())
    assert MANIFEST not in files
    with pytest.raises(MissingArtifactError):
        load_embeddings(run)
    # Whatever shards finished are complete and trusted by a re-run; none holds the poison item.
    scan = scan_shards(run.embeddings, source_key(run.items, config))
    # (a writer killed mid-shard would leave only a temp file, which is never trusted)
    assert all(".tmp-" in p.name for p in scan.untrusted)
    assert {s.name for s in scan.trusted} == {f for f in files if f.startswith("part-")}
    done = np.concatenate([s.item_ids for s in scan.trusted]) if scan.trusted else np.zeros(0)
    assert POISON not in done and len(done) < N_ITEMS
    for shard in scan.trusted:
        table = pq.read_table(run.embeddings / shard.name)
        assert table.num_rows == len(shard.item_ids) and table.column("embedding").null_count == 0


def test_use_gpu_without_gpus_fails_before_starting_actors(ray_local, synthetic_run):
    with pytest.raises(ValueError, match="0 GPUs"):
        run_embed(synthetic_run, _tiny_config(use_gpu=True, workers=0))
    assert not (synthetic_run.embeddings / MANIFEST).exists()
