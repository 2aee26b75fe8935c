"""The compact Semantic-ID table and its sorted-key index: equal to brute force, memory-mapped, small."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiger_ray.runs import RunDir
from tiger_ray.semantic_ids.index import SemanticIdIndex, key_layout
from tiger_ray.semantic_ids.table import SemanticIds, read_semantic_ids, write_semantic_ids
from tiger_ray.seq2seq.tokenizer import SemanticIdTokenizer, legacy_fingerprint
from tiger_ray.seq2seq.trie import SemanticIdTrie


def random_table(n, sizes, seed) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    every = np.array(list(itertools.product(*map(range, sizes))), dtype=np.int64)
    codes = every[rng.choice(len(every), size=min(n, len(every)), replace=False)]
    return np.arange(1, len(codes) + 1), codes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 6), st.integers(1, 4)),
       n=st.integers(1, 120), seed=st.integers(0, 2**16), subset=st.booleans())
def test_index_answers_equal_brute_force(sizes, n, seed, subset):
    item_ids, codes = random_table(n, sizes, seed)
    if subset:  # sparse ids, as the cold-start subsets have
        item_ids = item_ids * 3 + 7
    trie = SemanticIdTrie(item_ids, codes, sizes)
    rows = [tuple(c) for c in codes.tolist()]
    for level in range(4):
        prefixes = sorted({r[:level] for r in rows})
        # every prefix that exists plus every one that does not, all in one batch
        candidates = list(itertools.product(*map(range, sizes[:level])))
        query = np.array(candidates, dtype=np.int64).reshape(len(candidates), level)
        nodes = trie.prefix_nodes(query)
        assert ((nodes >= 0).numpy() == np.array([c in prefixes for c in candidates])).all()
        mask = trie.allowed_mask(nodes, level).numpy()
        for c, row in zip(candidates, mask):
            assert set(np.flatnonzero(row).tolist()) == {r[level] for r in rows if r[:level] == c}
        r, code, child = trie.children(nodes, level)
        assert mask[r.numpy(), code.numpy()].all() and len(r) == mask.sum()
        np.testing.assert_array_equal(child.numpy(), trie.child(nodes[r], level, code).numpy())
        assert trie.num_nodes(level) == len(prefixes)
        for code_value in (-1, sizes[level], sizes[level] + 3):  # out of range: no child
            assert (trie.child(nodes, level, torch.full_like(nodes, code_value)) == -1).all()
    # full codes -> items, for present and absent IDs
    every = np.array(list(itertools.product(*map(range, sizes))), dtype=np.int64)
    expected = {r: i for r, i in zip(rows, item_ids.tolist())}
    want = np.array([expected.get(tuple(c), -1) for c in every.tolist()])
    np.testing.assert_array_equal(trie.lookup(every), want)
    leaves = trie.prefix_nodes(every)
    np.testing.assert_array_equal(trie.items(leaves).numpy(), want)
    sids = SemanticIds(item_ids, codes, sizes)
    np.testing.assert_array_equal(sids.lookup(every), want)
    got, known = sids.codes_of(np.arange(0, item_ids.max() + 3))
    for i, (c, k) in enumerate(zip(got.tolist(), known.tolist())):
        assert k == (i in set(item_ids.tolist()))
        if k:
            assert tuple(c) == rows[item_ids.tolist().index(i)]


def test_saved_table_and_index_are_memory_mapped_and_small(tmp_path):
    sizes = (256, 256, 256, 4)
    rng = np.random.default_rng(0)
    n = 20_000
    keys = rng.choice(256**3 * 4, size=n, replace=False)
    codes = np.stack([keys >> 18, (keys >> 10) & 255, (keys >> 2) & 255, keys & 3], axis=1)
    sids = SemanticIds(np.arange(1, n + 1), codes, sizes)
    sids.save(tmp_path)
    opened = SemanticIds.open(tmp_path)
    assert isinstance(opened.codes.base, np.memmap) or isinstance(opened.codes, np.memmap)
    assert opened.codes.dtype == np.uint8 and opened.num_items == n
    np.testing.assert_array_equal(opened.codes, codes)
    assert opened.fingerprint() == sids.fingerprint()
    index = opened.index()
    assert isinstance(index.keys, np.memmap) and isinstance(index.items, np.memmap)
    assert index.keys.dtype == np.int32 and key_layout(sizes)[0] == np.int32
    trie = SemanticIdTrie.from_semantic_ids(opened)
    # the tensors are the memory maps themselves, not copies
    assert trie.keys.data_ptr() == index.keys.ctypes.data
    assert trie.leaf_item.data_ptr() == index.items.ctypes.data
    per_item = (opened.nbytes() + trie.nbytes()) / n
    assert per_item <= 16, per_item  # 4 B of codes + 8 B of index (+ the padding row)
    np.testing.assert_array_equal(trie.lookup(codes[:100]), np.arange(1, 101))
    again = SemanticIdTrie.open(tmp_path)
    np.testing.assert_array_equal(again.lookup(codes[-50:]), np.arange(n - 49, n + 1))
    # the tokenizer reads the mapped table: no int64 copy of it is kept
    tok = SemanticIdTokenizer(opened, num_user_buckets=5, max_history=3)
    assert tok.semantic_ids is opened
    assert not any(isinstance(v, np.ndarray) and v.size >= n for v in vars(tok).values())
    tokens = tok.item_tokens(np.array([1, 5, n]))
    np.testing.assert_array_equal(tokens - tok.offsets, codes[[0, 4, n - 1]])
    np.testing.assert_array_equal(tok.items_from_tokens(tokens), [1, 5, n])


def test_larger_codebooks_use_wider_types(tmp_path):
    sizes = (300, 300, 300, 1000)  # codes above 255 and a key space above 32 bits
    item_ids, codes = np.arange(1, 4), np.array([[299, 0, 5, 999], [0, 299, 5, 0], [299, 0, 5, 998]])
    sids = SemanticIds(item_ids, codes, sizes)
    sids.save(tmp_path)
    opened = SemanticIds.open(tmp_path)
    assert opened.codes.dtype == np.uint16 and opened.index().keys.dtype == np.int64
    np.testing.assert_array_equal(SemanticIdTrie.from_semantic_ids(opened).lookup(codes), item_ids)


def test_run_table_round_trip_and_legacy_parquet(tmp_path):
    run = RunDir(tmp_path / "run")
    item_ids, codes = random_table(50, (4, 4, 4, 2), seed=3)
    write_semantic_ids(run, item_ids, codes)
    assert {p.name for p in run.semantic_ids.iterdir()} >= {
        "codes.npy", "index_keys.npy", "index_items.npy", "index.json", "semantic_ids.json",
        "semantic_ids.parquet"}
    table = read_semantic_ids(run)
    assert table.codebook_sizes == (4, 4, 4, 2)
    assert read_semantic_ids(run, codebook_size=8).codebook_sizes == (8, 8, 8, 2)
    np.testing.assert_array_equal(table.codes, codes)
    # a run made before codes.npy: the Parquet table is read, and gives the same fingerprint
    (run.semantic_ids / "semantic_ids.json").unlink()
    legacy = read_semantic_ids(run)
    np.testing.assert_array_equal(legacy.codes, codes)
    assert legacy.fingerprint() == table.fingerprint()
    with pytest.raises(ValueError, match="1..3"):
        write_semantic_ids(run, np.array([1, 2, 4]), codes[:3])
    with pytest.raises(ValueError, match="shared by several items"):
        write_semantic_ids(run, np.array([1, 2]), np.array([[0, 0, 0, 0], [0, 0, 0, 0]]))


def test_models_saved_with_the_old_fingerprint_still_load():
    item_ids, codes = random_table(30, (4, 4, 4, 2), seed=1)
    sids = SemanticIds(item_ids, codes, (4, 4, 4, 2))
    tok = SemanticIdTokenizer(sids, num_user_buckets=5, max_history=3)
    state = {**tok.state(), "fingerprint": legacy_fingerprint(sids)}
    SemanticIdTokenizer.from_state(state, sids)
    other = SemanticIds(item_ids, codes[::-1].copy(), (4, 4, 4, 2))
    with pytest.raises(ValueError, match="changed"):
        SemanticIdTokenizer.from_state(state, other)


def test_index_checks_its_input(tmp_path):
    with pytest.raises(ValueError, match="share one Semantic ID"):
        SemanticIdIndex.build(np.array([1, 2]), np.array([[0, 1], [0, 1]]), (2, 2))
    with pytest.raises(ValueError, match="out of range"):
        SemanticIdIndex.build(np.array([1]), np.array([[0, 2]]), (2, 2))
    with pytest.raises(ValueError, match="63-bit"):
        key_layout((2**16,) * 4)
    with pytest.raises(FileNotFoundError, match="index.json"):
        SemanticIdIndex.open(tmp_path)
