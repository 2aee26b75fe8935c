"""Training examples streamed by Ray Data: the same examples and tokens as build_examples +
tokenize_examples, length-bucketed batches from a shard, a streamed validation sample."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tiger_ray.data.schema import read_sequences
from tiger_ray.data.split import build_examples
from tiger_ray.seq2seq.cold_start import exclude_from_training, select_cold_items
from tiger_ray.seq2seq.data import (ExampleBuilder, InMemoryBatches, StreamedBatches,
                                    TokenizedExamples, TrainingWindows, examples_from_columns,
                                    tokenize_examples, training_examples, training_windows,
                                    user_slices)
from tiger_ray.seq2seq.presets import PRESETS, Seq2SeqTrainConfig
from tiger_ray.seq2seq.tokenizer import PAD, SemanticIdTokenizer
from tiger_ray.seq2seq.train import sample_validation_set, validation_set
from test_seq2seq_train import write_topic_semantic_ids


def reference(sequences, tokenizer, cold=None) -> TokenizedExamples:
    examples = build_examples(sequences, "train", tokenizer.max_history)
    if cold is not None:
        examples = exclude_from_training(examples, cold)
    return tokenize_examples(examples, tokenizer)


def assert_same_examples(got: TokenizedExamples, want: TokenizedExamples) -> None:
    for name in ("source_flat", "source_offsets", "targets", "user_ids"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


@pytest.mark.parametrize("max_history", [3, 20])
@pytest.mark.parametrize("cold_fraction", [0.0, 0.3])
@pytest.mark.parametrize("use_user_token", [True, False])
def test_training_examples_equal_build_examples_then_tokenize(synthetic_run, max_history,
                                                              cold_fraction, use_user_token):
    sids = write_topic_semantic_ids(synthetic_run)
    tokenizer = SemanticIdTokenizer(sids, num_user_buckets=16, use_user_token=use_user_token,
                                    max_history=max_history)
    sequences = read_sequences(synthetic_run.sequences)
    cold = select_cold_items(sequences, cold_fraction, 0) if cold_fraction else None
    want = reference(sequences, tokenizer, cold)
    columns = training_examples(sequences.user_ids, sequences.offsets, sequences.flat, tokenizer, cold)
    assert columns["source"].shape == (len(want), tokenizer.max_source_len)
    assert columns["source"].dtype == np.int32 and columns["targets"].dtype == np.int32
    assert_same_examples(examples_from_columns(columns), want)
    # Fixed width: the padding of every row is PAD.
    cols = np.arange(tokenizer.max_source_len)[None, :]
    assert (columns["source"][cols >= columns["source_len"][:, None]] == PAD).all()
    if cold is not None:
        assert len(want) < len(build_examples(sequences, "train"))


def window_pairs(columns, tokenizer) -> list[tuple[int, tuple, int]]:
    """(user, history items, target item) of every filled slot of all-positions windows, read
    back from the tokens: the history is the ``visible`` source prefix the slot's decoder reads."""
    lead = int(tokenizer.use_user_token)
    pairs = []
    for w, user in enumerate(columns["user_id"]):
        source = columns["source"][w]
        if lead:
            assert source[0] == tokenizer.user_token(np.array([user]))[0]
        for j in np.flatnonzero(columns["visible"][w]):
            history = tokenizer.items_from_tokens(source[lead:columns["visible"][w, j]].reshape(-1, 4))
            target = tokenizer.items_from_tokens(columns["targets"][w, j])
            pairs.append((int(user), tuple(history.tolist()), int(target)))
    return pairs


@pytest.mark.parametrize("max_history", [3, 20])
@pytest.mark.parametrize("cold_fraction", [0.0, 0.3])
@pytest.mark.parametrize("use_user_token", [True, False])
def test_windows_hold_exactly_the_per_example_examples(synthetic_run, max_history, cold_fraction,
                                                       use_user_token):
    """All-positions training sees every (history, target) pair of per-example training, with the
    same max_history window and cold-start exclusions, once and in the same order; a window's
    source is its last example's history, so earlier examples read a prefix of it."""
    sids = write_topic_semantic_ids(synthetic_run)
    tokenizer = SemanticIdTokenizer(sids, num_user_buckets=16, use_user_token=use_user_token,
                                    max_history=max_history)
    sequences = read_sequences(synthetic_run.sequences)
    cold = select_cold_items(sequences, cold_fraction, 0) if cold_fraction else None
    examples = build_examples(sequences, "train", max_history)
    if cold is not None:
        examples = exclude_from_training(examples, cold)
    want = [(int(examples.user_ids[i]), tuple(examples.history(i).tolist()), int(examples.targets[i]))
            for i in range(len(examples))]
    windows = training_windows(sequences.user_ids, sequences.offsets, sequences.flat, tokenizer, cold)
    assert window_pairs(windows, tokenizer) == want
    sizes = (windows["visible"] > 0).sum(1)
    assert windows["targets"].shape == (len(sizes), max_history, 4) and sizes.min() >= 1
    assert (windows["targets"][windows["visible"] == 0] == PAD).all()
    lead = int(use_user_token)
    last = windows["visible"][np.arange(len(sizes)), sizes - 1]
    np.testing.assert_array_equal(last, windows["source_len"])  # the last example reads it all
    if max_history == 20:  # synthetic users have 5-12 items: one window each
        assert len(sizes) == len(np.unique(windows["user_id"])) < 0.3 * len(want)
    else:  # a user's first 3 targets share a window, every later one has its own
        assert sizes.max() == 3 and (windows["source_len"] <= lead + 4 * 3).all()
        assert len(sizes) > len(np.unique(windows["user_id"]))


