"""RQ-VAE stage settings: the model, its training on Ray Train, and Semantic-ID assignment.

Torch-free on purpose, so the `tiger` command can build its flags quickly. ``rqvae.py`` re-exports
``RQVAEConfig`` and ``PRESETS`` next to the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RQVAEConfig:
    # --- model (the paper's architecture by default)
    hidden_dims: tuple[int, ...] = field(default=(512, 256, 128), metadata={"help": "encoder MLP widths; the decoder mirrors them"})
    latent_dim: int = field(default=32, metadata={"help": "latent and codeword dimension"})
    num_levels: int = field(default=3, metadata={"help": "residual quantisation levels (codes per item before the collision token)"})
    codebook_size: int = field(default=256, metadata={"help": "codewords per level"})
    beta: float = field(default=0.25, metadata={"help": "commitment loss weight"})
    # --- optimisation
    epochs: int = field(default=300, metadata={"help": "passes over the training sample"})
    steps: int = field(default=0, metadata={"help": "optimiser steps; when > 0 it sets epochs to the passes over the sample that many steps need"})
    train_sample: int = field(default=0, metadata={"help": "items to train on, a seeded subset of the catalog (large catalogs); 0 = every item"})
    batch_size: int = field(default=1024, metadata={"help": "global batch size, split across workers"})
    optimizer: Literal["adam", "adagrad"] = field(default="adam", metadata={"help": "the paper uses adagrad with lr 0.4"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    seed: int = field(default=0, metadata={"help": "seed for init, shuffling, k-means and re-seeding"})
    # --- codebook health
    kmeans_init_size: int = field(default=8192, metadata={"help": "rows of the first batches used for the k-means codebook init"})
    kmeans_iters: int = field(default=25, metadata={"help": "Lloyd iterations of the k-means init"})
    unique_rate_rows: int = field(default=65536, metadata={"help": "rows (over all workers) the per-epoch unique-ID rate is measured on"})
    reseed_dead_codes: bool = field(default=True, metadata={"help": "move codes no item uses onto current residuals"})
    dead_code_patience: int = field(default=1, metadata={"help": "epochs a code must stay unused before it is re-seeded"})
    # --- Ray Train
    workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP ranks)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker (NCCL), GPU inference"})
    cpus_per_worker: float = field(default=0.5, metadata={"help": "CPUs reserved per Ray Train worker"})
    checkpoint_every: int = field(default=25, metadata={"help": "epochs between checkpoints (the last epoch always saves)"})
    max_failures: int = field(default=2, metadata={"help": "worker failures survived by restarting from the last checkpoint"})
    fresh: bool = field(default=False, metadata={"help": "discard an earlier training run instead of resuming it"})
    cache_shard: bool = field(default=True, metadata={"help": "keep each worker's data shard in memory after the first epoch (off: stream every epoch)"})
    # --- Semantic ID assignment
    max_collision_token: int = field(default=256, metadata={"help": "cap on the 4th token's range: more items sharing one 3-code prefix is an error"})
    assign_batch_size: int = field(default=4096, metadata={"help": "rows per batch of the Ray Data assignment pass"})
    assign_concurrency: int = field(default=1, metadata={"help": "model replicas (actors) in the assignment pass"})

    def __post_init__(self):
        if self.num_levels < 1 or self.codebook_size < 2 or self.latent_dim < 1:
            raise ValueError("RQVAEConfig: num_levels >= 1, codebook_size >= 2 and latent_dim >= 1 are required")
        if self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("RQVAEConfig: epochs, batch_size and checkpoint_every must be >= 1")
        if self.steps < 0 or self.train_sample < 0 or self.unique_rate_rows < 1:
            raise ValueError("RQVAEConfig: steps and train_sample must be >= 0, unique_rate_rows >= 1")
        if self.max_collision_token < 1:
            raise ValueError("RQVAEConfig: max_collision_token must be >= 1")
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)


# Fields that change the model's shape: a checkpoint can only resume with the same values.
ARCHITECTURE_FIELDS = ("hidden_dims", "latent_dim", "num_levels", "codebook_size")

PRESETS: dict[str, dict] = {
    # Tests: a few hundred synthetic items, seconds per fit.
    "tiny": dict(hidden_dims=(32, 16), latent_dim=8, codebook_size=8, epochs=6, batch_size=32,
                 lr=3e-3, kmeans_init_size=64, kmeans_iters=10, checkpoint_every=2,
                 assign_batch_size=64, max_collision_token=64),
    # This 2-core machine: the paper's model, Beauty (12k items) in a few minutes. Batches of 256
    # reach full codebook usage in ~10 epochs on Beauty, where 1024 needs several times more.
    "cpu": dict(epochs=50, batch_size=256, optimizer="adam", lr=1e-3, checkpoint_every=10),
    # The paper: Adagrad, lr 0.4, batch 1024, 20k epochs.
    "paper": dict(epochs=20000, batch_size=1024, optimizer="adagrad", lr=0.4, checkpoint_every=500,
                  cache_shard=False, assign_concurrency=4),
}
