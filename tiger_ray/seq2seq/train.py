"""The seq2seq training loop (plain PyTorch; runs the same on one process or on every DDP rank).

``Seq2SeqTrainer.fit`` walks epochs of length-bucketed batches (``data.py``: in memory, or
streamed from a Ray Data shard under Ray Train), takes optimizer
steps under the inverse-square-root schedule (``schedule.py``; optionally annealed to 0 over the
last part of the run), and every ``eval_every`` steps decodes a fixed subset of validation users
with trie-constrained beam search, keeps the weights with the best Recall@10, checkpoints
everything needed to resume, and stops early after ``patience`` validations without
improvement, at ``max_steps`` / ``max_epochs``, when the cool-down reaches lr 0, or when the
wall-clock budget is about to run out. The test split is never read here.

Distributed runs: every rank executes the same code on its shard of each global batch. Decisions
that end the loop or change the learning rate (time budget, cool-down, early stopping) are taken
from all-reduced numbers, so all ranks act at the same step, which DDP requires. Checkpoints go
through a ``report(metrics, state)`` callback: ``tiger_ray.distributed.report`` under Ray Train,
anything that stores the dict in tests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from tiger_ray.data.schema import Sequences
from tiger_ray.data.split import build_examples
from tiger_ray.evaluation.metrics import CatalogCoverage, MetricCollection
from tiger_ray.seq2seq.data import (InMemoryBatches, StreamedBatches, TokenizedExamples,
                                    TrainingWindows)
from tiger_ray.seq2seq.model import Seq2SeqConfig, TigerSeq2Seq, unwrap
from tiger_ray.seq2seq.presets import Seq2SeqTrainConfig
from tiger_ray.seq2seq.schedule import cooldown_steps_within_budget, inverse_sqrt_schedule, lr_factor
from tiger_ray.seq2seq.tokenizer import PAD, SemanticIdTokenizer

log = logging.getLogger(__name__)

VAL_METRIC = "recall@10"  # drives best-checkpoint selection and early stopping
ReportFn = Callable[[dict, "dict | None"], None]


def model_config(config: Seq2SeqTrainConfig, tokenizer: SemanticIdTokenizer) -> Seq2SeqConfig:
    return Seq2SeqConfig(
        vocab_size=tokenizer.vocab_size, d_model=config.d_model, num_heads=config.num_heads,
        head_dim=config.head_dim, encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers, mlp_dim=config.mlp_dim, dropout=config.dropout,
        dropout_masks=config.dropout_masks,
        encoder_attention=("item_causal" if config.training_mode == "all_positions"
                           else "bidirectional"),
        max_source_len=tokenizer.max_source_len, max_target_len=tokenizer.tokens_per_item + 1)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where bfloat16 matmuls are native (measured faster than fp32:
    docs/RESULTS.md#model-size-at-a-fixed-cpu-budget), else 'fp32' (emulated bf16 is slower)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if native else "fp32"


def make_optimizer(model: torch.nn.Module, config: Seq2SeqTrainConfig) -> torch.optim.Optimizer:
    """AdamW or Adafactor; matrices and embeddings decay, norm gains do not.

    Adafactor is the paper's optimizer (T5X): its step is relative to each parameter's scale and
    capped by 1/sqrt(step), so lr 0.01 there is a far smaller update than lr 0.01 in AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=config.lr, foreach=True)
    # The fused kernel (one op for all parameters) exists for CPU and CUDA in recent PyTorch.
    try:
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), foreach=True)


