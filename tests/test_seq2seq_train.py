"""Seq2seq training core (no Ray): LR schedule, bucketed batches, sharding, collation, the loop."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from tiger_ray.data.schema import read_sequences
from tiger_ray.data.split import build_examples
from tiger_ray.semantic_ids.table import read_semantic_ids, write_semantic_ids
from tiger_ray.seq2seq.data import (bucketed_batches, collate, padding_fraction, shard_batch,
                                    tokenize_examples)
from tiger_ray.seq2seq.presets import PRESETS, Seq2SeqTrainConfig
from tiger_ray.seq2seq.schedule import (cooldown_steps_within_budget, inverse_sqrt_factor,
                                        inverse_sqrt_schedule, lr_factor)
from tiger_ray.seq2seq.tokenizer import SemanticIdTokenizer
from tiger_ray.seq2seq.train import train_local, validation_set


def write_topic_semantic_ids(run, seed: int = 0, codebook: int = 8):
    """Unique codes whose first position is the item's synthetic topic (so they are learnable)."""
    rng = np.random.default_rng(seed)
    items = read_sequences(run.sequences).flat.max()
    item_ids = np.arange(1, items + 1)
    codes = np.zeros((len(item_ids), 4), dtype=np.int64)
    codes[:, 0] = (item_ids - 1) % 4
    codes[:, 1:3] = rng.integers(0, codebook, size=(len(item_ids), 2))
    _, group = np.unique(codes[:, :3], axis=0, return_inverse=True)
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        codes[rows, 3] = np.arange(len(rows))
    write_semantic_ids(run, item_ids, codes)
    return read_semantic_ids(run)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine thread barriers
    make every op wait for a descheduled sibling (measured: 30x slower steps at load 25)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny(synthetic_run):
    sids = write_topic_semantic_ids(synthetic_run)
    config = Seq2SeqTrainConfig(**PRESETS["tiny"])
    tokenizer = SemanticIdTokenizer(sids, num_user_buckets=config.num_user_buckets,
                                    max_history=config.max_history)
    sequences = read_sequences(synthetic_run.sequences)
    train = tokenize_examples(build_examples(sequences, "train", config.max_history), tokenizer)
    valid = validation_set(sequences, config.max_history, config.val_users, seed=0)
    return config, tokenizer, train, valid, sequences


# ---------------------------------------------------------------- schedule

def test_inverse_sqrt_schedule_ramps_holds_then_decays():
    factors = [inverse_sqrt_factor(s, warmup_steps=10, decay_start=100) for s in range(400)]
    assert factors[0] == pytest.approx(0.1) and factors[4] == pytest.approx(0.5)
    assert all(b > a for a, b in zip(factors[:9], factors[1:10]))  # linear ramp
    assert factors[9:101] == [1.0] * 92  # constant up to decay_start
    assert factors[400 - 1] == pytest.approx(math.sqrt(100 / 399))
    assert factors[399] / factors[199] == pytest.approx(math.sqrt(199 / 399))  # 1/sqrt(step)
    assert inverse_sqrt_factor(5, warmup_steps=0, decay_start=1) == pytest.approx(1 / math.sqrt(5))
    with pytest.raises(ValueError, match="decay_start"):
        inverse_sqrt_factor(0, 0, 0)


def test_schedule_drives_the_optimizer_and_resumes():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=0.01)
    sched = inverse_sqrt_schedule(opt, warmup_steps=4, decay_start=8)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.0025) and lrs[3] == pytest.approx(0.01)
    assert lrs[16] == pytest.approx(0.01 * math.sqrt(8 / 16))
    # A new scheduler loaded from the state continues at the same point.
    opt2 = torch.optim.AdamW([param], lr=0.01)
    sched2 = inverse_sqrt_schedule(opt2, warmup_steps=4, decay_start=8)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr()[0] == pytest.approx(opt.param_groups[0]["lr"])


def test_cooldown_anneals_linearly_to_zero_and_survives_a_resume():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adafactor([param], lr=0.01)
    sched = inverse_sqrt_schedule(opt, warmup_steps=0, decay_start=1000)
    lrs = []
    for step in range(12):
        if step == 6:
            lr_factor(sched).start_cooldown(step, 4)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # constant, then 1, 3/4, 1/2, 1/4 of it, then 0 from the step the anneal ends
    assert lrs == pytest.approx([0.01] * 7 + [0.0075, 0.005, 0.0025, 0.0, 0.0])
    assert lr_factor(sched).cooldown_done(10) and not lr_factor(sched).cooldown_done(9)
    opt2 = torch.optim.Adafactor([param], lr=0.01)
    sched2 = inverse_sqrt_schedule(opt2, warmup_steps=0, decay_start=1000)
    state = sched.state_dict()
    state["last_epoch"] = 8  # as if checkpointed mid-anneal
    sched2.load_state_dict(state)
    assert lr_factor(sched2)(8) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="1 step"):
        lr_factor(sched2).start_cooldown(3, 0)


