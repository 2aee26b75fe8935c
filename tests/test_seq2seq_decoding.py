"""Prefix trie, constrained beam search, sampling and the TIGER retriever."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiger_ray.semantic_ids.table import SemanticIds
from tiger_ray.seq2seq.beam_search import beam_search, greedy_decode
from tiger_ray.seq2seq.model import Seq2SeqConfig, TigerSeq2Seq
from tiger_ray.seq2seq.retriever import TigerRetriever
from tiger_ray.seq2seq.tokenizer import BOS, SemanticIdTokenizer
from tiger_ray.seq2seq.trie import SemanticIdTrie

from seq2seq_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def make_ids(codes, sizes) -> SemanticIds:
    codes = np.asarray(codes, dtype=np.int64).reshape(-1, 4)
    return SemanticIds(item_ids=np.arange(1, len(codes) + 1), codes=codes, codebook_sizes=tuple(sizes))


def random_ids(n, sizes, seed) -> SemanticIds:
    rng = np.random.default_rng(seed)
    every = np.array(list(itertools.product(*map(range, sizes))))
    return make_ids(every[rng.choice(len(every), size=min(n, len(every)), replace=False)], sizes)


def tiny_model(tok, seed=0, **kw) -> TigerSeq2Seq:
    torch.manual_seed(seed)
    config = Seq2SeqConfig(**{**dict(vocab_size=tok.vocab_size, d_model=16, num_heads=2, head_dim=8,
                                      encoder_layers=1, decoder_layers=2, mlp_dim=32, dropout=0.0), **kw})
    model = TigerSeq2Seq(config).eval()
    with torch.no_grad():  # larger weights than the init so scores are far from uniform
        for p in model.parameters():
            p.mul_(8.0)
    return model


def sources(tok, n, seed=0):
    rng = np.random.default_rng(seed)
    items = tok.semantic_ids.item_ids
    histories = [rng.choice(items, size=rng.integers(1, 6)) for _ in range(n)]
    source, pad = tok.encode_batch(histories, np.arange(n))
    return histories, torch.from_numpy(source), torch.from_numpy(pad)


@torch.no_grad()
def exhaustive_scores(model, tok, source, pad) -> np.ndarray:
    """[B, N] every item's summed per-position log-probability, by teacher forcing."""
    targets = torch.from_numpy(tok.item_tokens(tok.semantic_ids.item_ids))  # [N, 4]
    target_in = torch.cat([torch.full((len(targets), 1), BOS), targets[:, :3]], 1)
    beams = target_in[None].expand(len(source), -1, -1)
    logits = model.decode(model.encode(source, pad), pad, beams)  # [B, N, 4, V]
    total = torch.zeros(logits.shape[:2])
    for p in range(4):
        lo, size = int(tok.offsets[p]), tok.codebook_sizes[p]
        logp = torch.log_softmax(logits[:, :, p, lo:lo + size], dim=-1)
        total += logp.gather(2, (targets[:, p] - lo)[None, :, None].expand(len(source), -1, 1))[..., 0]
    return total.numpy()


# ---- trie ------------------------------------------------------------------------------------------
def test_trie_matches_brute_force():
    sids = random_ids(40, (4, 3, 5, 2), seed=0)
    trie = SemanticIdTrie.from_semantic_ids(sids)
    codes = [tuple(c) for c in sids.codes.tolist()]
    for depth in range(4):
        prefixes = sorted({c[:depth] for c in codes})
        assert trie.num_nodes(depth) == len(prefixes)
        mask = trie.allowed_next(np.array(prefixes, dtype=np.int64).reshape(len(prefixes), depth))
        for prefix, row in zip(prefixes, mask):
            expected = {c[depth] for c in codes if c[:depth] == prefix}
            assert set(np.flatnonzero(row).tolist()) == expected
    np.testing.assert_array_equal(trie.lookup(sids.codes), sids.item_ids)
    # a prefix no item has: node -1, nothing allowed, lookup -1
    prefixes3 = {c[:3] for c in codes}
    absent = next(p for p in itertools.product(range(4), range(3), range(5)) if p not in prefixes3)
    assert trie.prefix_nodes(np.array([absent])).tolist() == [-1]
    assert not trie.allowed_next(np.array([absent])).any()
    full_absent = next(c for c in itertools.product(range(4), range(3), range(5), range(2)) if c not in codes)
    assert trie.lookup(np.array([full_absent])).tolist() == [-1]


