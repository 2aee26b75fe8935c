"""`tiger train-seq2seq` on Ray Train: the driver (``run_train_seq2seq``) and the per-worker loop.

The driver decides what is small (tokenizer settings, cold-start items, a sample of validation
users) and never holds the training examples: they are a Ray Dataset (``training_dataset``:
sequences.parquet -> ``ExampleBuilder`` actors -> fixed-width example rows, or all-positions
windows with ``--training-mode all_positions``), streamed anew every epoch and split across the
workers by Ray Train (equal shards). The run directory must be
readable where Ray runs (Ray Data reads sequences.parquet, workers open the Semantic IDs). Each
worker builds the same model (DDP broadcasts rank 0's weights), wraps it with
``ray.train.torch.prepare_model`` and runs ``Seq2SeqTrainer.fit`` on length-bucketed batches of
its shard. Checkpoints (model, optimizer, schedule,
progress, history, best weights, every rank's RNG state) live under ``RUN/seq2seq/ray/train``;
running the command again resumes from the latest one, and ``FailureConfig`` restarts crashed
workers from it. When training stops, the driver writes

    RUN/seq2seq/best/                 the weights with the best validation Recall@10 (save_model)
    RUN/seq2seq/history.jsonl         train / epoch / eval events
    RUN/seq2seq/learning_curve.png    train loss and val Recall@10 against the step
    RUN/seq2seq/train_config.json     the settings used
    RUN/seq2seq/summary.json          steps, stop reason, best step and metric, wall time
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from tiger_ray import atomic
from tiger_ray.config import from_dict, to_dict
from tiger_ray.runs import RunDir
from tiger_ray.seq2seq.presets import Seq2SeqTrainConfig

log = logging.getLogger(__name__)

RAY_STORAGE = "ray"  # RUN/seq2seq/ray/<TRIAL_NAME>: Ray Train's checkpoints
TRIAL_NAME = "train"
BEST_DIR = "best"
DATA_CPUS = 0.25  # logical CPUs of each example-building Ray Data actor


def cold_items_of(path, fraction: float, seed: int) -> np.ndarray:
    """``select_cold_items`` over sequences.parquet at ``path``, streamed: only the distinct last
    items (the test targets it draws from) are held, never the users."""
    import pyarrow.compute as pc

    from tiger_ray.data.schema import Sequences, iter_batches
    from tiger_ray.seq2seq.cold_start import select_cold_items

    last = []
    for batch in iter_batches(path, ["item_ids"]):
        items = batch.column("item_ids")
        ends = np.cumsum(pc.list_value_length(items).to_numpy()) - 1
        last.append(np.unique(pc.list_flatten(items).to_numpy()[ends]))
    test_items = np.unique(np.concatenate(last)) if last else np.zeros(0, np.int64)
    # select_cold_items reads each sequence's last item: one single-item "sequence" per item.
    one_each = Sequences(user_ids=np.zeros(len(test_items), np.int64),
                         offsets=np.arange(len(test_items) + 1, dtype=np.int64), flat=test_items)
    return select_cold_items(one_each, fraction, seed)


def count_training_examples(path) -> int:
    """Training examples before cold-start exclusion, from the Parquet footers: a user with n
    items has n - 3 (every prefix of the first n - 2 items but the empty one)."""
    from tiger_ray.data.schema import count_list_values, count_rows

    return count_list_values(path, "item_ids") - 3 * count_rows(path)


def make_tokenizer(config: Seq2SeqTrainConfig, sids):
    from tiger_ray.seq2seq.tokenizer import SemanticIdTokenizer

    return SemanticIdTokenizer(sids, num_user_buckets=config.num_user_buckets,
                               use_user_token=config.use_user_token, max_history=config.max_history)


def load_tokenizer(run_root: str, state: dict):
    """The tokenizer of ``state`` over the run's Semantic IDs, read where the process runs (Ray
    Data actors, Ray Train workers): the table is opened from the run directory, not shipped."""
    from tiger_ray.semantic_ids.table import read_semantic_ids
    from tiger_ray.seq2seq.tokenizer import SemanticIdTokenizer

    return SemanticIdTokenizer.from_state(state, read_semantic_ids(RunDir(run_root)))


def driver_payload(run: RunDir, config: Seq2SeqTrainConfig) -> dict:
    """What the driver decides once, all of it small: the tokenizer settings, the cold-start
    items, the validation users (a sample of ``val_users``, streamed) and the example count."""
    from tiger_ray.semantic_ids.table import read_semantic_ids
    from tiger_ray.seq2seq.train import sample_validation_set

    path = run.require(run.sequences, "tiger prepare")
    tokenizer = make_tokenizer(config, read_semantic_ids(run))
    cold_items = np.zeros(0, dtype=np.int64)
    if config.cold_start_fraction > 0:
        # Paper Sec. 4.3: these items never appear in training, neither as targets nor in
        # histories; the list is saved beside the model for `tiger evaluate --cold-start`.
        cold_items = cold_items_of(path, config.cold_start_fraction, config.seed)
    valid = sample_validation_set(path, config.max_history, config.val_users, config.seed)
    return {"cold_items": cold_items, "tokenizer": tokenizer.state(), "valid": valid.to_arrays(),
            "train_examples": count_training_examples(path)}


def prepare_payload(run: RunDir, config: Seq2SeqTrainConfig) -> dict:
    """``driver_payload`` plus every training example in memory (``payload["train"]``, the
    arrays of ``TokenizedExamples``, or of ``TrainingWindows`` in all_positions mode) and the
    Semantic IDs: one-process training of small runs (tests, notebooks). Ray Train streams the
    examples instead (``training_dataset``)."""
    from tiger_ray.data.schema import read_sequences
    from tiger_ray.semantic_ids.table import read_semantic_ids
    from tiger_ray.seq2seq.data import (examples_from_columns, examples_per_window,
                                        training_examples, training_windows)

    payload = driver_payload(run, config)
    sids = read_semantic_ids(run)
    tokenizer = load_tokenizer(str(run.root), payload["tokenizer"])
    sequences = read_sequences(run.sequences)
    windows = config.training_mode == "all_positions"
    columns = (training_windows if windows else training_examples)(
        sequences.user_ids, sequences.offsets, sequences.flat, tokenizer, payload["cold_items"])
    if config.cold_start_fraction > 0:
        kept = (int(examples_per_window(columns["visible"]).sum()) if windows
                else len(columns["targets"]))
        log.info("train-seq2seq: %d cold-start items held out of training (%d of %d examples "
                 "dropped)", len(payload["cold_items"]), payload["train_examples"] - kept,
                 payload["train_examples"])
    return {**payload, "semantic_ids": _sids_dict(sids),
            "train": columns if windows else examples_from_columns(columns).to_arrays()}


def _sids_dict(sids) -> dict:
    return {"item_ids": sids.item_ids, "codes": sids.codes,
            "codebook_sizes": list(sids.codebook_sizes)}


def training_dataset(run: RunDir, config: Seq2SeqTrainConfig, tokenizer_state: dict,
                     cold_items: np.ndarray):
    """The training examples as a streaming Ray Dataset: the row groups of sequences.parquet (a
    file or parts) read and expanded into fixed-width example rows (all-positions windows in that
    mode) by ``ExampleBuilder`` actors.
    It is re-executed every epoch and never gathered: Ray Train hands each worker its shard."""
    import functools

    import ray.data

    from tiger_ray.seq2seq.data import ExampleBuilder, user_slices

    slices = user_slices(run.require(run.sequences, "tiger prepare"))
    # One block per work item; their order is shuffled anew every epoch (a tiny all-to-all over
    # the work items, not the rows).
    items = ray.data.from_items(slices, override_num_blocks=len(slices)).randomize_block_order()
    return items.map_batches(
        ExampleBuilder, batch_size=1,
        fn_constructor_kwargs={"make_tokenizer": functools.partial(load_tokenizer, str(run.root),
                                                                   tokenizer_state),
                               "cold_items": cold_items,
                               "users_per_batch": config.data_users_per_batch,
                               "windows": config.training_mode == "all_positions"},
        compute=ray.data.ActorPoolStrategy(size=config.data_workers), num_cpus=DATA_CPUS)


def tokenizer_from_payload(payload: dict):
    from tiger_ray.semantic_ids.table import SemanticIds
    from tiger_ray.seq2seq.tokenizer import SemanticIdTokenizer

    s = payload["semantic_ids"]
    sids = SemanticIds(item_ids=np.asarray(s["item_ids"]), codes=np.asarray(s["codes"]),
                       codebook_sizes=tuple(s["codebook_sizes"]))
    return SemanticIdTokenizer.from_state(payload["tokenizer"], sids)


def worker_threads(config: Seq2SeqTrainConfig) -> int:
    """Intra-op threads: as many as the CPUs Ray reserved for the worker (at least one)."""
    return config.torch_threads or max(1, int(config.cpus_per_worker))


def want_progress_bar() -> bool:
    """A bar on an interactive terminal; plain log lines when output goes to a file or a job log
    (a redrawn bar there is one line per update), or under TQDM_DISABLE."""
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stderr.isatty()


def _progress_bar_factory(enabled: bool):
    """A Ray-aware tqdm: the bar of a remote worker is drawn by the driver."""
    if not enabled:
        return None
    from ray.experimental.tqdm_ray import tqdm

    def make(total: int, initial: int = 0):
        bar = tqdm(total=total, desc="train-seq2seq", unit="step")
        if initial:
            bar.update(initial)
        return bar

    return make


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker (DDP rank): its batches come from its shard of the
    "train" dataset (``ray.train.get_dataset_shard``)."""
    import ray.train
    import ray.train.torch
    import torch

    from tiger_ray import distributed as dist
    from tiger_ray.seq2seq.data import StreamedBatches
    from tiger_ray.seq2seq.model import TigerSeq2Seq
    from tiger_ray.seq2seq.train import (Seq2SeqTrainer, ValidationSet, model_config,
                                         resolve_precision)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = from_dict(Seq2SeqTrainConfig, loop_config["config"])
    torch.set_num_threads(worker_threads(config))
    payload = loop_config["payload"]
    tokenizer = load_tokenizer(loop_config["run"], payload["tokenizer"])
    valid = ValidationSet.from_arrays(payload["valid"])
    rank, world = dist.world_rank(), dist.world_size()
    device = dist.torch_device()

    def agree(n: int) -> int:  # the smallest count over the ranks, so all take as many steps
        if world == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())

    per_rank = max(1, config.batch_size // world)  # the global batch, split across the ranks
    train_data = StreamedBatches(
        ray.train.get_dataset_shard("train"), per_rank, chunk_batches=config.bucket_chunk_batches,
        seed=config.seed, rank=rank, world_size=world, pad_id=tokenizer.pad_id,
        bos_id=tokenizer.bos_id, examples=payload["train_examples"], agree=agree,
        shuffle_buffer=per_rank * config.shuffle_buffer_batches or None)

    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts)
    model = TigerSeq2Seq(model_config(config, tokenizer))
    if dist.is_main():
        log.info("seq2seq: %d parameters, about %d training examples, %d validation users, "
                 "%d workers x %d threads, device %s, precision %s", model.num_parameters(),
                 payload["train_examples"], len(valid), world, torch.get_num_threads(), device,
                 resolve_precision(config.precision, device))

    def wrap(module):
        # DDP when world_size > 1; gradient_as_bucket_view saves one copy of every gradient.
        return ray.train.torch.prepare_model(
            module, parallel_strategy_kwargs={"gradient_as_bucket_view": True})

    trainer = Seq2SeqTrainer(config, model, tokenizer, train_data, valid, device=device,
                             rank=rank, world_size=world, wrap=wrap, report=dist.report,
                             progress_bar=_progress_bar_factory(loop_config.get("progress_bar", False)))
    trainer.fit(dist.load_checkpoint_state())