def test_cooldown_starts_when_its_share_of_the_budget_is_left():
    args = dict(budget=100.0, fraction=0.2, reserve=5.0)
    assert cooldown_steps_within_budget(elapsed=79.0, steps_done=790, **args) == 0
    # 10 steps/s so far, 100 - 80 - 5 = 15 s left: 150 steps
    assert cooldown_steps_within_budget(elapsed=80.0, steps_done=800, **args) == 150
    assert cooldown_steps_within_budget(elapsed=99.0, steps_done=990, **args) == 1  # never 0
    assert cooldown_steps_within_budget(elapsed=90.0, steps_done=900, budget=0.0, fraction=0.2) == 0
    assert cooldown_steps_within_budget(elapsed=90.0, steps_done=900, budget=100.0, fraction=0.0) == 0


# ---------------------------------------------------------------- batches

def test_bucketed_batches_cover_every_example_once_with_little_padding():
    rng = np.random.default_rng(1)
    lengths = 1 + 4 * rng.integers(1, 21, size=5003)  # user token + 4 per item, 1..20 items
    epochs = [bucketed_batches(lengths, 64, seed=3, epoch=e, chunk_batches=32) for e in (0, 1)]
    for batches in epochs:
        flat = np.concatenate(batches)
        np.testing.assert_array_equal(np.sort(flat), np.arange(len(lengths)))
        assert max(len(b) for b in batches) == 64
        assert sum(len(b) < 64 for b in batches) == 1  # only the epoch's last batch is short
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))  # reshuffled
    again = bucketed_batches(lengths, 64, seed=3, epoch=0, chunk_batches=32)
    assert all(np.array_equal(a, b) for a, b in zip(epochs[0], again))  # a function of (seed, epoch)

    class Fake:  # padding_fraction only needs .lengths
        pass
    fake = Fake()
    fake.lengths = lengths
    unsorted = bucketed_batches(lengths, 64, seed=3, epoch=0, chunk_batches=1)  # no bucketing
    assert padding_fraction(fake, epochs[0]) < 0.05 < 0.4 < padding_fraction(fake, unsorted)


def test_collate_pads_only_to_the_batch_maximum_and_matches_the_tokenizer(tiny):
    config, tokenizer, train, _, sequences = tiny
    batches = bucketed_batches(train.lengths, 16, seed=0, epoch=0, chunk_batches=2)
    for index in batches:
        batch = collate(train, index, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id)
        lengths = train.lengths[index]
        assert batch.source.shape == (len(index), lengths.max())
        np.testing.assert_array_equal((~batch.source_pad).sum(1).numpy(), lengths)
        assert (batch.source[batch.source_pad] == tokenizer.pad_id).all()
        assert (batch.target_in[:, 0] == tokenizer.bos_id).all()
        assert torch.equal(batch.target_in[:, 1:], batch.target_out[:, :-1])
    # Row-for-row the same tokens as the tokenizer's own batch encoding of the item histories.
    examples = build_examples(sequences, "train", config.max_history)
    index = np.array([0, 5, 17, len(examples) - 1])
    batch = collate(train, index, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id)
    source, pad = tokenizer.encode_batch([examples.history(i) for i in index], examples.user_ids[index])
    np.testing.assert_array_equal(batch.source.numpy(), source)
    np.testing.assert_array_equal(batch.source_pad.numpy(), pad)
    np.testing.assert_array_equal(batch.target_out.numpy(), tokenizer.item_tokens(examples.targets[index]))


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_are_disjoint_complete_and_in_lockstep(world_size):
    lengths = np.random.default_rng(2).integers(1, 82, size=1001)
    batches = bucketed_batches(lengths, 32, seed=0, epoch=0, min_batch_size=world_size)
    per_rank = [[shard_batch(b, r, world_size) for b in batches] for r in range(world_size)]
    assert len({len(p) for p in per_rank}) == 1  # every rank takes the same number of steps
    for step, batch in enumerate(batches):
        parts = [per_rank[r][step] for r in range(world_size)]
        assert all(len(p) >= 1 for p in parts)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
        joined = np.concatenate(parts)
        assert len(np.unique(joined)) == len(joined)  # disjoint
        np.testing.assert_array_equal(np.sort(joined), np.sort(batch))  # complete
    everything = np.concatenate([np.concatenate(p) for p in per_rank])
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(lengths)))