def test_trie_is_compact_and_checks_input():
    sids = random_ids(5000, (32, 32, 32, 2), seed=1)
    trie = SemanticIdTrie.from_semantic_ids(sids)
    assert trie.nbytes() < 80 * sids.num_items  # a few integers per item, no per-node objects
    with pytest.raises(ValueError, match="share one Semantic ID"):
        SemanticIdTrie(np.array([1, 2]), np.array([[0, 0, 0, 0], [0, 0, 0, 0]]), (1, 1, 1, 1))
    with pytest.raises(ValueError, match="out of range"):
        SemanticIdTrie(np.array([1]), np.array([[0, 0, 5, 0]]), (2, 2, 2, 1))
    smaller = SemanticIdTrie.from_semantic_ids(sids, exclude_items=sids.item_ids[:10])
    assert smaller.num_items == sids.num_items - 10
    assert (smaller.lookup(sids.codes[:10]) == -1).all()


# ---- beam search -----------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 5), st.integers(1, 3)),
       n_items=st.integers(1, 40), id_seed=st.integers(0, 2**16), model_seed=st.integers(0, 2**16),
       beam=st.integers(1, 12), temperature=st.sampled_from([0.0, 0.7, 2.0]),
       user_token=st.booleans())
def test_decoding_never_returns_an_invalid_id(sizes, n_items, id_seed, model_seed, beam, temperature,
                                              user_token):
    sids = random_ids(n_items, sizes, id_seed)
    tok = SemanticIdTokenizer(sids, num_user_buckets=7, use_user_token=user_token, max_history=4)
    model = tiny_model(tok, seed=model_seed)
    trie = SemanticIdTrie.from_semantic_ids(sids)
    _, source, pad = sources(tok, 3, seed=model_seed)
    gen = torch.Generator().manual_seed(model_seed)
    result = beam_search(model, trie, tok.offsets, source, pad, beam_size=beam,
                         temperature=temperature, generator=gen)
    items, scores = result.items.numpy(), result.scores.numpy()
    assert items.shape == scores.shape == (3, beam)
    filled = min(beam, sids.num_items)
    assert (items[:, :filled] >= 1).all() and (items[:, filled:] == -1).all()
    assert np.isin(items[:, :filled], sids.item_ids).all()  # every ID is a real item
    for row in items:
        assert len(set(row[:filled].tolist())) == filled  # no item twice
    # the tokens spell exactly the returned item, by the tokenizer's independent table
    np.testing.assert_array_equal(tok.items_from_tokens(result.tokens.numpy()[:, :filled]), items[:, :filled])
    assert np.isfinite(scores[:, :filled]).all() and (scores[:, :filled] <= 1e-5).all()
    assert (np.diff(scores[:, :filled], axis=1) <= 1e-6).all()  # best first


def test_beam_of_one_is_greedy():
    sids = random_ids(300, (8, 8, 8, 2), seed=3)
    tok = SemanticIdTokenizer(sids, num_user_buckets=11, max_history=5)
    model = tiny_model(tok, seed=3)
    trie = SemanticIdTrie.from_semantic_ids(sids)
    _, source, pad = sources(tok, 16, seed=3)
    greedy = greedy_decode(model, trie, tok.offsets, source, pad)
    beam1 = beam_search(model, trie, tok.offsets, source, pad, beam_size=1)
    np.testing.assert_array_equal(beam1.items.numpy(), greedy.items.numpy())
    np.testing.assert_array_equal(beam1.tokens.numpy(), greedy.tokens.numpy())
    torch.testing.assert_close(beam1.scores, greedy.scores, atol=1e-5, rtol=1e-5)
    # a wide beam never scores its best below greedy's single path
    wide = beam_search(model, trie, tok.offsets, source, pad, beam_size=10)
    assert (wide.scores[:, 0] >= greedy.scores[:, 0] - 1e-5).all()


