"""The RQ-VAE training loop in plain PyTorch, shared by local fits and Ray Train workers.

One epoch = a training pass over the batches, an evaluation pass over the whole shard (codebook
usage and perplexity from per-batch code counts, reconstruction error, and the unique-ID rate on
the first ``unique_rate_rows`` rows, so no catalog-wide unique runs), then
codebook maintenance: codes no item used for ``dead_code_patience`` epochs are re-seeded.

Under DDP (``torch.distributed`` initialised, as Ray Train does) each rank holds one shard of the
catalog. Everything that changes codebooks outside of gradient steps (the k-means init and the
dead-code re-seeding) runs on an all-gathered batch and is then broadcast from rank 0, and the
evaluation statistics are all-reduced, so the codebooks and every logged number are the same on
all ranks. Without ``torch.distributed`` the same code runs as a single process.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from dataclasses import asdict
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from tiger_ray.semantic_ids.rqvae import (ARCHITECTURE_FIELDS, RQVAE, RQVAEConfig, build_optimizer,
                                          reset_optimizer_rows)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- collectives (no-ops alone)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def world_rank() -> int:
    return dist.get_rank() if _distributed() else 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(tensor)
    return tensor


def broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank 0's copy."""
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (rank order); ranks may hold different row counts."""
    if not _distributed():
        return tensor
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


# ---------------------------------------------------------------- the loop


def prefix_keys(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Pack [N, L] codes into one int64 per row (a base-K number) for cheap uniqueness counts."""
    keys = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
    for level in range(codes.shape[1]):
        keys = keys * codebook_size + codes[:, level]
    return keys


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a code histogram: the number of equally used codes it is worth."""
    p = counts.double() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class RQVAETrainer:
    """Owns the model, optimiser and codebook bookkeeping; feed it batches epoch by epoch.

    ``net`` is what the training pass calls (the DDP wrapper under Ray Train); ``model`` is the
    plain module underneath, used for evaluation and codebook surgery.
    """

    def __init__(self, model: RQVAE, config: RQVAEConfig, net: torch.nn.Module | None = None):
        self.model = model
        self.net = net if net is not None else model
        self.config = config
        self.optimizer = build_optimizer(model, config)
        self.epoch = 0  # epochs completed
        # epochs in a row each code went unused by every item (all ranks)
        self.unused_epochs = torch.zeros(config.num_levels, config.codebook_size, dtype=torch.long)
        # the latest training inputs of this rank: material for re-seeding dead codes
        self._pool: deque[torch.Tensor] = deque()
        self._pool_rows = 0

    @property
    def device(self) -> torch.device:
        return self.model.codebooks.device

    @property
    def local_batch_size(self) -> int:
        """Rows per step on this rank, so the global batch matches ``config.batch_size``."""
        return max(1, self.config.batch_size // world_size())

    # -- checkpoints

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "unused_epochs": self.unused_epochs.clone(),
                "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        check_resumable(state, self.config, self.model.input_dim)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.unused_epochs = state["unused_epochs"].clone()
        self.epoch = int(state["epoch"])

    # -- passes

    def train_epoch(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        self.net.train()
        # Re-seeding material comes from this epoch only, so a resumed run re-seeds exactly as
        # the uninterrupted one would.
        self._pool.clear()
        self._pool_rows = 0
        batches = iter(batches)
        if not int(self.model.initialized):
            batches = self._kmeans_init(batches)
        sums = torch.zeros(4, dtype=torch.float64)  # loss, recon, quant, rows
        for x in batches:
            x = x.to(self.device, torch.float32, non_blocking=True)
            out = self.net(x)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            self.optimizer.step()
            n = x.shape[0]
            sums += torch.tensor([out.loss.item() * n, out.recon_loss.item() * n, out.quant_loss.item() * n, n],
                                 dtype=torch.float64)
            self._remember(x)
        sums = all_reduce_sum_(sums.to(self.device)).cpu()
        rows = max(float(sums[3]), 1.0)
        return {"loss": float(sums[0]) / rows, "recon_loss": float(sums[1]) / rows,
                "quant_loss": float(sums[2]) / rows}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor]) -> tuple[dict[str, float], torch.Tensor]:
        """Metrics of the current model over all ranks' shards, and code counts [L, K]."""
        self.model.eval()
        levels, size = self.config.num_levels, self.config.codebook_size
        counts = torch.zeros(levels, size, dtype=torch.long, device=self.device)
        err_sum = torch.zeros(2, dtype=torch.float64, device=self.device)  # squared error, rows
        keys, kept = [], 0
        key_budget = max(1, self.config.unique_rate_rows // world_size())
        for x in batches:
            x = x.to(self.device, torch.float32, non_blocking=True)
            codes, err = self.model.encode(x)
            for level in range(levels):
                counts[level] += torch.bincount(codes[:, level], minlength=size)
            err_sum += torch.stack([err.double().sum(), err.new_tensor(len(err), dtype=torch.float64)])
            if kept < key_budget:  # the unique-ID rate on a bounded sample: no catalog-wide unique
                keys.append(prefix_keys(codes[:key_budget - kept], size))
                kept += len(keys[-1])
        all_reduce_sum_(counts)
        all_reduce_sum_(err_sum)
        local_keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long, device=self.device)
        all_keys = all_gather_rows(local_keys)
        items = max(len(all_keys), 1)
        metrics = {"recon_error": float(err_sum[0] / err_sum[1].clamp_min(1)),
                   "unique_rate": len(torch.unique(all_keys)) / items}
        counts = counts.cpu()
        for level in range(levels):
            metrics[f"usage_l{level}"] = float((counts[level] > 0).double().mean())
            metrics[f"perplexity_l{level}"] = perplexity(counts[level])
        return metrics, counts

    def run_epoch(self, train_batches: Iterable[torch.Tensor],
                  eval_batches: Iterable[torch.Tensor]) -> dict[str, float]:
        start = time.perf_counter()
        metrics = self.train_epoch(train_batches)
        eval_metrics, counts = self.evaluate(eval_batches)
        metrics.update(eval_metrics)
        last_epoch = self.epoch + 1 >= self.config.epochs
        # No re-seeding after the last epoch: the saved model is the one just evaluated.
        moved = self.maintain_codebooks(counts) if self.config.reseed_dead_codes and not last_epoch else None
        for level in range(self.config.num_levels):
            metrics[f"reseeded_l{level}"] = moved[level] if moved else 0
        self.epoch += 1
        metrics["epoch"] = self.epoch
        metrics["seconds"] = time.perf_counter() - start
        return metrics

    # -- codebook surgery (identical on every rank)

    def _kmeans_init(self, batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Initialise every level by k-means on the first batches (all ranks), then train on them too."""
        wanted = math.ceil(self.config.kmeans_init_size / self.local_batch_size / world_size())
        head = list(itertools.islice(batches, max(1, wanted)))
        if not head:
            raise ValueError("no training data: the embedding shard of this worker is empty")
        x = all_gather_rows(torch.cat(head).to(self.device, torch.float32))
        with torch.no_grad():
            inertia = self.model.init_codebooks(x, iters=self.config.kmeans_iters, seed=self.config.seed)
            broadcast_(self.model.codebooks.data)
        if world_rank() == 0:
            log.info("k-means init of %d levels on %d rows: inertia %s", len(inertia), len(x),
                     " ".join(f"{v:.4g}" for v in inertia))
        return itertools.chain(head, batches)

    def _remember(self, x: torch.Tensor) -> None:
        """Keep the most recent training rows (about ``kmeans_init_size`` over all ranks)."""
        self._pool.append(x.detach())
        self._pool_rows += x.shape[0]
        limit = max(self.config.kmeans_init_size // world_size(), 1)
        while self._pool_rows - self._pool[0].shape[0] >= limit:
            self._pool_rows -= self._pool.popleft().shape[0]

    def maintain_codebooks(self, counts: torch.Tensor) -> list[int]:
        """Re-seed codes unused for ``dead_code_patience`` epochs; returns how many per level."""
        used = counts > 0
        self.unused_epochs[used] = 0
        self.unused_epochs[~used] += 1
        dead = self.unused_epochs >= self.config.dead_code_patience
        if not dead.any() or not self._pool:
            return [0] * self.config.num_levels
        x = all_gather_rows(torch.cat(list(self._pool)))
        # Seeded by epoch, so a resumed run re-seeds exactly as the uninterrupted one would.
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.epoch)
        moved = self.model.reseed_dead_codes(x, dead.to(self.device), generator)
        broadcast_(self.model.codebooks.data)
        reset_optimizer_rows(self.optimizer, self.model.codebooks, dead.to(self.device))
        self.unused_epochs[dead] = 0
        return moved


def check_resumable(state: dict, config: RQVAEConfig, input_dim: int, where: str = "checkpoint") -> None:
    """Fail clearly when a checkpoint cannot continue under ``config`` (another model shape)."""
    saved = state.get("config", {})
    changed = [f for f in ARCHITECTURE_FIELDS
               if f in saved and tuple(np.atleast_1d(saved[f])) != tuple(np.atleast_1d(getattr(config, f)))]
    problems = [f"{f}={saved[f]}" for f in changed]
    saved_dim = state["model"]["encoder.0.weight"].shape[1]
    if saved_dim != input_dim:
        problems.append(f"embedding dim {saved_dim} (now {input_dim})")
    if problems:
        raise ValueError(f"{where} was trained with {', '.join(problems)}; "
                         "pass --fresh to discard it and start over")


def format_metrics(metrics: dict[str, float], config: RQVAEConfig) -> str:
    """One log line per epoch."""
    levels = range(config.num_levels)
    usage = "/".join(f"{metrics[f'usage_l{l}']:.2f}" for l in levels)
    ppl = "/".join(f"{metrics[f'perplexity_l{l}']:.0f}" for l in levels)
    moved = sum(int(metrics.get(f"reseeded_l{l}", 0)) for l in levels)
    return (f"epoch {int(metrics['epoch'])}/{config.epochs} loss {metrics['loss']:.4f} "
            f"(recon {metrics['recon_loss']:.4f} quant {metrics['quant_loss']:.4f}) "
            f"usage {usage} perplexity {ppl} "
            f"unique {metrics['unique_rate']:.4f} reseeded {moved} ({metrics['seconds']:.2f}s)")


def fit_local(vectors: np.ndarray | torch.Tensor, config: RQVAEConfig, state: dict | None = None,
              on_epoch: Callable[[dict, RQVAETrainer], None] | None = None,
              device: str | torch.device = "cpu") -> RQVAETrainer:
    """Train in this process (no Ray) on an in-memory [N, D] matrix; resumes from ``state``."""
    x_all = torch.tensor(np.asarray(vectors, dtype=np.float32))  # a copy: the input may be read-only
    torch.manual_seed(config.seed)
    model = RQVAE(config, x_all.shape[1]).to(device)
    trainer = RQVAETrainer(model, config)
    if state is not None:
        trainer.load_state_dict(state)
    bs = trainer.local_batch_size
    while trainer.epoch < config.epochs:
        order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(config.seed + trainer.epoch))
        metrics = trainer.run_epoch((x_all[order[i:i + bs]] for i in range(0, len(x_all), bs)),
                                    (x_all[i:i + 4 * bs] for i in range(0, len(x_all), 4 * bs)))
        log.info(format_metrics(metrics, config))
        if on_epoch is not None:
            on_epoch(metrics, trainer)
    return trainer