def _load_state(checkpoint) -> dict:
    import torch

    from tiger_ray.distributed import STATE_FILE

    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def write_outputs(run: RunDir, config: Seq2SeqTrainConfig, state: dict, tokenizer,
                  wall_seconds: float, cold_items: np.ndarray | None = None) -> dict:
    """best/, history.jsonl, learning_curve.png, train_config.json, summary.json from a final state."""
    from tiger_ray.seq2seq.cold_items import save_cold_items
    from tiger_ray.seq2seq.history import plot_learning_curve, write_history
    from tiger_ray.seq2seq.model import TigerSeq2Seq, save_model
    from tiger_ray.seq2seq.train import VAL_METRIC, model_config

    out = run.seq2seq
    progress = state["progress"]
    if state.get("best_model") is None:
        raise ValueError(f"{out}: training ended without a validation; nothing to save as best")
    mcfg = model_config(config, tokenizer)
    model = TigerSeq2Seq(mcfg)
    model.load_state_dict(state["best_model"])
    best_eval = next((r for r in reversed(state["history"])
                      if r.get("event") == "eval" and r["step"] == progress["best_step"]), {})
    extra = {"best_step": progress["best_step"], "validation": best_eval,
             "train_config": to_dict(config)}
    with atomic.atomic_path(out / BEST_DIR, is_dir=True) as tmp:
        save_model(tmp, model, mcfg, tokenizer, extra=extra)
        if cold_items is not None and len(cold_items):
            save_cold_items(tmp, cold_items, fraction=config.cold_start_fraction, seed=config.seed)
    write_history(out / "history.jsonl", state["history"])
    plot_learning_curve(state["history"], out / "learning_curve.png",
                        title=f"TIGER seq2seq on {run.root.name}")
    atomic.write_json(out / "train_config.json", to_dict(config))
    train_events = [r for r in state["history"] if r.get("event") in ("train", "epoch")]
    summary = {
        "steps": progress["step"],
        "epochs_completed": progress["epoch"],
        "examples_seen": progress["examples_seen"],
        "stop_reason": progress["stop_reason"],
        "best_step": progress["best_step"],
        f"best_val_{VAL_METRIC}": progress["best_metric"],
        "best_validation": best_eval,
        "final_train_loss": train_events[-1]["loss"] if train_events else None,
        "train_seconds": progress["train_seconds"],
        "examples_per_second": (progress["examples_seen"] / progress["train_seconds"]
                                if progress["train_seconds"] else None),
        "wall_seconds": wall_seconds,
        "parameters": model.num_parameters(),
        "workers": config.workers,
        "best_dir": str(out / BEST_DIR),
    }
    atomic.write_json(out / "summary.json", summary)
    return summary