def test_wide_beam_is_exact_ranking():
    """With at least as many beams as items, beam search is exhaustive: it must return every item
    ranked exactly by its teacher-forced score."""
    sids = random_ids(30, (4, 4, 4, 2), seed=4)
    tok = SemanticIdTokenizer(sids, num_user_buckets=5, max_history=5)
    model = tiny_model(tok, seed=4)
    trie = SemanticIdTrie.from_semantic_ids(sids)
    _, source, pad = sources(tok, 5, seed=4)
    result = beam_search(model, trie, tok.offsets, source, pad, beam_size=30)
    exact = exhaustive_scores(model, tok, source, pad)
    for b in range(5):
        order = np.argsort(-exact[b], kind="stable")
        np.testing.assert_allclose(result.scores[b].numpy(), exact[b][order], atol=1e-4)
        np.testing.assert_array_equal(result.items[b].numpy(), sids.item_ids[order])


def test_batched_equals_one_by_one():
    sids = random_ids(200, (8, 8, 8, 2), seed=5)
    tok = SemanticIdTokenizer(sids, num_user_buckets=11, max_history=5)
    model = tiny_model(tok, seed=5)
    trie = SemanticIdTrie.from_semantic_ids(sids)
    histories, source, pad = sources(tok, 8, seed=5)
    batched = beam_search(model, trie, tok.offsets, source, pad, beam_size=6)
    for b, h in enumerate(histories):
        src, p = tok.encode_batch([h], np.array([b]))
        alone = beam_search(model, trie, tok.offsets, torch.from_numpy(src), torch.from_numpy(p), beam_size=6)
        np.testing.assert_array_equal(alone.items[0].numpy(), batched.items[b].numpy())
        torch.testing.assert_close(alone.scores[0], batched.scores[b], atol=1e-5, rtol=1e-5)


def test_low_temperature_sampling_is_tempered_beam_search():
    """As T -> 0 the Gumbel noise vanishes next to the log-probabilities (scaled by 1/T), so
    sampling must return what deterministic beam search (with the same per-step renormalisation
    over allowed codes) returns on logits / T."""
    sids = random_ids(200, (8, 8, 8, 2), seed=6)
    tok = SemanticIdTokenizer(sids, num_user_buckets=11, max_history=5)
    model = tiny_model(tok, seed=6)
    trie = SemanticIdTrie.from_semantic_ids(sids)
    _, source, pad = sources(tok, 6, seed=6)
    t = 1e-3
    sampled = beam_search(model, trie, tok.offsets, source, pad, beam_size=5, temperature=t,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.lm_head.weight.div_(t)  # logits / T
    tempered = beam_search(model, trie, tok.offsets, source, pad, beam_size=5, renormalize=True)
    torch.testing.assert_close(sampled.scores, tempered.scores, rtol=1e-4, atol=1e-2)
    agree = (sampled.items == tempered.items).float().mean().item()
    assert agree >= 0.9  # only exact near-ties may swap


def test_sampling_follows_the_constrained_distribution():
    """Gumbel-top-k on the trie draws an ID with the product over its 4 steps of the model's
    probability renormalised over the codes the trie allows at that step."""
    sids = random_ids(6, (3, 2, 2, 1), seed=7)
    tok = SemanticIdTokenizer(sids, num_user_buckets=3, use_user_token=False, max_history=3)
    model = tiny_model(tok, seed=7)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.25)  # moderate scores so every item has visible probability
    trie = SemanticIdTrie.from_semantic_ids(sids)
    _, source, pad = sources(tok, 1, seed=7)
    n = 4000
    draws = beam_search(model, trie, tok.offsets, source.expand(n, -1), pad.expand(n, -1),
                        beam_size=1, temperature=1.0,
                        generator=torch.Generator().manual_seed(0)).items.numpy()[:, 0]
    # exact probabilities, enumerated
    targets = torch.from_numpy(tok.item_tokens(sids.item_ids))
    target_in = torch.cat([torch.full((len(targets), 1), BOS), targets[:, :3]], 1)
    with torch.no_grad():
        logits = model.decode(model.encode(source, pad), pad, target_in[None])[0]  # [N, 4, V]
    codes = [tuple(c) for c in sids.codes.tolist()]
    p = np.ones(len(codes))
    for i, code in enumerate(codes):
        for level in range(4):
            allowed = sorted({c[level] for c in codes if c[:level] == code[:level]})
            row = logits[i, level, int(tok.offsets[level]) + np.array(allowed)].double()
            p[i] *= torch.softmax(row, 0)[allowed.index(code[level])].item()
    assert abs(p.sum() - 1) < 1e-6 and p.min() > 0.02
    freq = np.bincount(draws, minlength=sids.num_items + 1)[1:] / n
    assert 0.5 * np.abs(freq - p).sum() < 0.04  # total variation distance