def test_a_last_batch_smaller_than_the_world_joins_the_previous_one():
    lengths = np.ones(65, dtype=np.int64)  # 2 full batches of 32 + 1 left over
    batches = bucketed_batches(lengths, 32, seed=0, epoch=0, chunk_batches=4, min_batch_size=2)
    assert sorted(map(len, batches)) == [32, 33]
    assert len(bucketed_batches(lengths, 32, seed=0, epoch=0, chunk_batches=4)) == 3


# ---------------------------------------------------------------- the training loop

@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_loss_decreases_and_validation_runs(tiny, optimizer):
    config, tokenizer, train, valid, _ = tiny
    config = dataclasses.replace(config, max_steps=60, eval_every=30, optimizer=optimizer,
                                 lr=0.05 if optimizer == "adafactor" else config.lr)
    trainer, summary = train_local(config, tokenizer, train, valid)
    losses = [r["loss"] for r in trainer.history if r["event"] == "train"]
    assert losses[-1] < 0.75 * losses[0]
    evals = [r for r in trainer.history if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [30, 60]
    assert summary["steps"] == 60 and summary["stop_reason"] == "max_steps"
    assert 0.0 <= summary["best_val_recall@10"] <= 1.0 and summary["best_step"] in (30, 60)
    assert trainer.best_model is not None
    assert 0.0 < evals[-1]["val_coverage@10"] <= 1.0


def test_all_positions_mode_trains_the_item_causal_model_on_windows(tiny):
    """One epoch over all-positions windows trains on exactly the per-example examples, in
    batches of about batch_size of them; validation decodes from histories as before."""
    from tiger_ray.seq2seq.data import TrainingWindows, training_windows

    config, tokenizer, train, valid, sequences = tiny
    config = dataclasses.replace(config, training_mode="all_positions", max_steps=1000,
                                 max_epochs=3, eval_every=1000)
    windows = TrainingWindows.from_arrays(training_windows(
        sequences.user_ids, sequences.offsets, sequences.flat, tokenizer))
    trainer, summary = train_local(config, tokenizer, windows, valid)
    assert trainer.model.config.encoder_attention == "item_causal"
    assert summary["stop_reason"] == "max_epochs" and summary["examples_seen"] == 3 * len(train)
    per_epoch = summary["steps"] / 3  # batches of batch_size examples, not of windows
    assert len(train) / config.batch_size <= per_epoch <= len(train) / config.batch_size + 2
    epochs = [r for r in trainer.history if r["event"] == "epoch"]
    assert epochs[-1]["loss"] < 0.75 * epochs[0]["loss"]
    assert 0.0 <= summary["best_val_recall@10"] <= 1.0
    # A bidirectional model cannot train on windows: earlier targets would see later items.
    with pytest.raises(ValueError, match="item_causal"):
        train_local(dataclasses.replace(config, training_mode="per_example"), tokenizer, windows, valid)


def test_resume_from_a_checkpoint_continues_exactly(tiny):
    config, tokenizer, train, valid, _ = tiny
    config = dataclasses.replace(config, max_steps=40, eval_every=20, dropout=0.1, patience=0)
    reports: list[tuple[dict, dict]] = []
    full, _ = train_local(config, tokenizer, train, valid)

    first, _ = train_local(dataclasses.replace(config, max_steps=20), tokenizer, train, valid,
                           report=lambda metrics, state: reports.append((metrics, state)))
    metrics, state = reports[-1]
    assert metrics["step"] == 20 and state["progress"]["step"] == 20
    # weights_only round trip, as the Ray checkpoint does it
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed, summary = train_local(config, tokenizer, train, valid, state=state)
    assert summary["steps"] == 40
    steps = [r["step"] for r in resumed.history if r["event"] == "train"]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no step trained twice
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert resumed.scheduler.get_last_lr() == pytest.approx(full.scheduler.get_last_lr())


def test_early_stopping_and_time_budget(tiny):
    config, tokenizer, train, valid, _ = tiny
    # lr 0: the model never improves after the first validation, so patience 2 stops at the third.
    stalled = dataclasses.replace(config, lr=0.0, max_steps=1000, eval_every=5, patience=2)
    trainer, summary = train_local(stalled, tokenizer, train, valid)
    assert summary["steps"] == 15 and summary["stop_reason"].startswith("early stopping")
    assert summary["best_step"] == 5
    budget = dataclasses.replace(config, max_steps=10**6, time_budget_minutes=0.02, log_every=1)
    trainer, summary = train_local(budget, tokenizer, train, valid)
    assert summary["stop_reason"] == "time budget" and summary["steps"] < 10**6
    assert trainer.progress.last_eval_step == summary["steps"]  # a final validation on the way out


def test_cooldown_by_steps_and_by_time_budget(tiny):
    config, tokenizer, train, valid, _ = tiny
    by_steps = dataclasses.replace(config, max_steps=40, eval_every=20, log_every=1,
                                   warmup_steps=0, decay_start=1000, cooldown_fraction=0.5)
    trainer, summary = train_local(by_steps, tokenizer, train, valid)
    lr = {r["step"]: r["lr"] for r in trainer.history if r["event"] == "train"}
    assert lr[20] == pytest.approx(config.lr) and lr[30] == pytest.approx(config.lr / 2)
    assert lr[40] == pytest.approx(0.0) and summary["stop_reason"] == "max_steps"
    assert [(r["step"], r["steps"]) for r in trainer.history if r["event"] == "cooldown"] == [(20, 20)]
    # With a time budget the anneal starts when 60% of it is left, sized by the measured speed,
    # and the run ends at lr 0 or at the budget, whichever comes first.
    by_time = dataclasses.replace(config, max_steps=10**6, time_budget_minutes=0.05, log_every=1,
                                  eval_every=10**6, patience=0, warmup_steps=0, decay_start=10**6,
                                  cooldown_fraction=0.6)
    trainer, summary = train_local(by_time, tokenizer, train, valid)
    cooldown = [r for r in trainer.history if r["event"] == "cooldown"]
    assert len(cooldown) == 1 and cooldown[0]["steps"] >= 1
    start = cooldown[0]["step"]
    lrs = [r["lr"] for r in trainer.history if r["event"] == "train" and r["step"] > start]
    assert all(b < a for a, b in zip(lrs, lrs[1:]))  # strictly annealing after the start
    assert summary["stop_reason"] in ("time budget", "cool-down finished (lr 0)")


def test_cold_start_items_never_reach_the_training_examples(synthetic_run):
    """With cold_start_fraction set, held-out items are neither targets nor history tokens."""
    from tiger_ray.seq2seq.cold_start import select_cold_items
    from tiger_ray.seq2seq.ray_train import prepare_payload, tokenizer_from_payload

    write_topic_semantic_ids(synthetic_run)
    config = Seq2SeqTrainConfig(**{**PRESETS["tiny"], "cold_start_fraction": 0.2})
    payload = prepare_payload(synthetic_run, config)
    cold = select_cold_items(read_sequences(synthetic_run.sequences), 0.2, config.seed)
    np.testing.assert_array_equal(payload["cold_items"], cold)
    tokenizer = tokenizer_from_payload(payload)
    train = payload["train"]
    targets = tokenizer.items_from_tokens(np.asarray(train["targets"])[:, :4])
    assert (targets > 0).all() and not np.isin(targets, cold).any()
    history_items = []
    for lo, hi in zip(train["source_offsets"][:-1], train["source_offsets"][1:]):
        source = np.asarray(train["source_flat"][lo:hi])[1:]  # [user token] + 4 tokens per item
        history_items.append(tokenizer.items_from_tokens(source.reshape(-1, 4)))
    history_items = np.concatenate(history_items)
    assert (history_items > 0).all() and not np.isin(history_items, cold).any()
    full = prepare_payload(synthetic_run, dataclasses.replace(config, cold_start_fraction=0.0))
    assert len(full["cold_items"]) == 0
    assert len(train["targets"]) < len(full["train"]["targets"])


def test_compiled_training_matches_eager(tiny):
    """--compile changes the kernels, not the arithmetic: with dropout off, the compiled training
    steps land on the eager ones' weights, across length buckets (dynamic shapes)."""
    config, tokenizer, train, valid, _ = tiny
    config = dataclasses.replace(config, max_steps=12, eval_every=12, dropout=0.0, precision="fp32")
    eager, _ = train_local(config, tokenizer, train, valid)
    compiled, summary = train_local(dataclasses.replace(config, compile=True), tokenizer, train, valid)
    assert summary["steps"] == 12
    assert type(compiled.ddp).__name__ == "OptimizedModule"
    for name, value in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[name], value, rtol=1e-4, atol=1e-5)