def check_resumable(storage_dir: Path, config: Seq2SeqTrainConfig, tokenizer) -> int | None:
    """Step of the checkpoint a run would resume from (None if it starts fresh); ValueError if
    that checkpoint holds another model shape or was trained on other Semantic IDs."""
    import dataclasses

    import torch

    from tiger_ray.distributed import STATE_FILE, latest_checkpoint_dir
    from tiger_ray.seq2seq.model import Seq2SeqConfig
    from tiger_ray.seq2seq.train import model_config

    latest = None if config.fresh else latest_checkpoint_dir(storage_dir, TRIAL_NAME)
    if latest is None:
        return None
    state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=True)
    wanted = dataclasses.asdict(model_config(config, tokenizer))
    # A checkpoint written before a field existed has that field's default.
    saved = state.get("model_config")
    saved = dataclasses.asdict(from_dict(Seq2SeqConfig, saved)) if saved else {}
    if saved != wanted:
        changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
        raise ValueError(f"{latest}: the run to resume has a different model ({', '.join(changed)}); "
                         f"pass --fresh to start over")
    saved = (state.get("tokenizer") or {}).get("fingerprint")
    if saved != tokenizer.state()["fingerprint"]:
        raise ValueError(f"{latest}: the run to resume was trained on other Semantic IDs or "
                         f"tokenizer settings; pass --fresh to start over")
    return int(state["progress"]["step"])


