"""RQ-VAE core without Ray: training, k-means init, dead-code re-seeding, collision tokens, resume."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from tiger_ray.semantic_ids.collisions import CollisionCapError, collision_stats, collision_tokens
from tiger_ray.semantic_ids.kmeans import kmeans
from tiger_ray.semantic_ids.rqvae import PRESETS, RQVAE, RQVAEConfig, load_model, save_model
from tiger_ray.semantic_ids.trainer import RQVAETrainer, fit_local

TINY = RQVAEConfig(**PRESETS["tiny"])


def clustered(n: int = 240, dim: int = 24, clusters: int = 12, noise: float = 0.25, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres, like topic-clustered text embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def usage(model: RQVAE, x: np.ndarray) -> list[float]:
    codes, _ = model.encode(torch.from_numpy(x))
    return [len(torch.unique(codes[:, level])) / model.config.codebook_size for level in range(codes.shape[1])]


def test_loss_decreases_and_codebooks_stay_in_use():
    x = clustered()
    history = []
    fit_local(x, replace(TINY, epochs=12), on_epoch=lambda m, _: history.append(m))
    assert [m["epoch"] for m in history] == list(range(1, 13))
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert history[-1]["recon_error"] < 0.6 * history[0]["recon_error"]
    assert all(history[-1][f"usage_l{l}"] >= 0.75 for l in range(3))
    assert 0 < history[-1]["unique_rate"] <= 1


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 4)) * 10
    labels = rng.integers(5, size=300)
    x = torch.from_numpy(centres[labels] + rng.normal(size=(300, 4)) * 0.1).float()
    result = kmeans(x, 5, iters=20, seed=0)
    # every true cluster maps to exactly one centroid and vice versa
    pairs = {(int(a), int(b)) for a, b in zip(labels, result.assignments)}
    assert len(pairs) == 5
    assert result.inertia < 0.1
    # fewer points than clusters still gives k distinct centroids on the data
    small = kmeans(x[:3], 8, seed=0)
    assert small.centroids.shape == (8, 4) and len(torch.unique(small.centroids, dim=0)) == 8


def test_kmeans_init_uses_codes_far_above_random_init():
    x = clustered(n=400)
    config = replace(TINY, codebook_size=16)
    torch.manual_seed(0)
    model = RQVAE(config, x.shape[1])
    before = usage(model, x)  # random codebooks: most items land on a few codes
    model.init_codebooks(torch.from_numpy(x[:128]), iters=10, seed=0)
    after = usage(model, x)
    assert int(model.initialized) == 1
    assert all(a >= 0.75 for a in after), after
    assert sum(after) > sum(before) + 0.5, (before, after)


def test_dead_code_reseeding_revives_a_collapsed_codebook():
    x = torch.from_numpy(clustered(n=256))
    config = replace(TINY, codebook_size=16, batch_size=64)
    torch.manual_seed(0)
    model = RQVAE(config, x.shape[1])
    trainer = RQVAETrainer(model, config)
    trainer.train_epoch(x.split(64))  # k-means init, a few steps, and the re-seeding pool
    with torch.no_grad():  # collapse: every code but code 0 of each level moves far away
        model.codebooks[:, 1:] = 100.0
    collapsed, counts = trainer.evaluate(x.split(64))
    assert all(collapsed[f"usage_l{l}"] == pytest.approx(1 / 16) for l in range(3))
    moved = trainer.maintain_codebooks(counts)
    assert moved == [15, 15, 15]
    # the optimiser forgets the moved codes' statistics
    adam = trainer.optimizer.state[model.codebooks]
    assert float(adam["exp_avg"][:, 1:].abs().sum()) == 0 and float(adam["exp_avg_sq"][:, 1:].abs().sum()) == 0
    revived, _ = trainer.evaluate(x.split(64))
    assert all(revived[f"usage_l{l}"] >= 0.75 for l in range(3)), revived


def test_collision_tokens_make_ids_unique_in_row_order():
    prefixes = np.array([[1, 2, 3], [0, 0, 0], [1, 2, 3], [4, 4, 4], [1, 2, 3], [0, 0, 0]])
    tokens = collision_tokens(prefixes)
    assert tokens.tolist() == [0, 0, 1, 0, 2, 1]
    ids = np.column_stack([prefixes, tokens])
    assert len(np.unique(ids, axis=0)) == len(ids)
    stats = collision_stats(prefixes)
    assert stats["largest_collision_group"] == 3
    assert stats["unique_prefixes"] == 3
    assert stats["fraction_c3_positive"] == pytest.approx(3 / 6)
    assert stats["group_size_counts"] == {1: 1, 2: 1, 3: 1}
    # deterministic and large: random prefixes with many collisions
    rng = np.random.default_rng(0)
    many = rng.integers(0, 4, size=(5000, 3))
    t1, t2 = collision_tokens(many), collision_tokens(many.copy())
    assert np.array_equal(t1, t2)
    assert len(np.unique(np.column_stack([many, t1]), axis=0)) == 5000


def test_collision_cap_error_names_the_prefix_and_items():
    prefixes = np.array([[1, 2, 3]] * 4 + [[0, 0, 0]])
    assert collision_tokens(prefixes, max_token=4).max() == 3
    with pytest.raises(CollisionCapError, match=r"4 items share the Semantic-ID prefix \[1, 2, 3\].*item_id \[11, 12, 13, 14\].*capped at 3"):
        collision_tokens(prefixes, max_token=3, item_ids=np.arange(11, 16))


def test_resume_from_checkpoint_continues_from_saved_epoch_and_matches_uninterrupted_run():
    x = clustered()
    config = replace(TINY, epochs=5)
    saved = {}

    def keep_epoch_2(metrics, trainer):
        if metrics["epoch"] == 2:
            saved.update(copy.deepcopy(trainer.state_dict()))

    whole = fit_local(x, config, on_epoch=keep_epoch_2)
    assert saved["epoch"] == 2
    epochs = []
    resumed = fit_local(x, config, state=saved, on_epoch=lambda m, _: epochs.append(m["epoch"]))
    assert epochs == [3, 4, 5]
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="codebook_size"):
        fit_local(x, replace(config, codebook_size=4), state=saved)


def test_saved_model_loads_weights_only_and_encodes_the_same(tmp_path):
    x = torch.from_numpy(clustered(n=64))
    trainer = fit_local(x.numpy(), replace(TINY, epochs=1))
    save_model(trainer.model, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    a, err_a = trainer.model.encode(x)
    b, err_b = loaded.encode(x)
    assert torch.equal(a, b) and torch.allclose(err_a, err_b)
    assert loaded.config == trainer.model.config


def test_core_trains_without_ray():
    code = (
        "import sys, numpy as np\n"
        "from tiger_ray.semantic_ids.rqvae import PRESETS, RQVAEConfig\n"
        "from tiger_ray.semantic_ids.trainer import fit_local\n"
        "from tiger_ray.semantic_ids.collisions import collision_tokens\n"
        "from tiger_ray.semantic_ids.report import build_report\n"
        "x = np.random.default_rng(0).normal(size=(64, 8)).astype('float32')\n"
        "t = fit_local(x, RQVAEConfig(**{**PRESETS['tiny'], 'epochs': 2}))\n"
        "assert t.epoch == 2\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_training_sample_is_seeded_and_steps_set_the_epochs():
    from tiger_ray.semantic_ids.ray_train import sample_rows, training_plan

    ids = np.arange(1, 100_001)
    batch = {"item_id": ids, "embedding": np.stack([ids, -ids], axis=1).astype(np.float32)}
    kept = sample_rows(batch, 0.1, seed=0)
    assert 9_500 < len(kept["item_id"]) < 10_500
    np.testing.assert_array_equal(kept["embedding"][:, 0], kept["item_id"])  # rows stay whole
    # the same subset whatever the block order, another one for another seed
    parts = [sample_rows({k: v[s] for k, v in batch.items()}, 0.1, seed=0)["item_id"]
             for s in (slice(60_000, None), slice(0, 60_000))]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), kept["item_id"])
    assert len(np.intersect1d(sample_rows(batch, 0.1, seed=1)["item_id"], kept["item_id"])) < 2_000
    config, sample = training_plan(replace(TINY, steps=100, train_sample=1000, batch_size=32), 5000)
    assert sample == 1000 and config.epochs == 4  # 32 steps per pass over the sample
    config, sample = training_plan(TINY, 300)
    assert sample == 300 and config == TINY  # small catalogs: as before


def test_unique_rate_is_measured_on_a_bounded_sample():
    x = torch.from_numpy(clustered(n=256))
    config = replace(TINY, unique_rate_rows=10)
    torch.manual_seed(0)
    trainer = RQVAETrainer(RQVAE(config, x.shape[1]), config)
    metrics, counts = trainer.evaluate(x.split(64))
    assert int(counts[0].sum()) == 256  # code counts still cover every row
    assert metrics["unique_rate"] * 10 == pytest.approx(round(metrics["unique_rate"] * 10))
