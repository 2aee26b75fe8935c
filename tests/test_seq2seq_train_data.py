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
from tiger_ray.seq2seq.data import (ExampleBuilder, StreamedBatches, TokenizedExamples,
                                    examples_from_columns, tokenize_examples, training_examples,
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
