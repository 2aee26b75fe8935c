"""Semantic IDs for the whole catalog: Ray Data batch inference with the trained RQ-VAE.

Embeddings stream through a pool of model replicas (``map_batches`` with a callable class, one
model load per actor); only the small outputs (item_id, 3 codes, reconstruction error) come back
to the driver. The 4th token then separates items sharing a prefix (``collisions.py``), in
item_id order, and the table is written with its one-to-one check (``table.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiger_ray.runs import RunDir
from tiger_ray.semantic_ids.collisions import collision_stats, collision_tokens
from tiger_ray.semantic_ids.config import RQVAEConfig
from tiger_ray.semantic_ids.table import check_one_to_one, read_semantic_ids, write_semantic_ids

log = logging.getLogger(__name__)


class CodeAssigner:
    """A Ray Data actor holding one RQ-VAE replica."""

    def __init__(self, model_path: str, device: str = "cpu"):
        from tiger_ray.semantic_ids.rqvae import load_model

        self.device = device
        self.model = load_model(model_path, device)

    def __call__(self, batch: dict) -> dict:
        import torch

        x = np.array(batch["embedding"], dtype=np.float32)  # a writable copy for torch
        codes, err = self.model.encode(torch.from_numpy(x).to(self.device))
        codes, err = codes.cpu().numpy(), err.cpu().numpy()
        out = {"item_id": np.asarray(batch["item_id"], dtype=np.int64),
               "recon_error": err.astype(np.float64),
               "input_sq_norm": (x.astype(np.float64) ** 2).sum(1)}
        for level in range(codes.shape[1]):
            out[f"c{level}"] = codes[:, level].astype(np.int64)
        return out


@dataclass
class Assignment:
    item_ids: np.ndarray  # [N] ascending
    codes: np.ndarray  # [N, levels + 1]: RQ-VAE codes, then the collision token
    recon_error: np.ndarray  # [N] ||x - x_hat||^2
    input_sq_norm: np.ndarray  # [N] ||x||^2, for relative error
    codebook_size: int
    max_collision_token: int

    @property
    def prefixes(self) -> np.ndarray:
        return self.codes[:, :-1]


def predict_codes(run: RunDir, model_path: Path, config: RQVAEConfig) -> dict[str, np.ndarray]:
    """Stream the catalog through the model; columns in the order Ray Data returned them."""
    from ray.data import ActorPoolStrategy

    from tiger_ray.embedding.store import read_embeddings_dataset

    resources = {"num_gpus": 1} if config.use_gpu else {"num_cpus": 1}
    ds = read_embeddings_dataset(run).map_batches(
        CodeAssigner, fn_constructor_kwargs={"model_path": str(model_path),
                                             "device": "cuda" if config.use_gpu else "cpu"},
        batch_size=config.assign_batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=config.assign_concurrency), **resources)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key, value in batch.items():
            parts.setdefault(key, []).append(np.asarray(value))
    if not parts:
        raise ValueError(f"{run.embeddings}: no embeddings to assign")
    return {key: np.concatenate(values) for key, values in parts.items()}


def compute_semantic_ids(run: RunDir, config: RQVAEConfig, model_path: Path | None = None) -> Assignment:
    """Codes for every item and their collision tokens, checked one-to-one (nothing written)."""
    from tiger_ray.embedding.store import MANIFEST, Manifest

    model_path = model_path or run.require(run.semantic_ids / "model.pt", "tiger train-rqvae")
    columns = predict_codes(run, model_path, config)
    # Ray Data may return blocks in any order; item_id order makes the collision tokens deterministic.
    order = np.argsort(columns["item_id"], kind="stable")
    columns = {key: value[order] for key, value in columns.items()}
    manifest = Manifest.read(run.embeddings)
    item_ids = columns["item_id"]
    if len(item_ids) != manifest.count:
        raise ValueError(f"{run.embeddings / MANIFEST}: {manifest.count} items expected, "
                         f"the assignment pass produced {len(item_ids)}")
    prefixes = np.stack([columns[f"c{level}"] for level in range(config.num_levels)], axis=1)
    stats = collision_stats(prefixes)
    log.info("%d items, %d distinct prefixes (%.2f%%), largest collision group %d",
             stats["items"], stats["unique_prefixes"], 100 * stats["unique_prefix_rate"],
             stats["largest_collision_group"])
    c3 = collision_tokens(prefixes, config.max_collision_token, item_ids)
    codes = np.column_stack([prefixes, c3])
    check_one_to_one(item_ids, codes, f"Semantic IDs of {run.embeddings}")
    return Assignment(item_ids=item_ids, codes=codes, recon_error=columns["recon_error"],
                      input_sq_norm=columns["input_sq_norm"], codebook_size=config.codebook_size,
                      max_collision_token=config.max_collision_token)


def assign_semantic_ids(run: RunDir, config: RQVAEConfig, model_path: Path | None = None) -> Assignment:
    """``compute_semantic_ids``, then semantic_ids.parquet written and read back (both checked)."""
    assignment = compute_semantic_ids(run, config, model_path)
    write_semantic_ids(run, assignment.item_ids, assignment.codes)
    read_semantic_ids(run, codebook_size=config.codebook_size)
    return assignment
