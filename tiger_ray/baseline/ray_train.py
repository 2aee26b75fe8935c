"""Training the dual encoder with Ray Train, then exporting it and building its FAISS index.

    RUN/baseline/ray/dual_encoder/       Ray Train run: checkpoints (resume, restarts)
    RUN/baseline/model.pt                best model (by validation recall@10) + item table
    RUN/baseline/index-<type>/           FAISS index (see ann_index.py)
    RUN/baseline/config.json             BaselineConfig + IndexConfig used
    RUN/baseline/summary.json            per-epoch log, best epoch, validation metrics, timings

Training examples are the shared ones (every prefix of each user's training part -> its next
item, as ``build_examples(..., "train")``), computed SASRec-style: one causal pass over a window of
a user's items gives every prefix's query at once (``training_windows``), about 6x less work on
Beauty than one pass per prefix. Windows are sharded across workers by a per-epoch permutation;
each example counts once per epoch. After every epoch all
workers score their share of the validation users with exact search and the totals are summed,
so every rank takes the same early-stopping decision. The test split is never looked at here.

Large catalogs (``data``/``loss`` auto: above ``large_catalog`` items, default 100k) change three
things, because every worker holding all users, the text matrix and [examples, N] logits does not
scale: the windows are made by Ray Data and streamed to the workers (``get_dataset_shard``,
stream.py), the text vectors are read per batch from the memory-mapped RUN/embeddings/vectors.npy,
and the loss is the in-batch sampled softmax with log-Q correction, Q from the streamed
RUN/baseline/item_counts.npy. Validation then scores a sample of users (``valid_users``) against
the catalog in chunks of items; the item table is written by Ray Data batch inference
(item_vectors.py) and IVF-PQ indexes are built in shards and merged on disk (ondisk_index.py).
Small catalogs keep the full softmax and in-memory windows, the setting docs/RESULTS.md reports.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tiger_ray import atomic, config as config_lib
from tiger_ray.baseline import ann_index
from tiger_ray.baseline.config import BaselineConfig
from tiger_ray.baseline.dual_encoder import (DualEncoder, DualEncoderConfig, pad_examples,
                                             parameter_count, text_matrix, training_windows)
from tiger_ray.baseline import stream
from tiger_ray.baseline.losses import log_q_from_counts, log_sampling_probability
from tiger_ray.embedding.store import open_vectors
from tiger_ray.data.schema import read_items, read_sequences
from tiger_ray.data.split import build_examples, check_lengths, train_part
from tiger_ray.evaluation.metrics import MetricCollection
from tiger_ray.runs import RunDir

log = logging.getLogger(__name__)

RAY_RUN_NAME = "dual_encoder"
MODEL_FILE = "model.pt"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
# Settings that may change between a run and its resumption (they do not change the model).
RESUMABLE_CHANGES = {"epochs", "patience", "workers", "use_gpu", "cpus_per_worker", "torch_threads", "valid_users",
                     "max_failures", "fresh", "eval_batch_size"}


# ---------------------------------------------------------------- data (plain numpy / torch)

@dataclass
class TrainingData:
    num_items: int
    user_ids: np.ndarray  # [U] training users; user index u+1 in the embedding (0 = unknown)
    history: np.ndarray  # [W, max_history] training windows, left-aligned (see training_windows)
    targets: np.ndarray  # [W, max_history] next item at each position, 0 = no example there
    users: np.ndarray  # [W] user index of each window
    valid_history: np.ndarray  # [U, max_history] validation histories, left-aligned
    valid_users: np.ndarray
    valid_targets: np.ndarray  # [U]
    text: torch.Tensor | None  # [N+1, text_dim]

    @property
    def num_examples(self) -> int:
        return int((self.targets != 0).sum())


def load_training_data(run: RunDir, config: BaselineConfig) -> TrainingData:
    from tiger_ray.embedding.store import load_embeddings

    num_items = read_items(run.require(run.items, "tiger prepare"), columns=["item_id"]).num_rows
    sequences = read_sequences(run.require(run.sequences, "tiger prepare"))
    check_lengths(sequences)
    history, targets, owners = training_windows([train_part(sequences[u]) for u in range(len(sequences))],
                                                config.max_history)
    valid = build_examples(sequences, "valid", max_history=config.max_history)
    text = None
    if config.use_text:
        item_ids, vectors = load_embeddings(run)
        text = text_matrix(item_ids, vectors, num_items)
    keep = slice(0, config.valid_users or None)  # the first valid_users users (0 = all)
    return TrainingData(
        num_items=num_items, user_ids=sequences.user_ids, history=history, targets=targets,
        users=owners + 1, valid_history=pad_examples(valid.offsets, valid.flat, config.max_history)[keep],
        valid_users=valid.user_index[keep] + 1, valid_targets=valid.targets[keep], text=text)


def model_config(config: BaselineConfig, data: TrainingData) -> DualEncoderConfig:
    return _model_config(config, data.num_items, 0 if data.text is None else int(data.text.shape[1]),
                         len(data.user_ids) if config.user_embedding else 0)


def _model_config(config: BaselineConfig, num_items: int, text_dim: int, num_users: int) -> DualEncoderConfig:
    return DualEncoderConfig(
        num_items=num_items, text_dim=text_dim, num_users=num_users, dim=config.dim,
        max_history=config.max_history, num_layers=config.num_layers, num_heads=config.num_heads,
        dropout=config.dropout, id_dropout=config.id_dropout, normalize=config.normalize,
        temperature=config.temperature,
        id_rows=0 if num_items + 1 <= config.max_id_rows else config.max_id_rows)


def resolve(config: BaselineConfig, num_items: int) -> BaselineConfig:
    """``config`` with loss and data made concrete for a catalog of ``num_items``.

    Small catalogs keep the full softmax and in-memory windows: on Beauty (12k items) that is the
    setting docs/RESULTS.md reports. Above ``large_catalog`` the [examples, N] logits and every
    worker's copy of all users do not fit, so in_batch + log-Q and streamed windows take over.
    """
    large = num_items > config.large_catalog
    return replace(config, loss=config.loss if config.loss != "auto" else ("in_batch" if large else "full"),
                   data=config.data if config.data != "auto" else ("stream" if large else "memory"))


# ---------------------------------------------------------------- one epoch, one evaluation

def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, config: BaselineConfig,
                loss_name: str, log_q: torch.Tensor | None) -> float:
    """The optimiser steps over ``batches`` of (history, users, targets) tensors, at most
    ``steps_per_epoch`` of them; returns the mean loss per step. Both data paths train through it."""
    model.train()
    total, steps = 0.0, 0
    for history, users, targets in batches:
        loss = model(history, users, targets, loss=loss_name, log_q=log_q if config.log_q else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        total += float(loss.detach())
        steps += 1
        if steps == config.steps_per_epoch:  # every rank stops at the same step (equal shares)
            break
    return total / max(steps, 1)


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: TrainingData,
                rows: np.ndarray, config: BaselineConfig, log_q: torch.Tensor | None,
                device: torch.device, progress: bool = True, desc: str = "train") -> float:
    """One pass over ``rows`` of the training windows; returns the mean loss per step."""
    from tqdm.auto import tqdm

    def batches():
        starts = range(0, len(rows), config.batch_size)
        for lo in tqdm(starts, desc=desc, unit="batch", disable=not progress, mininterval=10.0):
            idx = rows[lo: lo + config.batch_size]
            yield (torch.from_numpy(data.history[idx]).to(device), torch.from_numpy(data.users[idx]).to(device),
                   torch.from_numpy(data.targets[idx]).to(device))

    return train_steps(model, optimizer, batches(), config, resolve(config, data.num_items).loss, log_q)


@torch.no_grad()
def evaluate_exact(model: DualEncoder, history: np.ndarray, users: np.ndarray, targets: np.ndarray,
                   batch_size: int, device: torch.device) -> MetricCollection:
    """Recall/NDCG@5/10 with exact top-k over the whole catalog (what the Flat index returns)."""
    model.eval()
    items = model.score_vectors(model.item_table())
    table = model.item_table()
    metrics = MetricCollection.default()
    for lo in range(0, len(targets), batch_size):
        h = torch.from_numpy(history[lo: lo + batch_size]).to(device)
        u = torch.from_numpy(users[lo: lo + batch_size]).to(device)
        scores = model.encode_queries(h, u, table=table) @ items.T
        scores[:, 0] = float("-inf")
        top = scores.topk(metrics.max_k, dim=1).indices.cpu().numpy()
        metrics.update(top, targets[lo: lo + batch_size])
    return metrics


def all_reduce_metrics(metrics: MetricCollection) -> dict[str, float]:
    """Sum metric totals over DDP ranks (no-op without torch.distributed) and compute."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sums = torch.tensor([[m.total, m.count] for m in metrics.metrics], dtype=torch.float64)
        dist.all_reduce(sums)
        for m, (total, count) in zip(metrics.metrics, sums.tolist()):
            m.total, m.count = total, int(count)
    return {**metrics.compute(), "count": metrics.count}