def run_train_seq2seq(run: RunDir, config: Seq2SeqTrainConfig) -> dict:
    """Train the seq2seq model of ``run`` on Ray Train; returns the summary (also summary.json)."""
    from tiger_ray.distributed import TrainerResources, fit
    from tiger_ray.ray_env import ray_session

    start = time.perf_counter()
    payload = driver_payload(run, config)
    tokenizer = load_tokenizer(str(run.root), payload["tokenizer"])
    log.info("train-seq2seq: about %d training examples (streamed by Ray Data, %s), %d "
             "validation users, vocabulary %d, %d workers%s", payload["train_examples"],
             config.training_mode.replace("_", " "),
             len(payload["valid"]["targets"]), tokenizer.vocab_size, config.workers,
             " (GPU)" if config.use_gpu else "")
    if len(payload["cold_items"]):
        log.info("train-seq2seq: %d cold-start items held out of training", len(payload["cold_items"]))
    resume_step = check_resumable(run.seq2seq / RAY_STORAGE, config, tokenizer)
    if resume_step is not None:
        log.info("train-seq2seq: resuming from the checkpoint at step %d (--fresh to start over)",
                 resume_step)
    resources = TrainerResources(workers=config.workers, use_gpu=config.use_gpu,
                                 cpus_per_worker=config.cpus_per_worker)
    with ray_session():
        dataset = training_dataset(run, config, payload["tokenizer"], payload["cold_items"])
        loop_config = {"config": to_dict(config), "payload": payload, "run": str(run.root),
                       "progress_bar": want_progress_bar()}
        result = fit(train_loop_per_worker, loop_config, name=TRIAL_NAME,
                     storage_dir=run.seq2seq / RAY_STORAGE, resources=resources,
                     max_failures=config.max_failures, fresh=config.fresh,
                     datasets={"train": dataset})
        if result.checkpoint is None:
            raise ValueError(f"{run.seq2seq / RAY_STORAGE}: training produced no checkpoint")
        state = _load_state(result.checkpoint)
    summary = write_outputs(run, config, state, tokenizer, time.perf_counter() - start,
                            cold_items=payload["cold_items"])
    log.info("train-seq2seq: %s after %d steps; best val Recall@10 %.4f at step %d -> %s "
             "(%.1f min)", summary["stop_reason"], summary["steps"],
             summary["best_val_recall@10"], summary["best_step"], summary["best_dir"],
             summary["wall_seconds"] / 60)
    return summary