def test_window_batches_cover_every_example_once_in_about_batch_size_examples(synthetic_run):
    sids = write_topic_semantic_ids(synthetic_run)
    tokenizer = SemanticIdTokenizer(sids, num_user_buckets=16, max_history=4)
    s = read_sequences(synthetic_run.sequences)
    windows = TrainingWindows.from_arrays(training_windows(s.user_ids, s.offsets, s.flat, tokenizer))
    examples = tokenize_examples(build_examples(s, "train", 4), tokenizer)

    def token_pairs(batches):
        pairs = []
        for b in batches:
            source, target = b.source.numpy(), b.target_out.numpy()
            if b.visible is None:
                lengths = (~b.source_pad).sum(1).numpy()
                pairs += [(tuple(source[r, :lengths[r]]), tuple(target[r])) for r in range(len(b))]
                continue
            for r, k in zip(*np.nonzero(target[..., 0] != PAD)):
                pairs.append((tuple(source[r, :b.visible[r, k]]), tuple(target[r, k])))
        return sorted(pairs)

    args = dict(seed=0, chunk_batches=2, world_size=2, pad_id=PAD, bos_id=tokenizer.bos_id)
    for rank in (0, 1):  # each rank's share of every global batch
        ours = InMemoryBatches(windows, 24, rank=rank, **args)
        theirs = InMemoryBatches(examples, 24, rank=rank, **args)
        got = list(ours.epoch(0))
        assert all(b.visible is not None and b.target_in.shape == b.target_out.shape for b, _ in got)
        global_examples = np.sort([n for _, n in got])  # 24, give or take a window (4 examples)
        assert global_examples[1:].min() > 24 - 4 and global_examples.max() < 24 + 12 + 4
        assert global_examples.sum() == len(examples)
        if rank == 0:
            mine = token_pairs(b for b, _ in got)
        else:  # both ranks together: every example once, as per-example batches hold them
            assert sorted(mine + token_pairs(b for b, _ in got)) == sorted(
                token_pairs(b for b, _ in InMemoryBatches(examples, 24, rank=0, **args).epoch(0))
                + token_pairs(b for b, _ in theirs.epoch(0)))


def test_example_builder_on_arrow_batches_matches_the_whole_table(synthetic_run):
    """Any cut of the users into batches gives the same rows in order."""
    sids = write_topic_semantic_ids(synthetic_run)
    tokenizer = SemanticIdTokenizer(sids, num_user_buckets=16, max_history=5)
    sequences = read_sequences(synthetic_run.sequences)
    builder = ExampleBuilder(lambda: tokenizer, cold_items=np.array([3, 7]))
    table = pq.read_table(synthetic_run.sequences)
    parts = [builder.examples(table.slice(lo, 17)) for lo in range(0, table.num_rows, 17)]
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert_same_examples(examples_from_columns(merged), reference(sequences, tokenizer, np.array([3, 7])))
    builder = ExampleBuilder(lambda: tokenizer, cold_items=np.array([3, 7]), windows=True)
    parts = [builder.examples(table.slice(lo, 17)) for lo in range(0, table.num_rows, 17)]
    want = training_windows(sequences.user_ids, sequences.offsets, sequences.flat, tokenizer,
                            np.array([3, 7]))
    for k, column in want.items():
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), column, err_msg=k)


def test_too_short_users_are_an_error(synthetic_run):
    sids = write_topic_semantic_ids(synthetic_run)
    tokenizer = SemanticIdTokenizer(sids, num_user_buckets=16, max_history=5)
    with pytest.raises(ValueError, match="user_id 9"):
        training_examples(np.array([8, 9]), np.array([0, 3, 5]), np.array([1, 2, 3, 4, 5]), tokenizer)