def epoch_rows(num_examples: int, epoch: int, seed: int, rank: int, world: int) -> np.ndarray:
    """This rank's examples for an epoch: a shared shuffle cut into equal shares (DDP needs every
    rank to take the same number of steps)."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    share = num_examples // world
    return perm[rank * share: (rank + 1) * share]


STREAM_VALID_USERS = 10_000  # validation sample of data=stream when valid_users is 0


def stream_model_config(config: BaselineConfig, run: RunDir, text) -> DualEncoderConfig:
    if config.user_embedding:
        raise ValueError("user_embedding is not supported with data=stream (a [users, dim] table "
                         "per worker); use data=memory or drop --user-embedding")
    return _model_config(config, stream.num_items(run), 0 if text is None else int(text.shape[1]), 0)


def train_epoch_stream(model: torch.nn.Module, optimizer: torch.optim.Optimizer, shard,
                       config: BaselineConfig, log_q: torch.Tensor | None, device: torch.device,
                       epoch: int) -> float:
    """One pass over this rank's share of the streamed windows (equal shares: Ray Train splits
    with equal=True, so every rank takes the same number of steps)."""
    batches = ((b["history"], None, b["targets"]) for b in shard.iter_torch_batches(
        batch_size=config.batch_size, dtypes=torch.int64, device=device,
        local_shuffle_buffer_size=8 * config.batch_size, local_shuffle_seed=config.seed * 100_003 + epoch))
    return train_steps(model, optimizer, batches, config, config.loss, log_q)


def train_local(run: RunDir, config: BaselineConfig, export: bool = True,
                device: str = "cpu") -> tuple[DualEncoder, TrainingData, list[dict]]:
    """One-process training without Ray (tests, notebooks): same epochs, same validation-based
    selection and early stopping as the Ray loop; returns the best model, the data, the log.
    With ``export`` it also writes RUN/baseline/model.pt (then `build_run_index` makes an index)."""
    import copy

    torch.manual_seed(config.seed)
    data = load_training_data(run, config)
    dev = torch.device(device)
    model = DualEncoder(model_config(config, data), data.text).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    log_q = log_sampling_probability(data.targets[data.targets != 0], data.num_items).to(dev)
    best, best_state, bad, history = (-1.0, -1.0), None, 0, []
    for epoch in range(config.epochs):
        rows = epoch_rows(len(data.targets), epoch, config.seed, 0, 1)
        loss = train_epoch(model, optimizer, data, rows, config, log_q, dev, progress=False)
        metrics = evaluate_exact(model, data.valid_history, data.valid_users, data.valid_targets,
                                 config.eval_batch_size, dev).compute()
        history.append({"epoch": epoch + 1, "loss": loss, **{f"valid_{k}": v for k, v in metrics.items()}})
        if (metrics["recall@10"], metrics["ndcg@10"]) > best:
            best, best_state, bad = (metrics["recall@10"], metrics["ndcg@10"]), copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= config.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    if export:
        export_model(run, model, data.user_ids)
    return model, data, history


# ---------------------------------------------------------------- Ray Train worker loop

def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import copy

    import ray.train.torch

    from tiger_ray import distributed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = BaselineConfig(**loop_config["config"])
    run = RunDir(loop_config["run"])
    rank, world = distributed.world_rank(), distributed.world_size()
    device = distributed.torch_device()
    # Explicit: an intra-op team larger than the worker's CPU share spin-waits on a busy machine
    # (measured 50x slower with 2 threads than 1 on a loaded 2-core box).
    torch.set_num_threads(config.torch_threads or max(1, int(config.cpus_per_worker)))
    torch.manual_seed(config.seed)

    config = resolve(config, stream.num_items(run))
    if config.data == "stream":
        data, shard = None, ray.train.get_dataset_shard("train")
        text = open_vectors(run) if config.use_text else None  # built by the driver before fit
        model = DualEncoder(stream_model_config(config, run, text), text).to(device)
        counts = np.load(run.baseline / stream.COUNTS_FILE, mmap_mode="r")
        log_q = log_q_from_counts(counts).to(device)
        valid_history, valid_targets = stream.validation_sample(
            run, config.max_history, config.valid_users or STREAM_VALID_USERS)
        valid_users = np.zeros(len(valid_targets), dtype=np.int64)
    else:
        data, shard = load_training_data(run, config), None
        model = DualEncoder(model_config(config, data), data.text).to(device)
        log_q = log_sampling_probability(data.targets[data.targets != 0], data.num_items).to(device)
        valid_history, valid_users, valid_targets = data.valid_history, data.valid_users, data.valid_targets
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    state = distributed.load_checkpoint_state()
    if state is None:
        state = {"epoch": -1, "best_epoch": -1, "best_recall": -1.0, "best_ndcg": -1.0, "bad_epochs": 0,
                 "history": [], "train_seconds": 0.0, "best_model": None, "done": False}
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if rank == 0:
            log.info("resuming after epoch %d (best recall@10 %.4f at epoch %d)", state["epoch"] + 1,
                     state["best_recall"], state["best_epoch"] + 1)
    # Finished = out of epochs or patience under *this* config (a resume may raise --epochs).
    state["done"] = state["epoch"] + 1 >= config.epochs or state["bad_epochs"] >= config.patience
    if state["done"]:  # a finished run: report its final state once so the Result carries it
        distributed.report({"epoch": state["epoch"] + 1, "done": True}, state)
        return

    ddp_model = ray.train.torch.prepare_model(model)  # DDP when world > 1; moves to device
    raw = ddp_model.module if hasattr(ddp_model, "module") else ddp_model
    if rank == 0:
        log.info("dual encoder: %d parameters, %s training windows over %d workers "
                 "(%d torch threads each), loss=%s%s, data=%s", parameter_count(raw),
                 "streamed" if data is None else len(data.targets), world, torch.get_num_threads(),
                 config.loss, " with log-Q correction" if config.loss == "in_batch" and config.log_q else "",
                 config.data)
    for epoch in range(state["epoch"] + 1, config.epochs):
        start = time.perf_counter()
        if shard is None:
            rows = epoch_rows(len(data.targets), epoch, config.seed, rank, world)
            loss = train_epoch(ddp_model, optimizer, data, rows, config, log_q, device, progress=rank == 0,
                               desc=f"epoch {epoch + 1}/{config.epochs}")
        else:
            loss = train_epoch_stream(ddp_model, optimizer, shard, config, log_q, device, epoch)
        # Validation: each rank scores a contiguous share of the users; totals are summed.
        share = np.array_split(np.arange(len(valid_targets)), world)[rank]
        if shard is None:
            metrics = evaluate_exact(raw, valid_history[share], valid_users[share], valid_targets[share],
                                     config.eval_batch_size, device)
        else:
            metrics = stream.evaluate_chunked(raw, valid_history[share], valid_targets[share],
                                              config.eval_batch_size, device)
        metrics = all_reduce_metrics(metrics)
        seconds = time.perf_counter() - start
        state["train_seconds"] += seconds
        entry = {"epoch": epoch + 1, "loss": loss, "seconds": seconds,
                 **{f"valid_{k}": v for k, v in metrics.items() if k != "count"}}
        # Model selection on validation recall@10, ties broken by ndcg@10.
        score = (metrics["recall@10"], metrics["ndcg@10"])
        if score > (state["best_recall"], state.get("best_ndcg", -1.0)):
            state.update(best_recall=metrics["recall@10"], best_ndcg=metrics["ndcg@10"], best_epoch=epoch,
                         bad_epochs=0, best_model=copy.deepcopy(raw.state_dict()))
        else:
            state["bad_epochs"] += 1
        state["history"].append(entry)
        state.update(epoch=epoch, model=raw.state_dict(), optimizer=optimizer.state_dict())
        state["done"] = epoch + 1 >= config.epochs or state["bad_epochs"] >= config.patience
        if rank == 0:
            log.info("epoch %d/%d loss %.4f valid recall@10 %.4f ndcg@10 %.4f (best %.4f @ epoch %d) %.1fs",
                     epoch + 1, config.epochs, loss, metrics["recall@10"], metrics["ndcg@10"],
                     state["best_recall"], state["best_epoch"] + 1, seconds)
        distributed.report(entry, state)
        if state["done"]:
            if rank == 0 and state["bad_epochs"] >= config.patience:
                log.info("early stop: no better validation recall@10 for %d epochs", config.patience)
            break


# ---------------------------------------------------------------- driver: the stage

def _check_resumable(storage: Path, config: BaselineConfig) -> None:
    """Refuse to resume a checkpoint made with different model settings."""
    from tiger_ray import distributed

    saved_path = storage / RAY_RUN_NAME / "baseline_config.json"
    if config.fresh or not saved_path.exists() or distributed.latest_checkpoint_dir(storage, RAY_RUN_NAME) is None:
        return
    saved = atomic.read_json(saved_path)
    changed = sorted(k for k, v in config_lib.to_dict(config).items()
                     if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v)  # absent: an older run
    if changed:
        raise ValueError(f"{storage / RAY_RUN_NAME} holds a training run made with different settings "
                         f"({', '.join(changed)}); pass --fresh to start over")


def result_state(result) -> dict:
    """The state dict of a ``ray.train.Result``'s checkpoint."""
    from tiger_ray.distributed import STATE_FILE

    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def export_model(run: RunDir, model: DualEncoder, user_ids: np.ndarray, item_table: bool = True) -> Path:
    """Save what retrieval needs: query tower weights and the item table (no text matrix).

    ``item_table=False`` (large catalogs) leaves the table to ``item_vectors.write_item_table``,
    which computes it with Ray Data into RUN/baseline/item_table.npy.
    """
    model.eval()
    state = {k: v for k, v in model.state_dict().items()}
    # model_id ties indexes to this export: an index built from an earlier model is refused.
    payload = {"config": model.config.to_dict(), "model": state,
               "user_ids": torch.from_numpy(np.asarray(user_ids, dtype=np.int64)),
               "model_id": uuid.uuid4().hex}
    if item_table:
        with torch.no_grad():
            payload["item_table"] = model.item_table().cpu()
    path = run.baseline / MODEL_FILE
    with atomic.atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def run_train_baseline(run: RunDir, config: BaselineConfig,
                       index_config: ann_index.IndexConfig | None = None) -> dict:
    """Train (or resume) the dual encoder on Ray Train, export the best model, build the index."""
    from tiger_ray import distributed
    from tiger_ray.baseline.retriever import build_run_index

    # Default: exact search; on GPU workers, a GPU index when FAISS can use one.
    index_config = index_config or ann_index.IndexConfig(gpu_index=config.use_gpu)
    run.require(run.items, "tiger prepare")
    run.require(run.sequences, "tiger prepare")
    if config.use_text:
        run.require(run.embeddings / "manifest.json", "tiger embed")
    config = resolve(config, stream.num_items(run))
    run.baseline.mkdir(parents=True, exist_ok=True)
    storage = run.baseline / "ray"
    _check_resumable(storage, config)
    atomic.write_json(run.baseline / CONFIG_FILE,
                      {"baseline": config_lib.to_dict(config), "index": asdict(index_config)})

    start = time.perf_counter()
    resources = distributed.TrainerResources(workers=config.workers, use_gpu=config.use_gpu,
                                             cpus_per_worker=config.cpus_per_worker)
    if config.fresh and (storage / RAY_RUN_NAME).exists():
        import shutil

        shutil.rmtree(storage / RAY_RUN_NAME)
    (storage / RAY_RUN_NAME).mkdir(parents=True, exist_ok=True)
    atomic.write_json(storage / RAY_RUN_NAME / "baseline_config.json", config_lib.to_dict(config))
    datasets = None
    if config.data == "stream":
        # Made once here, before the workers start: they only open them (memory-mapped).
        if config.use_text:
            open_vectors(run)
        stream.write_item_counts(run)
        datasets = {"train": stream.windows_dataset(run, config.max_history)}
    result = distributed.fit(train_loop, {"config": config_lib.to_dict(config), "run": str(run.root)},
                             name=RAY_RUN_NAME, storage_dir=storage, resources=resources,
                             max_failures=config.max_failures, datasets=datasets)
    fit_seconds = time.perf_counter() - start
    state = result_state(result)
    if state.get("best_model") is None:
        raise RuntimeError("training ended before the first epoch finished")

    if config.data == "stream":
        from tiger_ray.baseline.item_vectors import write_item_table

        text = open_vectors(run) if config.use_text else None
        model = DualEncoder(stream_model_config(config, run, text), text)
        model.load_state_dict(state["best_model"])
        export_model(run, model, np.zeros(0, np.int64), item_table=False)
        write_item_table(run, workers=config.workers)
        num_examples = int(np.load(run.baseline / stream.COUNTS_FILE, mmap_mode="r").sum())
        windows = None
    else:
        data = load_training_data(run, config)
        model = DualEncoder(model_config(config, data), data.text)
        model.load_state_dict(state["best_model"])
        export_model(run, model, data.user_ids)
        num_examples, windows = data.num_examples, int(len(data.targets))
    index_summary = build_run_index(run, index_config)
    best = state["history"][state["best_epoch"]]
    summary = {
        "model": "ann",
        "loss": config.loss + (" + log-Q" if config.loss == "in_batch" and config.log_q else ""),
        "parameters": parameter_count(model),
        "train_examples": num_examples,
        "train_windows": windows,  # None when streamed (counted by no one)
        "data": config.data,
        "epochs_run": state["epoch"] + 1,
        "best_epoch": state["best_epoch"] + 1,
        "stopped_early": state["bad_epochs"] >= config.patience,
        "valid": {k.removeprefix("valid_"): v for k, v in best.items() if k.startswith("valid_")},
        "history": state["history"],
        "train_seconds": state["train_seconds"],  # epochs only, summed over resumptions
        "fit_seconds": fit_seconds,  # this call's Ray Train wall time (startup included)
        "workers": config.workers,
        "use_gpu": config.use_gpu,
        "index": index_summary,
        "total_seconds": time.perf_counter() - start,
    }
    atomic.write_json(run.baseline / SUMMARY_FILE, summary)
    log.info("dual encoder: best epoch %d, valid recall@10 %.4f ndcg@10 %.4f; %s index %s",
             summary["best_epoch"], summary["valid"]["recall@10"], summary["valid"]["ndcg@10"],
             index_config.index_type, index_summary["path"])
    return summary
