"""`tiger train-seq2seq` on Ray Train: the driver (``run_train_seq2seq``) and the per-worker loop.

The driver reads the run directory once (sequences, Semantic IDs), tokenises every training
example into flat arrays and puts them in the Ray object store, so workers on any node read them
zero-copy instead of re-reading files that may not exist there. Each worker builds the same model
(DDP broadcasts rank 0's weights), wraps it with ``ray.train.torch.prepare_model`` and runs
``Seq2SeqTrainer.fit`` on its shard of every batch. Checkpoints (model, optimizer, schedule,
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


def prepare_payload(run: RunDir, config: Seq2SeqTrainConfig) -> dict:
    """Everything a worker needs, as numpy arrays and JSON-able dicts (no file access on workers)."""
    from tiger_ray.data.schema import read_sequences
    from tiger_ray.data.split import build_examples
    from tiger_ray.semantic_ids.table import read_semantic_ids
    from tiger_ray.seq2seq.cold_start import exclude_from_training, select_cold_items
    from tiger_ray.seq2seq.data import tokenize_examples
    from tiger_ray.seq2seq.tokenizer import SemanticIdTokenizer
    from tiger_ray.seq2seq.train import validation_set

    sequences = read_sequences(run.require(run.sequences, "tiger prepare"))
    sids = read_semantic_ids(run)
    tokenizer = SemanticIdTokenizer(sids, num_user_buckets=config.num_user_buckets,
                                    use_user_token=config.use_user_token,
                                    max_history=config.max_history)
    examples = build_examples(sequences, "train", config.max_history)
    cold_items = np.zeros(0, dtype=np.int64)
    if config.cold_start_fraction > 0:
        # Paper Sec. 4.3: these items never appear in training, neither as targets nor in
        # histories; the list is saved beside the model for `tiger evaluate --cold-start`.
        cold_items = select_cold_items(sequences, config.cold_start_fraction, config.seed)
        before = len(examples)
        examples = exclude_from_training(examples, cold_items)
        log.info("train-seq2seq: %d cold-start items held out of training (%d of %d examples "
                 "dropped)", len(cold_items), before - len(examples), before)
    train = tokenize_examples(examples, tokenizer)
    valid = validation_set(sequences, config.max_history, config.val_users, config.seed)
    return {
        "cold_items": cold_items,
        "semantic_ids": {"item_ids": sids.item_ids, "codes": sids.codes,
                         "codebook_sizes": list(sids.codebook_sizes)},
        "tokenizer": tokenizer.state(),
        "train": train.to_arrays(),
        "valid": valid.to_arrays(),
    }


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
    """Runs on every Ray Train worker (DDP rank)."""
    import ray
    import ray.train.torch
    import torch

    from tiger_ray import distributed as dist
    from tiger_ray.seq2seq.data import TokenizedExamples
    from tiger_ray.seq2seq.model import TigerSeq2Seq
    from tiger_ray.seq2seq.train import (Seq2SeqTrainer, ValidationSet, model_config,
                                         resolve_precision)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = from_dict(Seq2SeqTrainConfig, loop_config["config"])
    torch.set_num_threads(worker_threads(config))
    payload = loop_config["payload"]
    if isinstance(payload, ray.ObjectRef):
        payload = ray.get(payload)
    tokenizer = tokenizer_from_payload(payload)
    train_data = TokenizedExamples.from_arrays(payload["train"])
    valid = ValidationSet.from_arrays(payload["valid"])

    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts)
    model = TigerSeq2Seq(model_config(config, tokenizer))
    device = dist.torch_device()
    if dist.is_main():
        log.info("seq2seq: %d parameters, %d training examples, %d validation users, "
                 "%d workers x %d threads, device %s, precision %s", model.num_parameters(),
                 len(train_data), len(valid), dist.world_size(), torch.get_num_threads(), device,
                 resolve_precision(config.precision, device))

    def wrap(module):
        # DDP when world_size > 1; gradient_as_bucket_view saves one copy of every gradient.
        return ray.train.torch.prepare_model(
            module, parallel_strategy_kwargs={"gradient_as_bucket_view": True})

    trainer = Seq2SeqTrainer(config, model, tokenizer, train_data, valid, device=device,
                             rank=dist.world_rank(), world_size=dist.world_size(), wrap=wrap,
                             report=dist.report, progress_bar=_progress_bar_factory(loop_config.get("progress_bar", False)))
    trainer.fit(dist.load_checkpoint_state())


def _load_state(checkpoint) -> dict:
    import torch

    from tiger_ray.distributed import STATE_FILE

    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def write_outputs(run: RunDir, config: Seq2SeqTrainConfig, state: dict, tokenizer,
                  wall_seconds: float, cold_items: np.ndarray | None = None) -> dict:
    """best/, history.jsonl, learning_curve.png, train_config.json, summary.json from a final state."""
    from tiger_ray.seq2seq.cold_start import save_cold_items
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
    from tiger_ray.seq2seq.train import model_config

    latest = None if config.fresh else latest_checkpoint_dir(storage_dir, TRIAL_NAME)
    if latest is None:
        return None
    state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=True)
    wanted = dataclasses.asdict(model_config(config, tokenizer))
    if state.get("model_config") != wanted:
        changed = sorted(k for k in wanted if (state.get("model_config") or {}).get(k) != wanted[k])
        raise ValueError(f"{latest}: the run to resume has a different model ({', '.join(changed)}); "
                         f"pass --fresh to start over")
    saved = (state.get("tokenizer") or {}).get("fingerprint")
    if saved != tokenizer.state()["fingerprint"]:
        raise ValueError(f"{latest}: the run to resume was trained on other Semantic IDs or "
                         f"tokenizer settings; pass --fresh to start over")
    return int(state["progress"]["step"])


def run_train_seq2seq(run: RunDir, config: Seq2SeqTrainConfig) -> dict:
    """Train the seq2seq model of ``run`` on Ray Train; returns the summary (also summary.json)."""
    import ray

    from tiger_ray.distributed import TrainerResources, fit
    from tiger_ray.ray_env import ray_session

    start = time.perf_counter()
    payload = prepare_payload(run, config)
    tokenizer = tokenizer_from_payload(payload)
    log.info("train-seq2seq: %d training examples, %d validation users, vocabulary %d, "
             "%d workers%s", len(payload["train"]["targets"]), len(payload["valid"]["targets"]),
             tokenizer.vocab_size, config.workers, " (GPU)" if config.use_gpu else "")
    resume_step = check_resumable(run.seq2seq / RAY_STORAGE, config, tokenizer)
    if resume_step is not None:
        log.info("train-seq2seq: resuming from the checkpoint at step %d (--fresh to start over)",
                 resume_step)
    resources = TrainerResources(workers=config.workers, use_gpu=config.use_gpu,
                                 cpus_per_worker=config.cpus_per_worker)
    with ray_session():
        loop_config = {"config": to_dict(config), "payload": ray.put(payload),
                       "progress_bar": want_progress_bar()}
        result = fit(train_loop_per_worker, loop_config, name=TRIAL_NAME,
                     storage_dir=run.seq2seq / RAY_STORAGE, resources=resources,
                     max_failures=config.max_failures, fresh=config.fresh)
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
