"""Semantic-ID assignment on Ray Data: the same codes as the in-memory reference, written as the
memory-mapped table and index, with statistics streamed instead of gathered."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from tiger_ray.semantic_ids import assign
from tiger_ray.semantic_ids.collisions import CollisionCapError, collision_stats, collision_tokens
from tiger_ray.semantic_ids.report import write_report
from tiger_ray.semantic_ids.rqvae import PRESETS, RQVAEConfig, load_model, save_model
from tiger_ray.semantic_ids.table import SemanticIds, read_semantic_ids
from tiger_ray.semantic_ids.trainer import fit_local
from tiger_ray.seq2seq.trie import SemanticIdTrie
from tiger_ray.testing.synthetic import make_synthetic_embeddings, make_synthetic_run

pytestmark = pytest.mark.ray
TINY = RQVAEConfig(**PRESETS["tiny"])


def test_fixed_codes_give_reference_tokens_report_and_cap_error(ray_local, tmp_path, monkeypatch):
    """The pipeline after the model, on fixed codes in shuffled row order, in several buckets."""
    import ray

    run = make_synthetic_run(tmp_path / "run", n_items=6)
    make_synthetic_embeddings(run, dim=8)
    prefixes = np.array([[1, 2, 3], [0, 0, 0], [1, 2, 3], [4, 4, 4], [1, 2, 3], [0, 0, 0]])
    shuffled = np.array([5, 0, 3, 1, 4, 2])

    def fake_predict(run_, model_path, config, span):
        packed = (prefixes[:, 0] * 8 + prefixes[:, 1]) * 8 + prefixes[:, 2]
        return ray.data.from_items([
            {"item_id": int(i + 1), "prefix": int(packed[i]), "bucket": int(packed[i] // span),
             "recon_error": 0.5, "relative_error": 0.5} for i in shuffled])

    monkeypatch.setattr(assign, "predict_dataset", fake_predict)
    config = replace(TINY, max_collision_token=3)
    stats = assign.assign_semantic_ids(run, config, model_path=tmp_path / "unused.pt", bucket_rows=2)
    table = read_semantic_ids(run)
    assert table.codes[:, 3].tolist() == [0, 0, 1, 0, 2, 1]  # c3 in item_id order
    np.testing.assert_array_equal(table.codes[:, :3], prefixes)
    assert table.codebook_sizes == (8, 8, 8, 3)
    np.testing.assert_array_equal(SemanticIdTrie.from_semantic_ids(table).lookup(table.codes), np.arange(1, 7))
    expected = collision_stats(prefixes)
    assert stats.collision_stats() == expected
    report = write_report(run, stats, [], config)
    assert report["collisions"]["largest_collision_group"] == 3
    assert report["usage"] == [3 / 8, 3 / 8, 3 / 8]  # codes {0, 1, 4}, {0, 2, 4}, {0, 3, 4}
    assert report["unique_ids"] == 1.0
    assert report["reconstruction_error"]["relative_mean"] == pytest.approx(0.5)
    assert report["reconstruction_error"]["median"] == pytest.approx(0.5, abs=1e-3)
    assert json.loads((run.semantic_ids / "report.json").read_text())["items"] == 6
    assert (run.semantic_ids / "report.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(CollisionCapError, match=r"3 items share the Semantic-ID prefix \[1, 2, 3\].*"
                                                r"item_id \[1, 3, 5\].*capped at 2"):
        assign.assign_semantic_ids(run, replace(config, max_collision_token=2), model_path=tmp_path / "unused.pt")
    # the failed run removed the old table's metadata and left no temporary files behind
    assert not (run.semantic_ids / "semantic_ids.json").exists()
    assert not [p for p in run.semantic_ids.iterdir() if p.name.startswith(".")]


def test_model_assignment_equals_the_in_memory_reference(ray_local, tmp_path):
    """A trained tiny model: codes from Ray Data (many buckets) = encode + collision_tokens in memory."""
    run = make_synthetic_run(tmp_path / "run", n_items=300)
    vectors = make_synthetic_embeddings(run, dim=16, n_topics=3, noise=0.05)
    config = replace(TINY, codebook_size=4, epochs=2, max_collision_token=300)  # small books: collisions
    trainer = fit_local(vectors, config)
    save_model(trainer.model, tmp_path / "model.pt")
    stats = assign.assign_semantic_ids(run, config, model_path=tmp_path / "model.pt", bucket_rows=16)

    model = load_model(tmp_path / "model.pt")
    codes, err = model.encode(torch.from_numpy(vectors))
    prefixes = codes.numpy()
    c3 = collision_tokens(prefixes, config.max_collision_token, np.arange(1, 301))
    assert c3.max() > 0  # the case worth checking
    expected = np.column_stack([prefixes, c3])
    table = read_semantic_ids(run)
    assert isinstance(table.codes.base, np.memmap) or isinstance(table.codes, np.memmap)
    np.testing.assert_array_equal(table.codes, expected)
    assert table.codebook_sizes == (4, 4, 4, int(c3.max()) + 1)
    # the index written bucket by bucket equals the one built in memory
    built = SemanticIds(np.arange(1, 301), expected, table.codebook_sizes).index()
    np.testing.assert_array_equal(SemanticIdTrie.from_semantic_ids(table).lookup(expected), np.arange(1, 301))
    np.testing.assert_array_equal(np.asarray(table.index().items), built.items)
    assert table.fingerprint() == SemanticIds(np.arange(1, 301), expected, table.codebook_sizes).fingerprint()
    assert stats.collision_stats() == collision_stats(prefixes)
    err = err.double().numpy()
    assert stats.error["mean"] == pytest.approx(err.mean())
    assert stats.error["max"] == pytest.approx(err.max())
    width = (err.max() - err.min()) / assign.ERROR_BINS  # the histogram's resolution
    for q, key in ((50, "median"), (95, "p95")):  # between the neighbouring order statistics
        assert np.percentile(err, q - 0.5) - width <= stats.error[key] <= np.percentile(err, q + 0.5) + width
    for level in range(3):
        np.testing.assert_array_equal(stats.code_counts[level], np.bincount(prefixes[:, level], minlength=4))
