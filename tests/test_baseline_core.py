"""Dual-encoder core without Ray: losses against hand computations, padding, the towers, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tiger_ray.baseline import losses
from tiger_ray.baseline.dual_encoder import (DualEncoder, DualEncoderConfig, pad_examples,
                                             pad_histories, text_matrix, training_windows)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The 2 CPUs are shared: an intra-op thread team spin-waiting on a busy machine made a tiny
    training run 50x slower (40 s instead of 0.8 s) than one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_in_batch_loss_with_log_q_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]])
    targets = torch.tensor([1, 2, 3])
    log_q = torch.log(torch.tensor([1.0, 0.5, 0.25, 0.25]))  # by item id; 0 = padding
    # logit[i][j] = <q_i, v_j> - log Q(t_j); the label of row i is column i.
    dots = [[1, 0, 1], [0, 2, -1], [1, 2, 0]]
    minus_log_q = [math.log(2), math.log(4), math.log(4)]
    expected = 0.0
    for i in range(3):
        logits = [dots[i][j] + minus_log_q[j] for j in range(3)]
        expected += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    expected /= 3
    got = losses.in_batch_softmax_loss(q, v, targets, log_q=log_q)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Without the correction the popular item 1 is not boosted back: a different (larger) loss.
    uncorrected = losses.in_batch_softmax_loss(q, v, targets)
    assert uncorrected.item() != pytest.approx(expected, rel=1e-3)


def test_in_batch_loss_masks_repeated_targets_and_scales():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]])
    targets = torch.tensor([4, 4, 2])  # rows 0 and 1 share their positive
    scale = 2.0
    dots = [[1, 0, 1], [0, 2, -1], [1, 2, 0]]
    # row 0 does not see column 1 (same item), row 1 does not see column 0
    candidates = [[0, 2], [1, 2], [0, 1, 2]]
    expected = sum(-scale * dots[i][i] + math.log(sum(math.exp(scale * dots[i][j]) for j in candidates[i]))
                   for i in range(3)) / 3
    got = losses.in_batch_softmax_loss(q, v, targets, scale=scale)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_full_softmax_excludes_padding_row():
    q = torch.tensor([[1.0, 2.0]])
    items = torch.tensor([[100.0, 100.0], [1.0, 0.0], [0.0, 1.0]])  # row 0 = padding, never a candidate
    got = losses.full_softmax_loss(q, items, torch.tensor([2]))
    expected = -2.0 + math.log(math.exp(1.0) + math.exp(2.0))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_log_sampling_probability_from_target_counts():
    log_q = losses.log_sampling_probability(np.array([1, 1, 1, 3]), num_items=3)
    # item 2 is never a target: floored to count 1, so total = 3 + 1 + 1 = 5
    assert torch.allclose(log_q[1:], torch.log(torch.tensor([3 / 5, 1 / 5, 1 / 5])))


def test_pad_examples_matches_pad_histories():
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 50, size=n) for n in [1, 3, 7, 12, 0, 5]]
    lengths = np.array([len(h) for h in histories])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate(histories)
    padded = pad_histories(histories, 5)
    assert np.array_equal(pad_examples(offsets, flat, 5), padded)
    assert padded[1].tolist() == [*histories[1].tolist(), 0, 0]  # oldest first, padding after
    assert padded[3].tolist() == histories[3][-5:].tolist()  # the 5 most recent
    assert padded[4].tolist() == [0] * 5


def test_training_windows_hold_every_example_once():
    from tiger_ray.data.schema import Sequences
    from tiger_ray.data.split import build_examples, train_part

    rng = np.random.default_rng(1)
    seqs = [rng.permutation(100)[:n] + 1 for n in [3, 4, 9, 25, 40]]  # training parts of 1..38 items
    lengths = np.array([len(x) for x in seqs])
    sequences = Sequences(user_ids=np.arange(10, 15), offsets=np.concatenate([[0], np.cumsum(lengths)]),
                          flat=np.concatenate(seqs))
    L = 8
    history, targets, owners = training_windows([train_part(x) for x in seqs], L)
    examples = build_examples(sequences, "train")  # full histories, no cut
    full_history = {(int(examples.user_index[i]), int(examples.targets[i])): tuple(examples.history(i))
                    for i in range(len(examples))}  # items are distinct within a user here
    got = [(int(owners[w]), tuple(history[w, :j + 1]), int(targets[w, j]))
           for w in range(len(history)) for j in np.flatnonzero(targets[w])]
    assert len(got) == len(examples) == sum(len(x) - 3 for x in seqs)
    assert len({(owner, target) for owner, _, target in got}) == len(got)  # each example once
    for owner, hist, target in got:
        full = full_history[(owner, target)]
        assert full[-len(hist):] == hist  # the most recent items before the target
        if len(full) <= L:
            assert hist == full  # short prefixes: the whole history, as build_examples(max_history=L)
        else:
            assert L // 2 <= len(hist) <= L


def _model(**overrides) -> DualEncoder:
    torch.manual_seed(0)
    config = DualEncoderConfig(num_items=10, text_dim=4, dim=8, max_history=5, num_layers=2,
                               num_heads=2, dropout=0.0, id_dropout=0.0, **overrides)
    text = torch.cat([torch.zeros(1, 4), torch.randn(10, 4)])
    return DualEncoder(config, text).eval()


def test_one_pass_gives_every_prefix_query():
    model = _model()
    window = torch.tensor([[3, 4, 5, 6, 0]])
    with torch.no_grad():
        positions = model.encode_positions(window)[0]
        for j in range(4):
            prefix = torch.tensor([window[0, :j + 1].tolist() + [0] * (4 - j)])
            assert torch.allclose(positions[j], model.encode_queries(prefix)[0], atol=1e-5)


def test_query_tower_reads_the_newest_item_and_ignores_padding():
    model = _model()
    history = torch.tensor([[3, 4, 5, 0, 0], [7, 0, 0, 0, 0]])
    with torch.no_grad():
        q = model.encode_queries(history)
        q_table = model.encode_queries(history, table=model.item_table())
        alone = model.encode_queries(torch.tensor([[7, 0, 0]]))  # other width, other batch
        empty = model.encode_queries(torch.zeros(1, 5, dtype=torch.long))
        other = model.encode_queries(torch.tensor([[3, 4, 6, 0, 0]]))
    assert torch.allclose(q, q_table, atol=1e-6)
    assert torch.allclose(alone[0], q[1], atol=1e-6)
    assert torch.isfinite(empty).all()  # an empty history still gives a finite query
    assert torch.allclose(q.norm(dim=1), torch.ones(2), atol=1e-5)  # normalised
    assert not torch.allclose(other[0], q[0])  # the newest item matters


def test_item_tower_gives_cold_items_a_text_vector():
    model = _model()
    with torch.no_grad():
        model.item_id.weight.zero_()  # as if no ID embedding had been learned
        reprs = model.item_table()
    assert torch.all(reprs[0] == 0)
    # distinct texts -> distinct vectors, from the text projection alone
    assert torch.cdist(reprs[1:], reprs[1:]).fill_diagonal_(1.0).min() > 0


def test_text_matrix_checks_coverage():
    with pytest.raises(ValueError, match="missing item_id"):
        text_matrix(np.array([1, 2]), np.ones((2, 3), np.float32), num_items=3)
    table = text_matrix(np.array([2, 1]), np.array([[2.0], [1.0]], np.float32), num_items=2)
    assert table[:, 0].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("loss", ["full", "in_batch"])
def test_training_learns_synthetic_next_items(tmp_path, loss):
    from tiger_ray.baseline import ray_train
    from tiger_ray.baseline.config import PRESETS, BaselineConfig
    from tiger_ray.testing.synthetic import make_synthetic_embeddings, make_synthetic_run

    run = make_synthetic_run(tmp_path / "run")
    make_synthetic_embeddings(run)
    config = BaselineConfig(**{**PRESETS["tiny"], "loss": loss, "lr": 3e-3})
    data = ray_train.load_training_data(run, config)
    torch.manual_seed(0)
    model = DualEncoder(ray_train.model_config(config, data), data.text)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    log_q = losses.log_sampling_probability(data.targets[data.targets != 0], data.num_items)
    device = torch.device("cpu")

    def valid_recall():
        return ray_train.all_reduce_metrics(ray_train.evaluate_exact(
            model, data.valid_history, data.valid_users, data.valid_targets, 256, device))["recall@10"]

    before = valid_recall()
    losses_seen = [ray_train.train_epoch(model, optimizer, data, ray_train.epoch_rows(len(data.targets), e, 0, 0, 1),
                                         config, log_q, device, progress=False) for e in range(3)]
    after = valid_recall()
    assert losses_seen[-1] < losses_seen[0]
    # 64 items: chance recall@10 is ~0.16; the topic walks are easy to learn
    assert after > max(0.5, before)


def test_epoch_rows_split_a_shared_shuffle_evenly():
    from tiger_ray.baseline.ray_train import epoch_rows

    shares = [epoch_rows(11, epoch=3, seed=0, rank=r, world=2) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 5
    assert not set(shares[0]) & set(shares[1])
    assert not np.array_equal(epoch_rows(11, 3, 0, 0, 1), epoch_rows(11, 4, 0, 0, 1))


# ------------------------------------------------------------------ large catalogs (issue 19)


def test_log_q_correction_removes_the_popularity_bias_of_in_batch_negatives():
    # One query, a free score per item, targets drawn from a Zipf popularity. The full softmax's
    # optimum is s_j = log p_j + c. In-batch negatives are drawn from p too, so without the
    # correction the popular items are pushed down as often as they are pulled up and the scores
    # flatten; with it they recover log p.
    n, batch = 20, 64
    p = 1.0 / np.arange(1, n + 1)
    p /= p.sum()
    log_q = torch.from_numpy(np.concatenate([[0.0], np.log(p)])).float()
    target = np.log(p) - np.log(p).mean()

    def fit(correct: bool) -> np.ndarray:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        scores = torch.zeros(n + 1, requires_grad=True)
        optimizer = torch.optim.Adam([scores], lr=0.05)
        for _ in range(400):
            t = torch.from_numpy(rng.choice(np.arange(1, n + 1), size=batch, p=p))
            loss = losses.in_batch_softmax_loss(torch.ones(batch, 1), scores[t].unsqueeze(1), t,
                                                log_q=log_q if correct else None)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        s = scores.detach()[1:].numpy()
        return s - s.mean()

    corrected, uncorrected = fit(True), fit(False)
    assert np.abs(corrected - target).max() < 0.5
    assert np.abs(uncorrected - target).max() > 1.2
    assert np.ptp(uncorrected) < 0.3 * np.ptp(target)  # flattened: popularity learned away


def test_log_q_from_streamed_counts_matches_the_target_version():
    targets = np.array([1, 1, 1, 3])
    counts = np.bincount(targets, minlength=4)
    assert torch.equal(losses.log_q_from_counts(counts), losses.log_sampling_probability(targets, 3))


def test_item_tower_reads_text_rows_from_a_memmap_and_hashes_id_rows(tmp_path):
    text = np.random.default_rng(0).normal(size=(9, 6)).astype(np.float32)
    text[0] = 0
    np.save(tmp_path / "t.npy", text)
    mapped = np.load(tmp_path / "t.npy", mmap_mode="r")
    torch.manual_seed(0)
    in_memory = DualEncoder(DualEncoderConfig(num_items=8, text_dim=6, dim=8, max_history=4, num_heads=1),
                            torch.from_numpy(text))
    streamed = DualEncoder(in_memory.config, mapped)
    streamed.load_state_dict(in_memory.state_dict())
    ids = torch.tensor([[1, 5, 8, 0]])
    assert streamed.text is None and streamed.text_store is mapped
    assert torch.allclose(in_memory.eval().item_repr(ids), streamed.eval().item_repr(ids))
    hashed = DualEncoder(DualEncoderConfig(num_items=8, text_dim=0, dim=8, max_history=4, num_heads=1,
                                           id_rows=4))
    assert hashed.item_id.num_embeddings == 4
    assert hashed.id_row(torch.tensor([0, 1, 3, 4, 8])).tolist() == [0, 1, 3, 1, 2]


def _sequences_parts(tmp_path, sequences: list[list[int]]):
    """sequences.parquet as a directory of two parts (the large-catalog layout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tiger_ray.data.schema import SEQUENCES_SCHEMA
    from tiger_ray.runs import RunDir

    run = RunDir(tmp_path / "run")
    run.sequences.mkdir(parents=True)
    half = len(sequences) // 2
    for i, rows in enumerate([sequences[:half], sequences[half:]]):
        first = 1 if i == 0 else half + 1
        pq.write_table(pa.table({"user_id": list(range(first, first + len(rows))), "item_ids": rows},
                                schema=SEQUENCES_SCHEMA), run.sequences / f"part-{i:05d}.parquet")
    return run


def test_streamed_windows_counts_and_validation_match_the_in_memory_ones(tmp_path):
    import pyarrow as pa

    from tiger_ray.baseline import stream
    from tiger_ray.data.schema import read_sequences
    from tiger_ray.data.split import build_examples

    rng = np.random.default_rng(3)
    sequences = [rng.integers(1, 30, size=rng.integers(3, 40)).tolist() for _ in range(25)]
    run = _sequences_parts(tmp_path, sequences)
    parts = [np.asarray(s[:-2]) for s in sequences]
    h, t, _ = training_windows(parts, 6)
    batches = list(stream.sequence_batches(run.sequences, batch_rows=7))
    streamed = [stream.windows_batch(pa.Table.from_batches([b]), 6) for b in batches]
    assert np.array_equal(np.concatenate([s["history"] for s in streamed]), h)
    assert np.array_equal(np.concatenate([s["targets"] for s in streamed]), t)

    counts = [stream._target_counts(pa.Table.from_batches([b])) for b in batches]
    total = np.zeros(31, np.int64)
    for c in counts:
        np.add.at(total, c["item_id"], c["count"])
    assert np.array_equal(total, np.bincount(t[t != 0], minlength=31))

    valid = build_examples(read_sequences(run.sequences), "valid", max_history=6)
    history, targets = stream.validation_sample(run, 6, limit=0)
    assert np.array_equal(history, pad_examples(valid.offsets, valid.flat, 6))
    assert np.array_equal(targets, valid.targets)
    history, targets = stream.validation_sample(run, 6, limit=9)
    assert len(targets) == 9 and np.array_equal(targets, valid.targets[:9])


def test_chunked_validation_scores_like_exact_search():
    from tiger_ray.baseline import ray_train, stream

    torch.manual_seed(0)
    model = DualEncoder(DualEncoderConfig(num_items=50, dim=8, max_history=4, num_heads=1)).eval()
    rng = np.random.default_rng(0)
    history = pad_histories([rng.integers(1, 51, size=rng.integers(1, 6)) for _ in range(30)], 4)
    targets = np.random.default_rng(1).integers(1, 51, size=30)
    users = np.zeros(30, np.int64)
    exact = ray_train.evaluate_exact(model, history, users, targets, 8, torch.device("cpu")).compute()
    chunked = stream.evaluate_chunked(model, history, targets, 8, torch.device("cpu"), item_chunk=7).compute()
    assert chunked == pytest.approx(exact)