def test_temperature_raises_diversity():
    sids = random_ids(400, (8, 8, 8, 2), seed=8)
    tok = SemanticIdTokenizer(sids, num_user_buckets=11, max_history=5)
    model = tiny_model(tok, seed=8)
    trie = SemanticIdTrie.from_semantic_ids(sids)
    _, source, pad = sources(tok, 1, seed=8)
    n = 300
    first = {}
    for t in (0.5, 3.0):
        draws = beam_search(model, trie, tok.offsets, source.expand(n, -1), pad.expand(n, -1),
                            beam_size=1, temperature=t, generator=torch.Generator().manual_seed(1))
        first[t] = len(np.unique(draws.items.numpy()))
    assert first[3.0] > first[0.5]


def test_beam_search_rejects_bad_arguments():
    sids = random_ids(10, (2, 2, 2, 2), seed=9)
    tok = SemanticIdTokenizer(sids, num_user_buckets=3, max_history=3)
    model, trie = tiny_model(tok), SemanticIdTrie.from_semantic_ids(sids)
    _, source, pad = sources(tok, 1)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, trie, tok.offsets, source, pad, beam_size=0)
    with pytest.raises(ValueError, match="temperature"):
        beam_search(model, trie, tok.offsets, source, pad, temperature=-1.0)


# ---- retriever -------------------------------------------------------------------------------------
def test_retriever_recommends_real_items_in_any_chunking():
    sids = random_ids(300, (8, 8, 8, 2), seed=10)
    tok = SemanticIdTokenizer(sids, num_user_buckets=11, max_history=5)
    model = tiny_model(tok, seed=10)
    histories, _, _ = sources(tok, 9, seed=10)
    users = np.arange(100, 109)
    whole = TigerRetriever(model, tok, beam_size=8, chunk_size=256).recommend(histories, users, k=5)
    assert whole.item_ids.shape == whole.scores.shape == (9, 5)
    assert whole.item_ids.dtype == np.int64 and whole.scores.dtype == np.float32
    assert np.isin(whole.item_ids, sids.item_ids).all()
    assert whole.extras == {"invalid_id_rate": 0.0}
    chunked = TigerRetriever(model, tok, beam_size=8, chunk_size=2).recommend(histories, users, k=5)
    np.testing.assert_array_equal(chunked.item_ids, whole.item_ids)
    np.testing.assert_allclose(chunked.scores, whole.scores, atol=1e-4)  # other padding widths
    # k larger than the beam widens the beam; a per-call temperature samples
    wide = TigerRetriever(model, tok, beam_size=2).recommend(histories, users, k=12)
    assert (wide.item_ids >= 1).all()
    sampled = TigerRetriever(model, tok, beam_size=8).recommend(histories, users, k=5, temperature=1.0)
    assert np.isin(sampled.item_ids, sids.item_ids).all()
    fast = TigerRetriever(model, tok, beam_size=8, precision="bf16").recommend(histories, users, k=5)
    assert np.isin(fast.item_ids, sids.item_ids).all() and fast.extras == {"invalid_id_rate": 0.0}
    with pytest.raises(ValueError, match="precision"):
        TigerRetriever(model, tok, precision="fp8")