class FakeShard:
    """What get_dataset_shard returns, as far as StreamedBatches uses it."""

    def __init__(self, columns):
        self.columns = columns

    def iter_batches(self, *, batch_size, **_):
        n = len(self.columns["source_len"])
        for lo in range(0, n, batch_size):
            yield {k: v[lo:lo + batch_size] for k, v in self.columns.items()}


@pytest.fixture
def columns(synthetic_run):
    sids = write_topic_semantic_ids(synthetic_run)
    tokenizer = SemanticIdTokenizer(sids, num_user_buckets=16, max_history=8)
    s = read_sequences(synthetic_run.sequences)
    return training_examples(s.user_ids, s.offsets, s.flat, tokenizer), tokenizer


def test_streamed_batches_cover_the_shard_once_bucketed_and_padded_to_the_batch(columns):
    cols, tok = columns
    n = len(cols["source_len"])
    stream = StreamedBatches(FakeShard(cols), 16, chunk_batches=4, seed=0, rank=0,
                             pad_id=tok.pad_id, bos_id=tok.bos_id, examples=n)
    assert stream.batches_per_epoch() == -(-n // 16)
    batches = [b for b, _ in stream.epoch(0)]
    width = cols["source"].shape[1]
    spread = []
    for b in batches:
        lengths = (~b.source_pad).sum(1).numpy()
        assert b.source.shape[1] == lengths.max()  # padded to this batch's longest only
        spread.append(lengths.max() - lengths.min())
        np.testing.assert_array_equal(b.target_in[:, 0].numpy(), tok.bos_id)
        np.testing.assert_array_equal(b.target_in[:, 1:].numpy(), b.target_out[:, :-1].numpy())
    # Every row exactly once: the batches' rows, padded back to full width, are the shard's rows.
    rows = np.concatenate([np.c_[np.pad(b.source.numpy(), ((0, 0), (0, width - b.source.shape[1]))),
                                 b.target_out.numpy()] for b in batches])
    want = np.c_[cols["source"], cols["targets"]].astype(np.int64)
    np.testing.assert_array_equal(rows[np.lexsort(rows.T)], want[np.lexsort(want.T)])
    # Bucketing: lengths inside a batch are far closer than in an unsorted batch.
    unsorted = [np.ptp(cols["source_len"][lo:lo + 16]) for lo in range(0, n, 16)]
    assert np.mean(spread) < 0.5 * np.mean(unsorted)
    # Skipping (a resume mid-epoch) drops that many batches from the front.
    assert len(list(stream.epoch(1, skip=3))) == len(batches) - 3


def test_streamed_windows_come_in_batches_of_about_batch_size_examples(synthetic_run):
    sids = write_topic_semantic_ids(synthetic_run)
    tok = SemanticIdTokenizer(sids, num_user_buckets=16, max_history=8)
    s = read_sequences(synthetic_run.sequences)
    cols = training_windows(s.user_ids, s.offsets, s.flat, tok)
    stream = StreamedBatches(FakeShard(cols), 16, chunk_batches=2, seed=0, rank=0, pad_id=PAD,
                             bos_id=tok.bos_id)
    got = list(stream.epoch(0))
    assert sum(len(b) for b, _ in got) == len(cols["source_len"])  # every window once
    examples = np.sort([n for _, n in got])
    assert examples.sum() == (cols["visible"] > 0).sum() and examples[-1] == max(b.examples for b, _ in got)
    # 16 give or take a window (8), or a chunk's tail: at least half a batch, or merged
    assert examples[1:].min() >= 16 // 2 and examples.max() < 16 + 8 + 16 // 2
    assert abs(np.median(examples) - 16) <= 1
    for b, _ in got:  # slots: as many as the batch's fullest window; the empty ones read it all
        filled = b.target_out[..., 0] != PAD
        assert filled.sum(1).max() == b.target_out.shape[1] == b.visible.shape[1]
        lengths = (~b.source_pad).sum(1, keepdim=True).expand_as(b.visible)
        assert (b.visible[~filled] == lengths[~filled]).all() and (b.visible <= lengths).all()


def test_streamed_batches_stop_where_the_shortest_rank_does(columns):
    cols, tok = columns
    calls = []

    def agree(k):  # another rank that has one batch fewer in every chunk, and no second chunk
        calls.append(k)
        return min(k, 3) if len(calls) == 1 else 0

    stream = StreamedBatches(FakeShard(cols), 8, chunk_batches=4, seed=0, rank=1, world_size=2,
                             pad_id=tok.pad_id, bos_id=tok.bos_id, agree=agree)
    got = list(stream.epoch(0))
    assert len(got) == 3 and calls == [4, 4]
    assert all(n == 2 * len(b) for b, n in got)  # global examples of the step


def test_sample_validation_set_streams_the_same_sample_from_a_file_or_parts(synthetic_run, tmp_path):
    sequences = read_sequences(synthetic_run.sequences)
    for users in (0, 10):
        want = validation_set(sequences, 4, users, seed=3)
        parts = tmp_path / f"parts{users}"
        parts.mkdir()
        table = pq.read_table(synthetic_run.sequences)
        for i, lo in enumerate(range(0, table.num_rows, 40)):
            pq.write_table(table.slice(lo, 40), parts / f"part-{i:05d}.parquet")
        for path in (synthetic_run.sequences, parts):
            got = sample_validation_set(path, 4, users, seed=3, batch_rows=7)
            for name in ("user_ids", "offsets", "flat", "targets"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


def parts_run(run, rows_per_part: int = 40, row_group: int = 15):
    """The run's sequences.parquet rewritten as a directory of parts with several row groups."""
    table = pq.read_table(run.sequences)
    run.sequences.unlink()
    run.sequences.mkdir()
    for i, lo in enumerate(range(0, table.num_rows, rows_per_part)):
        pq.write_table(table.slice(lo, rows_per_part), run.sequences / f"part-{i:05d}.parquet",
                       row_group_size=row_group)
    return table


def sorted_rows(columns) -> np.ndarray:
    rows = np.c_[columns["user_id"], columns["source_len"], columns["targets"], columns["source"]]
    return rows[np.lexsort(rows.T[::-1])].astype(np.int64)


def test_example_builder_reads_row_groups_of_parts(synthetic_run):
    sids = write_topic_semantic_ids(synthetic_run)
    tokenizer = SemanticIdTokenizer(sids, num_user_buckets=16, max_history=5)
    sequences = read_sequences(synthetic_run.sequences)
    parts_run(synthetic_run)
    slices = user_slices(synthetic_run.sequences)
    assert len(slices) == 3 + 3 + 2  # 96 users: parts of 40, 40, 16 users, row groups of 15
    builder = ExampleBuilder(lambda: tokenizer, users_per_batch=4)
    out = list(builder({key: np.array([s[key] for s in slices]) for key in slices[0]}))
    merged = {k: np.concatenate([p[k] for p in out]) for k in out[0]}
    assert_same_examples(examples_from_columns(merged), reference(sequences, tokenizer))


@pytest.mark.ray
def test_training_dataset_streams_the_reference_examples(ray_local, synthetic_run):
    from tiger_ray.seq2seq.ray_train import count_training_examples, driver_payload, training_dataset

    write_topic_semantic_ids(synthetic_run)
    config = dataclasses.replace(Seq2SeqTrainConfig(**PRESETS["tiny"]), cold_start_fraction=0.2,
                                 data_users_per_batch=8)
    sequences = read_sequences(synthetic_run.sequences)
    payload = driver_payload(synthetic_run, config)
    np.testing.assert_array_equal(payload["cold_items"],
                                  select_cold_items(sequences, 0.2, config.seed))
    assert payload["train_examples"] == len(build_examples(sequences, "train"))
    tokenizer = SemanticIdTokenizer.from_state(payload["tokenizer"], write_topic_semantic_ids(synthetic_run))
    want = training_examples(sequences.user_ids, sequences.offsets, sequences.flat, tokenizer,
                             payload["cold_items"])
    parts_run(synthetic_run)
    assert count_training_examples(synthetic_run.sequences) == payload["train_examples"]
    ds = training_dataset(synthetic_run, config, payload["tokenizer"], payload["cold_items"])
    got = [b for b in ds.iter_batches(batch_format="numpy", batch_size=None)]
    got = {k: np.concatenate([b[k] for b in got]) for k in got[0]}
    np.testing.assert_array_equal(sorted_rows(got), sorted_rows(want))


def test_a_one_row_group_file_is_cut_into_slices_that_read_every_user_once(tmp_path):
    """Beauty is one row group: it must still become many work items (shuffled every epoch)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tiger_ray.evaluation.retrieval import read_slices, row_group_slices

    path = tmp_path / "sequences.parquet"
    pq.write_table(pa.table({"user_id": np.arange(1, 1001), "item_ids": [[1, 2, 3]] * 1000}), path)
    slices = row_group_slices(path, min_items=4)
    assert [s["rows"] for s in slices] == [250] * 4 and [s["offset"] for s in slices] == [0, 250, 500, 750]
    columns = {key: np.array([s[key] for s in slices], dtype=object) for key in slices[0]}
    users = np.concatenate([b.column("user_id").to_numpy()
                            for b in read_slices(columns, ["user_id"], batch_rows=64)])
    assert np.array_equal(users, np.arange(1, 1001))
    # Slices never get smaller than min_rows (256), however many items are asked for.
    assert len(row_group_slices(path, min_items=1000)) == 4
