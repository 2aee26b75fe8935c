"""`tiger train-rqvae`: train the RQ-VAE with Ray Train, then give every item its Semantic ID.

    run_train_rqvae(run, config)
      1. Ray Train TorchTrainer (DDP; gloo on CPU, NCCL on GPU), each worker streaming its shard of
         RUN/embeddings through Ray Data. Checkpoints in RUN/semantic_ids/train/ every
         ``checkpoint_every`` epochs; a re-run resumes from the latest one (``--fresh`` starts
         over); a crashed worker restarts from it (``max_failures``).
      2. RUN/semantic_ids/model.pt + config.json + metrics.jsonl (one line per epoch).
      3. Assignment (``assign.py``, Ray Data batch inference, collision tokens per prefix bucket)
         -> codes.npy and the sorted-key index, plus streamed statistics.
      4. Report (``report.py``) -> report.json, report.png, learning_curve.png.
      5. semantic_ids.parquet (export), then semantic_ids.json, written last: its presence means
         the stage completed.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, replace
from typing import Iterator

import numpy as np

from tiger_ray import atomic, distributed
from tiger_ray.config import from_dict
from tiger_ray.runs import RunDir
from tiger_ray.semantic_ids.config import RQVAEConfig
from tiger_ray.semantic_ids.table import CODE_COLUMNS

log = logging.getLogger(__name__)

TRAIN_NAME = "rqvae"  # Ray Train run name under RUN/semantic_ids/train/
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------- worker side


class ShardBatches:
    """One worker's shard as tensors: streamed from Ray Data, optionally kept in memory.

    With ``cache`` the first epoch streams the shard and keeps it; later epochs reshuffle it in
    memory, which avoids re-reading small catalogs hundreds of times. Without it every epoch
    streams again with a local shuffle buffer, for shards that do not fit in memory.
    """

    def __init__(self, shard, batch_size: int, cache: bool, seed: int, rank: int):
        self.shard, self.batch_size, self.cache, self.seed, self.rank = shard, batch_size, cache, seed, rank
        self.rows = None  # the cached shard [n, dim] once complete

    def _stream(self, shuffle_seed: int | None) -> Iterator:
        shuffle = {} if shuffle_seed is None else {
            "local_shuffle_buffer_size": 8 * self.batch_size, "local_shuffle_seed": shuffle_seed}
        for batch in self.shard.iter_torch_batches(batch_size=self.batch_size, device="cpu", **shuffle):
            yield batch["embedding"]

    def train(self, epoch: int) -> Iterator:
        import torch

        seed = self.seed + 1000 * epoch + self.rank
        if self.rows is not None:
            order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(seed))
            for i in range(0, len(order), self.batch_size):
                yield self.rows[order[i:i + self.batch_size]]
            return
        parts = []
        for x in self._stream(seed):
            if self.cache:
                parts.append(x)
            yield x
        if self.cache and parts:
            self.rows = torch.cat(parts)

    def eval(self) -> Iterator:
        if self.rows is not None:
            for i in range(0, len(self.rows), 4 * self.batch_size):
                yield self.rows[i:i + 4 * self.batch_size]
        else:
            yield from self._stream(None)


def _worker_logging() -> None:
    """Ray workers start with the root logger at WARNING; show this stage's INFO lines."""
    logger = logging.getLogger("tiger_ray")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the root logger of a Ray worker would print each line twice
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from tiger_ray.semantic_ids.rqvae import RQVAE
    from tiger_ray.semantic_ids.trainer import RQVAETrainer, format_metrics

    _worker_logging()
    config = from_dict(RQVAEConfig, loop_config["config"])
    rank, main = distributed.world_rank(), distributed.is_main()
    torch.manual_seed(config.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = RQVAE(config, int(loop_config["input_dim"])).to(distributed.torch_device())
    core = RQVAETrainer(model, config)
    history: list[dict] = []
    state = distributed.load_checkpoint_state()
    if state is not None:
        core.load_state_dict(state)
        history = [m for m in state["history"] if m["epoch"] <= core.epoch]
        if main:
            log.info("resuming from the checkpoint of epoch %d/%d", core.epoch, config.epochs)
    started_at = core.epoch  # 0 for a fresh run; recorded so callers can tell a resume
    # DDP after loading, so every rank wraps identical weights; the optimiser holds the same
    # parameter objects, which DDP does not replace.
    core.net = ray.train.torch.prepare_model(model)
    shard = ShardBatches(ray.train.get_dataset_shard("train"), core.local_batch_size,
                         cache=config.cache_shard, seed=config.seed, rank=rank)
    if core.epoch >= config.epochs:
        # Already trained (a re-run): hand the final state back so the driver can export it.
        distributed.report(history[-1] if history else {"epoch": core.epoch},
                           _state(core, history, state.get("started_at", 0) if state else 0))
        return
    while core.epoch < config.epochs:
        metrics = core.run_epoch(shard.train(core.epoch), shard.eval())
        history.append(metrics)
        if main:
            log.info(format_metrics(metrics, config))
        save = core.epoch % config.checkpoint_every == 0 or core.epoch == config.epochs
        distributed.report(metrics, _state(core, history, started_at) if save else None)


def _state(core, history: list[dict], started_at: int) -> dict:
    # The metric history rides in the checkpoint: it survives restarts and resumes, and the
    # driver can write metrics.jsonl even when rank 0 ran on another node.
    return {**core.state_dict(), "history": history, "started_at": started_at}


# ---------------------------------------------------------------- driver side


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_rows(batch: dict, fraction: float, seed: int) -> dict:
    """Keep the rows whose seeded item-id hash falls below ``fraction``: the same subset on every
    run and machine, whatever the block order (Ray Data map_batches)."""
    ids = np.asarray(batch["item_id"], dtype=np.int64)
    h = _splitmix(ids * 1_000_003 + seed) >> np.uint64(11)  # 53 bits, exact in a float64
    keep = h.astype(np.float64) < fraction * 2.0**53
    return {key: value[keep] for key, value in batch.items()}


def training_plan(config: RQVAEConfig, num_items: int) -> tuple[RQVAEConfig, int]:
    """(config with ``epochs`` set from ``steps`` if given, expected sample size)."""
    sample = min(config.train_sample or num_items, num_items)
    if config.steps:
        per_epoch = max(1, math.ceil(sample / config.batch_size))
        config = replace(config, epochs=max(1, math.ceil(config.steps / per_epoch)))
    return config, sample


def training_dataset(run: RunDir, config: RQVAEConfig, num_items: int):
    """The embeddings, or the seeded ``train_sample`` subset of them."""
    from tiger_ray.embedding.store import read_embeddings_dataset

    ds = read_embeddings_dataset(run)
    if config.train_sample and config.train_sample < num_items:
        ds = ds.map_batches(sample_rows, fn_kwargs={"fraction": config.train_sample / num_items,
                                                    "seed": config.seed}, batch_format="numpy")
    return ds


def train_rqvae(run: RunDir, config: RQVAEConfig) -> dict:
    """Fit on Ray Train; returns the final checkpoint state (model, optimizer, epoch, history)."""
    from tiger_ray.embedding.store import MANIFEST, Manifest

    manifest = Manifest.read(run.require(run.embeddings / MANIFEST, "tiger embed").parent)
    if manifest.count < 1:
        raise ValueError(f"{run.embeddings / MANIFEST}: no embeddings to train on")
    config, sample = training_plan(config, manifest.count)
    if sample < manifest.count:
        log.info("training on a seeded sample of ~%d of %d items, %d epochs", sample, manifest.count, config.epochs)
    if not config.fresh:
        _check_previous_run(run, config, manifest.dim)
    resources = distributed.TrainerResources(workers=config.workers, use_gpu=config.use_gpu,
                                             cpus_per_worker=config.cpus_per_worker)
    result = distributed.fit(
        train_loop, {"config": asdict(config), "input_dim": manifest.dim}, name=TRAIN_NAME,
        storage_dir=run.semantic_ids / "train", resources=resources, max_failures=config.max_failures,
        datasets={"train": training_dataset(run, config, manifest.count)}, fresh=config.fresh)
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint in {run.semantic_ids / 'train'}")
    import torch

    with result.checkpoint.as_directory() as directory:
        from pathlib import Path

        return torch.load(Path(directory) / distributed.STATE_FILE, map_location="cpu", weights_only=True)


def _check_previous_run(run: RunDir, config: RQVAEConfig, input_dim: int) -> None:
    """On the driver, before Ray Train would resume (and retry) a checkpoint that cannot fit."""
    import torch

    from tiger_ray.semantic_ids.trainer import check_resumable

    directory = distributed.latest_checkpoint_dir(run.semantic_ids / "train", TRAIN_NAME)
    if directory is not None:
        state = torch.load(directory / distributed.STATE_FILE, map_location="cpu", weights_only=True)
        check_resumable(state, config, input_dim, where=str(directory))


def export_model(run: RunDir, config: RQVAEConfig, state: dict, input_dim: int) -> None:
    """RUN/semantic_ids/model.pt, config.json, metrics.jsonl from the final training state."""
    from tiger_ray.semantic_ids.rqvae import RQVAE, save_model

    model = RQVAE(config, input_dim)
    model.load_state_dict(state["model"])
    save_model(model, run.semantic_ids / MODEL_FILE)
    atomic.write_json(run.semantic_ids / CONFIG_FILE, {**asdict(config), "input_dim": input_dim})
    lines = "".join(json.dumps(m, sort_keys=True) + "\n" for m in state["history"])
    atomic.write_text(run.semantic_ids / METRICS_FILE, lines)


def read_metrics(run: RunDir) -> list[dict]:
    path = run.require(run.semantic_ids / METRICS_FILE, "tiger train-rqvae")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
    return out


def run_train_rqvae(run: RunDir, config: RQVAEConfig) -> dict:
    """The `tiger train-rqvae` stage: train, export, assign Semantic IDs, report. Returns the summary."""
    from tiger_ray.embedding.store import MANIFEST, Manifest
    from tiger_ray.ray_env import ray_session
    from tiger_ray.semantic_ids.assign import compute_semantic_ids, finish_table
    from tiger_ray.semantic_ids.report import write_report

    if config.num_levels != len(CODE_COLUMNS) - 1:
        raise ValueError(f"num_levels must be {len(CODE_COLUMNS) - 1}: Semantic IDs are "
                         f"{len(CODE_COLUMNS) - 1} RQ-VAE codes plus the collision token")
    manifest = Manifest.read(run.require(run.embeddings / MANIFEST, "tiger embed").parent)
    run.semantic_ids.mkdir(parents=True, exist_ok=True)
    with ray_session():
        start = time.perf_counter()
        config, _ = training_plan(config, manifest.count)
        state = train_rqvae(run, config)
        train_seconds = time.perf_counter() - start
        export_model(run, config, state, manifest.dim)
        start = time.perf_counter()
        stats = compute_semantic_ids(run, config)
        assign_seconds = time.perf_counter() - start
    history = state["history"]
    report = write_report(run, stats, history, config, extra={
        "workers": config.workers, "use_gpu": config.use_gpu,
        "train_seconds": round(train_seconds, 2), "assign_seconds": round(assign_seconds, 2)})
    # The table's metadata last: its presence marks the stage complete.
    finish_table(run, stats)
    final = history[-1] if history else {}
    summary = {
        "items": report["items"], "epochs": int(state["epoch"]), "workers": config.workers,
        "resumed_from_epoch": int(state.get("started_at", 0)),
        "final_loss": final.get("loss"), "final_recon_loss": final.get("recon_loss"),
        "unique_ids": report["unique_ids"], "usage": report["usage"],
        "largest_collision_group": report["collisions"]["largest_collision_group"],
        "fraction_c3_positive": report["collisions"]["fraction_c3_positive"],
        "train_seconds": round(train_seconds, 2), "assign_seconds": round(assign_seconds, 2),
        "semantic_ids": str(run.semantic_ids / "codes.npy"),
    }
    log.info("Semantic IDs for %d items: unique %.4f, usage %s, largest collision group %d, "
             "c3 > 0 for %.2f%%", summary["items"], summary["unique_ids"],
             "/".join(f"{u:.2f}" for u in summary["usage"]), summary["largest_collision_group"],
             100 * summary["fraction_c3_positive"])
    return summary
