"""Cold-start protocol (paper Sec. 4.3): held-out items, training without them, epsilon mixing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tiger_ray.cli import main
from tiger_ray.data.schema import read_sequences
from tiger_ray.data.split import build_examples
from tiger_ray.semantic_ids.table import SemanticIds
from tiger_ray.seq2seq.cold_items import load_cold_items
from tiger_ray.seq2seq.cold_start import (ColdIndex, exclude_from_training,
                                          merge_by_score, mix_cold_items, select_cold_items)
from tiger_ray.seq2seq.retriever import model_dir

from seq2seq_helpers import one_thread, train_tiny_tiger, write_topic_semantic_ids  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_select_cold_items_is_a_deterministic_share_of_test_items(synthetic_run):
    seqs = read_sequences(synthetic_run.sequences)
    test_items = np.unique([seqs[u][-1] for u in range(len(seqs))])
    cold = select_cold_items(seqs, fraction=0.1, seed=0)
    assert len(cold) == math.ceil(0.1 * len(test_items))
    assert np.isin(cold, test_items).all() and np.all(np.diff(cold) > 0)
    np.testing.assert_array_equal(cold, select_cold_items(seqs, fraction=0.1, seed=0))
    assert not np.array_equal(cold, select_cold_items(seqs, fraction=0.1, seed=1))
    with pytest.raises(ValueError, match="fraction"):
        select_cold_items(seqs, fraction=0.0)


def test_exclude_from_training_removes_every_trace(synthetic_run):
    seqs = read_sequences(synthetic_run.sequences)
    train = build_examples(seqs, "train")
    cold = select_cold_items(seqs, fraction=0.2, seed=3)
    kept = exclude_from_training(train, cold)
    assert not np.isin(kept.targets, cold).any() and not np.isin(kept.flat, cold).any()
    assert len(kept.offsets) == len(kept) + 1 and kept.offsets[-1] == len(kept.flat)
    # brute force: same examples, same order
    expected = []
    for i in range(len(train)):
        history = train.history(i)[~np.isin(train.history(i), cold)]
        if train.targets[i] not in cold and len(history):
            expected.append((int(train.user_ids[i]), history.tolist(), int(train.targets[i])))
    got = [(int(kept.user_ids[i]), kept.history(i).tolist(), int(kept.targets[i])) for i in range(len(kept))]
    assert got == expected


def test_epsilon_rule_by_hand():
    # seen items 1..3, unseen 10, 11 share item 2's first 3 codes, unseen 12 shares item 3's
    codes = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 1], [0, 1, 0, 2], [1, 0, 0, 1]])
    sids = SemanticIds(item_ids=np.array([1, 2, 3, 10, 11, 12]), codes=codes, codebook_sizes=(2, 2, 1, 3))
    index = ColdIndex.build(sids, np.array([10, 11, 12]))
    seen = np.array([[1, 2, 3, -1]])
    scores = np.array([[-1.0, -2.0, -3.0, -np.inf]], dtype=np.float32)
    seen_codes = np.array([[codes[0], codes[1], codes[2], [0, 0, 0, 0]]])
    items, out_scores, unseen = mix_cold_items(seen, scores, seen_codes, index, k=5, epsilon=0.4)
    assert items.tolist() == [[1, 2, 10, 11, 3]]  # budget floor(0.4 * 5) = 2, placed after item 2
    assert out_scores.tolist() == [[-1.0, -2.0, -2.0, -2.0, -3.0]]
    assert unseen.tolist() == [[False, False, True, True, False]]
    items, _, _ = mix_cold_items(seen, scores, seen_codes, index, k=5, epsilon=0.2)
    assert items.tolist() == [[1, 2, 10, 3, -1]]  # budget 1
    items, _, unseen = mix_cold_items(seen, scores, seen_codes, index, k=3, epsilon=0.0)
    assert items.tolist() == [[1, 2, 3]] and not unseen.any()
    # generated unseen IDs count against the same budget; extra ones are skipped
    gen = np.array([[10, 11, 1, 2, 3]])
    gen_codes = np.array([[codes[3], codes[4], codes[0], codes[1], codes[2]]])
    items, _, unseen = mix_cold_items(gen, np.zeros((1, 5), np.float32), gen_codes, index, k=5, epsilon=0.2)
    assert items.tolist() == [[10, 1, 2, 3, -1]] and unseen.tolist()[0][:2] == [True, False]
    with pytest.raises(ValueError, match="epsilon"):
        mix_cold_items(seen, scores, seen_codes, index, k=3, epsilon=1.5)


def test_prefix_length_sets_which_unseen_items_a_match_can_reach():
    # seen 1 = (0,0,0,0), 2 = (1,1,0,0); unseen 10 shares 3 codes with 1, 11 only 2, 12 none
    codes = np.array([[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [1, 0, 1, 0]])
    sids = SemanticIds(item_ids=np.array([1, 2, 10, 11, 12]), codes=codes, codebook_sizes=(2, 2, 2, 2))
    cold = np.array([10, 11, 12])
    three, two = ColdIndex.build(sids, cold), ColdIndex.build(sids, cold, prefix_len=2)
    assert three.prefix_len == 3 and two.prefix_len == 2
    assert three.items[three.reachable].tolist() == [10]
    assert sorted(two.items[two.reachable].tolist()) == [10, 11]
    generated, scores = np.array([[1, 2]]), np.array([[-1.0, -2.0]], dtype=np.float32)
    gen_codes = codes[[0, 1]][None]
    assert mix_cold_items(generated, scores, gen_codes, three, k=4, epsilon=1.0)[0].tolist() == \
        [[1, 10, 2, -1]]
    assert mix_cold_items(generated, scores, gen_codes, two, k=4, epsilon=1.0)[0].tolist() == \
        [[1, 10, 11, 2]]  # 11 joins item 1 on its first 2 codes; 12 shares no prefix with either
    with pytest.raises(ValueError, match="prefix_len"):
        ColdIndex.build(sids, cold, prefix_len=4)


def test_quota_gives_unseen_items_their_share_in_score_order():
    # seen 1, 2, 3; unseen 10 (its own ID, decoded by the unseen-only search, scored low) and 11
    codes = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
    sids = SemanticIds(item_ids=np.array([1, 2, 3, 10, 11]), codes=codes, codebook_sizes=(2, 2, 2, 1))
    index = ColdIndex.build(sids, np.array([10, 11]))
    seen = (np.array([[1, 2, 3]]), codes[[0, 1, 2]][None], np.array([[-1.0, -2.0, -3.0]], np.float32))
    cold = (np.array([[10, 11]]), codes[[3, 4]][None], np.array([[-5.0, -6.0]], np.float32))
    items, tokens, scores = merge_by_score(seen, cold)
    assert items.tolist() == [[1, 2, 3, 10, 11]] and scores.tolist() == [[-1, -2, -3, -5, -6]]
    assert (tokens[0] == codes[[0, 1, 2, 3, 4]]).all()
    # the cap (the paper's rule) never reaches the unseen items: the seen ones fill the list first
    capped, _, unseen = mix_cold_items(items, scores, tokens, index, k=3, epsilon=0.34)
    assert capped.tolist() == [[1, 2, 3]] and not unseen.any()
    # the quota: floor(0.34 * 3) = 1 unseen item, the best one, in place of the last seen one
    quota, out_scores, unseen = mix_cold_items(items, scores, tokens, index, k=3, epsilon=0.34, quota=True)
    assert quota.tolist() == [[1, 2, 10]] and unseen.tolist() == [[False, False, True]]
    assert out_scores.tolist() == [[-1.0, -2.0, -5.0]]
    quota, _, _ = mix_cold_items(items, scores, tokens, index, k=3, epsilon=0.67, quota=True)
    assert quota.tolist() == [[1, 10, 11]]
    # no unseen candidates: the quota leaves the seen list as it is
    quota, _, _ = mix_cold_items(*seen[:1], seen[2], seen[1], index, k=3, epsilon=0.34, quota=True)
    assert quota.tolist() == [[1, 2, 3]]


def test_cold_start_evaluation_end_to_end(synthetic_run, capsys):
    write_topic_semantic_ids(synthetic_run)
    seqs = read_sequences(synthetic_run.sequences)
    cold = select_cold_items(seqs, fraction=0.1, seed=0)
    train = exclude_from_training(build_examples(seqs, "train", max_history=8), cold)
    train_tiny_tiger(synthetic_run, examples=train, cold_items=cold)
    np.testing.assert_array_equal(load_cold_items(model_dir(synthetic_run)), cold)

    run = str(synthetic_run.root)
    assert main(["evaluate", "--run", run, "--cold-start", "--epsilon", "0.1", "--beam-size", "10"]) == 0
    metrics = json.loads((synthetic_run.eval_dir("tiger-cold", "test") / "metrics.json").read_text())
    n_cold_users = int(sum(seqs[u][-1] in cold for u in range(len(seqs))))
    assert metrics["count"] == n_cold_users > 0 and metrics["cold_items"] == len(cold)
    assert {"recall@1", "recall@5", "recall@10", "ndcg@10"} <= set(metrics)
    assert 0 < metrics["unseen_share"] <= 0.1 + 1e-9  # at most epsilon of the list is unseen
    assert metrics["prefix_len"] == 3 and 0 <= metrics["prefix_reachable_items"] <= len(cold)
    assert 0 <= metrics["prefix_reachable_users"] <= metrics["count"]
    assert 0 <= metrics["generated_unseen_users"] <= metrics["count"]
    assert "cold start:" in capsys.readouterr().out
    # a coarser match reaches at least as many unseen items
    assert main(["evaluate", "--run", run, "--cold-start", "--cold-prefix-len", "2"]) == 0
    metrics2 = json.loads((synthetic_run.eval_dir("tiger-cold", "test") / "metrics.json").read_text())
    assert metrics2["prefix_len"] == 2
    assert metrics2["prefix_reachable_items"] >= metrics["prefix_reachable_items"]
    # with the unseen-only search and the quota, unseen items hold exactly epsilon of every list
    assert main(["evaluate", "--run", run, "--cold-start", "--epsilon", "0.2", "--unseen-beam", "5",
                 "--unseen-quota"]) == 0
    metrics_q = json.loads((synthetic_run.eval_dir("tiger-cold", "test") / "metrics.json").read_text())
    assert metrics_q["quota"] and metrics_q["unseen_beam"] == 5
    assert metrics_q["unseen_share"] == pytest.approx(0.2)
    # epsilon 0: unseen items can never be recommended, so recall on them is exactly 0
    assert main(["evaluate", "--run", run, "--cold-start", "--epsilon", "0"]) == 0
    metrics0 = json.loads((synthetic_run.eval_dir("tiger-cold", "test") / "metrics.json").read_text())
    assert metrics0["recall@10"] == 0.0 and metrics0["unseen_share"] == 0.0


def test_cold_start_needs_a_model_trained_without_them(synthetic_run, capsys):
    write_topic_semantic_ids(synthetic_run)
    train_tiny_tiger(synthetic_run, steps=2)
    assert main(["evaluate", "--run", str(synthetic_run.root), "--cold-start"]) == 2
    assert "no cold_items.json" in capsys.readouterr().err