def compile_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile for training steps. Source lengths change from batch to batch (length
    buckets), so shapes are compiled dynamic from the start: a graph or two, not one per length."""
    return torch.compile(model, dynamic=True)


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, batch, *,
                  precision: str = "fp32", grad_clip: float = 0.0, clip_parameters=None) -> float:
    """Forward (teacher forcing), token cross-entropy, backward, clip, AdamW step, LR step.

    ``model`` is whatever is trained (the DDP wrapper under Ray), called as
    ``model(*batch.inputs()) -> logits [B, T, V]`` ([B, K, T, V] for all-positions windows); the
    loss is computed here, not by the model, so DDP sees a plain forward call. Returns the loss
    as a float.
    """
    model.train()
    with torch.autocast(batch.source.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(*batch.inputs())
    loss = F.cross_entropy(logits.flatten(0, -2).float(), batch.target_out.flatten(), ignore_index=PAD)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(
            list(clip_parameters if clip_parameters is not None else model.parameters()), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())


# ---------------------------------------------------------------- validation users

@dataclass(frozen=True)
class ValidationSet:
    """Leave-one-out validation examples of a fixed sample of users (histories flat + offsets)."""

    user_ids: np.ndarray  # [U]
    offsets: np.ndarray  # [U+1]
    flat: np.ndarray  # item ids
    targets: np.ndarray  # [U]

    def __len__(self) -> int:
        return len(self.targets)

    def history(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return asdict(self)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "ValidationSet":
        return cls(**{k: arrays[k] for k in ("user_ids", "offsets", "flat", "targets")})


def validation_set(sequences: Sequences, max_history: int, num_users: int = 0,
                   seed: int = 0) -> ValidationSet:
    """The 'valid' split of ``num_users`` users drawn once with ``seed`` (0 = all users).

    The sample is fixed for the whole run so successive validations are comparable; it is sorted
    by history length so decoding batches carry little padding.
    """
    ex = build_examples(sequences, "valid", max_history=max_history)
    index = np.arange(len(ex))
    if 0 < num_users < len(ex):
        index = np.sort(np.random.default_rng([seed, 7]).choice(len(ex), num_users, replace=False))
    lengths = (ex.offsets[1:] - ex.offsets[:-1])[index]
    index = index[np.argsort(lengths, kind="stable")]
    hist = [ex.history(i) for i in index]
    offsets = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum([len(h) for h in hist], out=offsets[1:])
    return ValidationSet(user_ids=ex.user_ids[index], offsets=offsets,
                         flat=np.concatenate(hist) if hist else np.zeros(0, np.int64),
                         targets=ex.targets[index])


def sample_validation_set(path, max_history: int, num_users: int = 0, seed: int = 0,
                          batch_rows: int = 65_536) -> ValidationSet:
    """``validation_set`` of sequences.parquet at ``path`` (a file or a directory of parts)
    without loading every user: the sample's rows are drawn from the row count (Parquet
    footers) exactly as ``validation_set`` draws them, then picked out of streamed batches, so
    only the sampled users are held (all of them when ``num_users`` is 0)."""
    from tiger_ray.data.schema import count_rows, iter_batches

    total = count_rows(path)
    chosen = np.arange(total)
    if 0 < num_users < total:
        chosen = np.sort(np.random.default_rng([seed, 7]).choice(total, num_users, replace=False))
    user_ids, offsets, flat, seen = [], [np.zeros(1, np.int64)], [], 0
    for batch in iter_batches(path, ["user_id", "item_ids"], batch_rows):
        lo, hi = np.searchsorted(chosen, [seen, seen + batch.num_rows])
        seen += batch.num_rows
        if lo == hi:
            continue
        rows = batch.take(pa.array(chosen[lo:hi] - (seen - batch.num_rows)))
        items = rows.column("item_ids")
        lengths = pc.list_value_length(items).to_numpy().astype(np.int64)
        user_ids.append(rows.column("user_id").to_numpy().astype(np.int64))
        offsets.append(offsets[-1][-1] + np.cumsum(lengths))
        flat.append(pc.list_flatten(items).to_numpy().astype(np.int64))
    sample = Sequences(user_ids=np.concatenate(user_ids) if user_ids else np.zeros(0, np.int64),
                       offsets=np.concatenate(offsets),
                       flat=np.concatenate(flat) if flat else np.zeros(0, np.int64))
    return validation_set(sample, max_history, 0, seed)


# ---------------------------------------------------------------- the trainer

@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # global batches of the current epoch already trained on
    examples_seen: int = 0
    train_seconds: float = 0.0  # time in training steps (validation excluded)
    best_metric: float = -1.0  # below any recall, so the first validation is "best"
    best_step: int = -1
    evals_since_best: int = 0
    last_eval_step: int = -1
    stop_reason: str = ""


@dataclass
class _Window:
    """Running sums between two log lines."""

    loss_sum: float = 0.0
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0


class Seq2SeqTrainer:
    def __init__(self, config: Seq2SeqTrainConfig, model: TigerSeq2Seq,
                 tokenizer: SemanticIdTokenizer,
                 train_data: TokenizedExamples | TrainingWindows | InMemoryBatches | StreamedBatches,
                 valid: ValidationSet, *, device: torch.device | None = None, rank: int = 0,
                 world_size: int = 1, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 report: ReportFn | None = None, progress_bar: Callable | None = None):
        if isinstance(train_data, (TokenizedExamples, TrainingWindows)):
            train_data = InMemoryBatches(train_data, config.batch_size, seed=config.seed,
                                         chunk_batches=config.bucket_chunk_batches, rank=rank,
                                         world_size=world_size, pad_id=tokenizer.pad_id,
                                         bos_id=tokenizer.bos_id)
        self.config = config
        self.device = device or torch.device("cpu")
        self.precision = resolve_precision(config.precision, self.device)
        self.model = unwrap(model).to(self.device)  # plain module: validation, state dicts
        self.ddp = wrap(self.model) if wrap else self.model  # what training steps call
        if config.compile:  # compiles on the first steps; validation decodes with the eager model
            self.ddp = compile_for_training(self.ddp)
        self.tokenizer = tokenizer
        self.batches = train_data
        self.valid = valid
        self.rank, self.world_size = rank, world_size
        self.report = report or (lambda metrics, state: None)
        self.progress_bar = progress_bar
        self.optimizer = make_optimizer(self.model, config)
        self.scheduler = inverse_sqrt_schedule(self.optimizer, config.warmup_steps, config.decay_start)
        if config.cooldown_fraction > 0:  # scheduled by steps; a time budget may start it sooner
            n = max(1, round(config.cooldown_fraction * config.max_steps))
            lr_factor(self.scheduler).start_cooldown(config.max_steps - n, n)
        self.progress = Progress()
        self.history: list[dict] = []
        self.best_model: dict[str, torch.Tensor] | None = None
        self.last_metrics: dict[str, float] = {}
        self._last_eval_seconds = 0.0
        self._fit_start_step = 0  # step when this process's fit() began (its speed, for budgets)
        self._reported: tuple | None = None
        self.bar = None
        self._retriever = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- collectives (no-ops on one process) -----------------------------------------------------
    @property
    def _distributed(self) -> bool:
        return self.world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized()

    def _all_sum(self, values: list[float]) -> list[float]:
        if not self._distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return t.tolist()

    def _rng_state(self) -> torch.Tensor:
        """This rank's dropout RNG: the CPU generator, plus the GPU's when training on one."""
        parts = [torch.get_rng_state()]
        if self.device.type == "cuda":
            parts.append(torch.cuda.get_rng_state(self.device))
        return torch.cat(parts)

    def _set_rng_state(self, state: torch.Tensor) -> None:
        # clone(): set_rng_state reads the storage from its start and segfaults on a row view
        # with a storage offset (PyTorch 2.13).
        state = state.to(torch.uint8).clone()
        n_cpu = torch.get_rng_state().numel()
        torch.set_rng_state(state[:n_cpu].clone())
        if self.device.type == "cuda" and state.numel() > n_cpu:
            torch.cuda.set_rng_state(state[n_cpu:].clone(), self.device)

    def _gather_rng(self) -> torch.Tensor:
        """[world_size, n] every rank's RNG state (dropout), so a resume continues it exactly."""
        mine = self._rng_state()
        if not self._distributed:
            return mine[None]
        parts = [torch.empty_like(mine, device=self.device) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, mine.to(self.device))
        return torch.stack([p.cpu() for p in parts])

    # ---- checkpoint state ------------------------------------------------------------------------
    def state_dict(self, rng: torch.Tensor) -> dict:
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "progress": asdict(self.progress),
            "history": list(self.history),
            "best_model": self.best_model,
            "rng": rng,
            "world_size": self.world_size,
            # what the weights fit: a resume with another model shape or other Semantic IDs fails
            "model_config": asdict(self.model.config),
            "tokenizer": self.tokenizer.state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = Progress(**state["progress"])
        self.history = list(state["history"])
        self.best_model = state.get("best_model")
        rng = state.get("rng")
        if rng is not None and state.get("world_size") == self.world_size:
            self._set_rng_state(rng[self.rank])
        else:  # a different worker count: fresh but deterministic dropout streams
            torch.manual_seed(self.config.seed * 1_000_003 + self.rank * 7919 + self.progress.step)

    # ---- one step ----------------------------------------------------------------------------------
    def train_step(self, batch) -> float:
        return training_step(self.ddp, self.optimizer, self.scheduler, batch.to(self.device),
                             precision=self.precision, grad_clip=self.config.grad_clip,
                             clip_parameters=self.model.parameters())

    # ---- validation --------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Recall/NDCG@5/10 (beam search) and the teacher-forced loss on the validation users.

        Each rank decodes its share of the users; sums are all-reduced. The loss is a far less
        noisy signal than Recall@10 on a few thousand users (a handful of hits), so it is logged
        and plotted too; the best checkpoint is still chosen by Recall@10, the paper's metric.
        """
        from tiger_ray.seq2seq.retriever import TigerRetriever

        self.model.eval()
        if self._retriever is None:  # shares the live model's weights; the trie is built once
            self._retriever = TigerRetriever(self.model, self.tokenizer,
                                             beam_size=self.config.val_beam_size,
                                             device=self.device, chunk_size=self.config.val_batch_size)
        metrics = MetricCollection.default((5, 10))
        coverage = CatalogCoverage(10, int(self.tokenizer.semantic_ids.item_ids.max()))
        mine = np.arange(self.rank, len(self.valid), self.world_size)
        bs = self.config.val_batch_size
        loss_sum = 0.0
        for lo in range(0, len(mine), bs):
            rows = mine[lo:lo + bs]
            recs = self._retriever.recommend([self.valid.history(i) for i in rows],
                                             self.valid.user_ids[rows], 10)
            metrics.update(recs.item_ids, self.valid.targets[rows])
            coverage.update(recs.item_ids)
            loss_sum += self._loss_sum(rows)
        self.model.train()
        # Coverage: an item counts if any rank recommended it (a sum of 0/1 flags > 0).
        seen = self._all_sum(coverage.seen.astype(np.float64).tolist())
        coverage.seen = np.asarray(seen) > 0
        totals = self._all_sum([m.total for m in metrics.metrics] + [loss_sum, metrics.count])
        count = totals[-1]
        result = {f"val_{m.key}": (t / count if count else 0.0) for m, t in zip(metrics.metrics, totals)}
        result["val_loss"] = totals[-2] / (count * self.tokenizer.tokens_per_item) if count else 0.0
        result[f"val_{coverage.key}"] = coverage.compute()
        return result

    def _loss_sum(self, rows: np.ndarray) -> float:
        """Summed token cross-entropy of the validation targets under teacher forcing."""
        source, pad = self.tokenizer.encode_batch([self.valid.history(i) for i in rows],
                                                  self.valid.user_ids[rows])
        target_out = torch.from_numpy(self.tokenizer.item_tokens(self.valid.targets[rows]))
        target_in = torch.cat([torch.full_like(target_out[:, :1], self.tokenizer.bos_id),
                               target_out[:, :-1]], dim=1)
        logits = self.model(torch.from_numpy(source).to(self.device),
                            torch.from_numpy(pad).to(self.device), target_in.to(self.device))
        return float(F.cross_entropy(logits.flatten(0, 1).float(), target_out.to(self.device).flatten(),
                                     reduction="sum"))

    def _validate(self) -> None:
        """Validate, update the best weights and the early-stopping count, record history."""
        start = time.perf_counter()
        metrics = self.validate()
        p = self.progress
        value = metrics[f"val_{VAL_METRIC}"]
        improved = value > p.best_metric
        if improved:
            p.best_metric, p.best_step, p.evals_since_best = value, p.step, 0
            self.best_model = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        else:
            p.evals_since_best += 1
        p.last_eval_step = p.step
        self.last_metrics = metrics
        self.history.append({"event": "eval", "step": p.step, "epoch": p.epoch, **metrics,
                             "best_step": p.best_step, "seconds": time.perf_counter() - start})
        if self.is_main:
            log.info("validation @ step %d: R@10 %.4f N@10 %.4f R@5 %.4f loss %.4f "
                     "coverage@10 %.3f (best R@10 %.4f @ step %d)%s",
                     p.step, metrics["val_recall@10"], metrics["val_ndcg@10"],
                     metrics["val_recall@5"], metrics["val_loss"], metrics["val_coverage@10"],
                     p.best_metric, p.best_step,
                     "" if improved else f", {p.evals_since_best} without improvement")
        self._last_eval_seconds = time.perf_counter() - start

    def _checkpoint(self) -> None:
        """Report metrics from every rank; rank 0 attaches the full state as a checkpoint."""
        start = time.perf_counter()
        p = self.progress
        rng = self._gather_rng()  # a collective: every rank, before rank 0 builds the state
        state = self.state_dict(rng) if self.is_main else None
        self.report({"step": p.step, "epoch": p.epoch, **self.last_metrics,
                     "best_" + VAL_METRIC: p.best_metric, "best_step": p.best_step,
                     "stop_reason": p.stop_reason}, state)
        self._reported = (p.step, p.epoch, p.stop_reason)
        self._last_eval_seconds += time.perf_counter() - start

    # ---- the loop ----------------------------------------------------------------------------------
    def _out_of_time(self, started: float) -> bool:
        budget = self.config.time_budget_minutes * 60.0
        if budget <= 0:
            return False
        return time.perf_counter() - started + self._final_eval_reserve() >= budget

    def _final_eval_reserve(self) -> float:
        """Seconds a budgeted run keeps for its final validation + checkpoint, measured on the
        previous one; the cool-down's length is sized to end before it too."""
        return 1.2 * self._last_eval_seconds

    def _cooldown_vote(self, started: float) -> float:
        """Rank 0's answer to "start the cool-down now, for how many steps?" (0 = not yet)."""
        cfg, p, factor = self.config, self.progress, lr_factor(self.scheduler)
        if not self.is_main or cfg.cooldown_fraction <= 0 or factor.cooling(p.step):
            return 0.0
        return float(cooldown_steps_within_budget(
            elapsed=time.perf_counter() - started, budget=cfg.time_budget_minutes * 60.0,
            fraction=cfg.cooldown_fraction, steps_done=p.step - self._fit_start_step,
            reserve=self._final_eval_reserve()))

    def _log_window(self, window: _Window, started: float) -> bool:
        """All-reduce the window's sums, record a history point; returns the time-budget vote.
        The same all-reduce carries rank 0's cool-down decision, so every rank starts it at the
        same step with the same length (their learning rates must stay identical)."""
        stop_vote = 1.0 if (self.is_main and self._out_of_time(started)) else 0.0
        loss_sum, steps, examples, stop, cooldown = self._all_sum(
            [window.loss_sum, window.steps, window.examples, stop_vote, self._cooldown_vote(started)])
        p = self.progress
        factor = lr_factor(self.scheduler)
        if cooldown > 0:
            factor.start_cooldown(p.step, int(cooldown))
            if self.is_main:
                log.info("time budget: annealing lr to 0 over the next %d steps", int(cooldown))
        if factor.cooling(p.step) and not factor.cooling(p.step - window.steps):
            # the cool-down began in this window (started by the budget just now, or scheduled
            # by steps at start-up): one history event, wherever it came from
            self.history.append({"event": "cooldown", "step": factor.cooldown_start,
                                 "epoch": p.epoch, "steps": factor.cooldown_steps})
        loss = loss_sum / max(steps, 1)
        rate = examples / window.seconds if window.seconds > 0 else 0.0
        lr = self.scheduler.get_last_lr()[0]
        self.history.append({"event": "train", "step": p.step, "epoch": p.epoch, "loss": loss,
                             "lr": lr, "examples_per_second": rate})
        if self.bar is not None:
            self.bar.set_description(f"train-seq2seq epoch {p.epoch} loss {loss:.3f}")
        if self.is_main:
            # With a progress bar these lines would only interleave with it; without one (logs
            # redirected to a file) they are the progress report.
            log.log(logging.DEBUG if self.bar is not None else logging.INFO,
                    "step %d | epoch %d | loss %.4f | lr %.2e | %.0f examples/s",
                    p.step, p.epoch, loss, lr, rate)
        return stop > 0

    def fit(self, state: dict | None = None) -> dict:
        """Train until a stopping rule fires; ``state`` resumes a checkpoint. Returns a summary."""
        cfg = self.config
        if state is not None:
            self.load_state_dict(state)
            if self.is_main:
                p = self.progress
                log.info("resuming at step %d (epoch %d, batch %d)", p.step, p.epoch, p.batch_in_epoch)
        else:
            torch.manual_seed(cfg.seed * 1_000_003 + self.rank * 7919)
        p = self.progress
        p.stop_reason = ""  # a finished run resumed with larger limits carries on
        started = time.perf_counter()
        self._fit_start_step = p.step
        total = min(cfg.max_steps, cfg.max_epochs * self.batches.batches_per_epoch())
        if self.progress_bar is not None and self.is_main:
            self.bar = self.progress_bar(total=total, initial=p.step)
        stop = self._stop_reason()
        window = _Window()
        while not stop:
            batches = self.batches.epoch(p.epoch, skip=p.batch_in_epoch)
            epoch_window = _Window()
            while True:
                t0 = time.perf_counter()  # the step's time includes waiting for its batch
                item = next(batches, None)
                if item is None:
                    break
                batch, global_examples = item
                loss = self.train_step(batch)
                dt = time.perf_counter() - t0
                p.step += 1
                p.batch_in_epoch += 1
                p.examples_seen += global_examples
                p.train_seconds += dt
                for w in (window, epoch_window):
                    w.loss_sum += loss
                    w.steps += 1
                    w.examples += batch.examples
                    w.seconds += dt
                if self.bar is not None:
                    self.bar.update(1)
                due = p.step % cfg.eval_every == 0
                if p.step % cfg.log_every == 0 or due:
                    stop = "time budget" if self._log_window(window, started) else ""
                    window = _Window()
                stop = stop or self._stop_reason()
                if due or stop:
                    # Validate first: early stopping depends on this result.
                    self._validate()
                    stop = stop or self._stop_reason()
                    p.stop_reason = stop
                    self._checkpoint()
                if stop:
                    break
            if not stop:  # the epoch ran to its end
                self._log_epoch(epoch_window)
                p.epoch += 1
                p.batch_in_epoch = 0
                stop = self._stop_reason()
        p.stop_reason = stop
        if p.last_eval_step != p.step:
            self._validate()
        if self._reported != (p.step, p.epoch, p.stop_reason):
            self._checkpoint()  # the final state, with its stop reason
        if self.bar is not None:
            self.bar.close()
        if self.is_main:
            log.info("stopped at step %d (epoch %d): %s; best val Recall@10 %.4f at step %d",
                     p.step, p.epoch, stop, p.best_metric, p.best_step)
        return self.summary()

    def _stop_reason(self) -> str:
        cfg, p = self.config, self.progress
        if p.step >= cfg.max_steps:
            return "max_steps"
        if p.epoch >= cfg.max_epochs:
            return "max_epochs"
        if lr_factor(self.scheduler).cooldown_done(p.step):
            return "cool-down finished (lr 0)"
        if cfg.patience > 0 and p.evals_since_best >= cfg.patience:
            return f"early stopping (no better val {VAL_METRIC} in {cfg.patience} validations)"
        return ""

    def _log_epoch(self, window: _Window) -> None:
        loss_sum, steps, examples, seconds = self._all_sum(
            [window.loss_sum, window.steps, window.examples, window.seconds])
        p = self.progress
        # Ranks run in lockstep, so the mean of their step times is the epoch's wall time.
        seconds /= self.world_size if self._distributed else 1
        record = {"event": "epoch", "step": p.step, "epoch": p.epoch,
                  "loss": loss_sum / max(steps, 1), "lr": self.scheduler.get_last_lr()[0],
                  "examples_per_second": examples / seconds if seconds > 0 else 0.0}
        self.history.append(record)
        if self.is_main:
            val = self.last_metrics
            val_text = (f" | val R@10 {val['val_recall@10']:.4f} N@10 {val['val_ndcg@10']:.4f}"
                        if val else "")
            log.info("epoch %d | step %d | loss %.4f | lr %.2e | %.0f examples/s%s",
                     p.epoch, p.step, record["loss"], record["lr"], record["examples_per_second"],
                     val_text)

    def summary(self) -> dict:
        p = self.progress
        return {"steps": p.step, "epochs_completed": p.epoch, "examples_seen": p.examples_seen,
                "train_seconds": p.train_seconds,
                "examples_per_second": p.examples_seen / p.train_seconds if p.train_seconds else 0.0,
                "best_step": p.best_step, "best_val_" + VAL_METRIC: p.best_metric,
                "stop_reason": p.stop_reason, "last_validation": dict(self.last_metrics)}


def train_local(config: Seq2SeqTrainConfig, tokenizer: SemanticIdTokenizer,
                train_data: TokenizedExamples | TrainingWindows, valid: ValidationSet,
                state: dict | None = None, report: ReportFn | None = None,
                ) -> tuple[Seq2SeqTrainer, dict]:
    """One-process training without Ray (tests, notebooks): returns (trainer, summary)."""
    torch.manual_seed(config.seed)
    model = TigerSeq2Seq(model_config(config, tokenizer))
    trainer = Seq2SeqTrainer(config, model, tokenizer, train_data, valid, report=report)
    return trainer, trainer.fit(state)

