"""Semantic-ID tokenizer and the seq2seq Transformer: layout, masks, caching, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tiger_ray.semantic_ids.table import SemanticIds
from tiger_ray.seq2seq.model import Seq2SeqConfig, TigerSeq2Seq, load_model, save_model
from tiger_ray.seq2seq.tokenizer import BOS, PAD, SemanticIdTokenizer, hash_user_ids

from seq2seq_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def random_semantic_ids(n_items=60, size=8, seed=0) -> SemanticIds:
    """Unique 4-code IDs: 3 random codes, the 4th disambiguates collisions (like the real table)."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, size, (n_items, 3))
    _, inverse = np.unique(prefix, axis=0, return_inverse=True)
    c3 = np.zeros(n_items, dtype=np.int64)
    for group in np.unique(inverse):
        members = np.flatnonzero(inverse == group)
        c3[members] = np.arange(len(members))
    codes = np.c_[prefix, c3]
    return SemanticIds(item_ids=np.arange(1, n_items + 1), codes=codes,
                       codebook_sizes=(size, size, size, int(c3.max()) + 1))


def tiny_config(vocab_size: int, **kw) -> Seq2SeqConfig:
    base = dict(vocab_size=vocab_size, d_model=32, num_heads=2, head_dim=16, encoder_layers=2,
                decoder_layers=2, mlp_dim=64, dropout=0.0)
    return Seq2SeqConfig(**{**base, **kw})


@pytest.fixture
def tok():
    return SemanticIdTokenizer(random_semantic_ids(), num_user_buckets=50, max_history=5)


# ---- tokenizer ---------------------------------------------------------------------------------
def test_vocabulary_layout(tok):
    sizes = tok.codebook_sizes
    assert tok.pad_id == PAD == 0 and tok.bos_id == BOS == 1 and tok.eos_id == 2
    assert tok.offsets.tolist() == [3, 3 + sizes[0], 3 + sizes[0] + sizes[1], 3 + sum(sizes[:3])]
    assert tok.user_offset == 3 + sum(sizes)
    assert tok.vocab_size == tok.user_offset + 50
    assert tok.max_source_len == 1 + 4 * 5
    no_user = SemanticIdTokenizer(tok.semantic_ids, use_user_token=False, max_history=5)
    assert no_user.vocab_size == tok.user_offset and no_user.max_source_len == 20


def test_item_tokens_round_trip(tok):
    items = tok.semantic_ids.item_ids
    tokens = tok.item_tokens(items)
    assert tokens.shape == (len(items), 4)
    for p in range(4):  # each position stays inside its own range
        assert (tokens[:, p] >= tok.offsets[p]).all()
        assert (tokens[:, p] < tok.offsets[p] + tok.codebook_sizes[p]).all()
    np.testing.assert_array_equal(tokens - tok.offsets, tok.semantic_ids.codes)
    np.testing.assert_array_equal(tok.items_from_tokens(tokens), items)
    # Anything that is not a real ID maps to -1: a code in the wrong position's range, PAD, and
    # an in-range combination no item has.
    shifted = tokens[:1].copy()
    shifted[0, 0] = tokens[0, 1]
    assert tok.items_from_tokens(shifted).tolist() == [-1]
    assert tok.items_from_tokens(np.zeros((1, 4), np.int64)).tolist() == [-1]
    codes = {tuple(c) for c in tok.semantic_ids.codes.tolist()}
    missing = next(c for c in np.ndindex(*tok.codebook_sizes) if c not in codes)
    assert tok.items_from_tokens((np.array(missing) + tok.offsets)[None]).tolist() == [-1]
    with pytest.raises(ValueError, match="item_id 999"):
        tok.item_tokens(np.array([1, 999]))


def test_encode_history_keeps_last_items_and_user_token(tok):
    history = np.arange(1, 9)  # 8 items, max_history 5
    tokens = tok.encode_history(history, user_id=42)
    assert tokens.dtype == np.int64 and tokens.shape == (1 + 4 * 5,)
    assert tokens[0] == tok.user_offset + hash_user_ids(np.array([42]), 50)[0]
    np.testing.assert_array_equal(tokens[1:].reshape(5, 4), tok.item_tokens(history[-5:]))


def test_encode_batch_matches_encode_history(tok):
    rng = np.random.default_rng(1)
    histories = [rng.integers(1, 61, n) for n in (1, 7, 3, 5)]
    users = np.array([5, 6, 7, 8])
    source, pad = tok.encode_batch(histories, users)
    assert source.shape == (4, 21) and pad.dtype == bool
    for row, (h, u) in enumerate(zip(histories, users)):
        expected = tok.encode_history(h, u)
        np.testing.assert_array_equal(source[row, :len(expected)], expected)
        assert (source[row, len(expected):] == PAD).all()
        np.testing.assert_array_equal(pad[row], source[row] == PAD)


def test_user_hash_is_stable_and_spread():
    users = np.arange(10_000)
    buckets = hash_user_ids(users, 2000)
    assert buckets.min() >= 0 and buckets.max() < 2000
    np.testing.assert_array_equal(buckets, hash_user_ids(users.copy(), 2000))
    assert len(np.unique(buckets)) > 1900  # consecutive ids do not pile into few buckets


def test_tokenizer_state_round_trip_and_fingerprint(tok):
    state = json.loads(json.dumps(tok.state()))  # JSON-able
    again = SemanticIdTokenizer.from_state(state, tok.semantic_ids)
    assert again.vocab_size == tok.vocab_size and again.max_history == tok.max_history
    other = random_semantic_ids(seed=1)
    with pytest.raises(ValueError, match="Semantic IDs changed"):
        SemanticIdTokenizer.from_state(state, other)


# ---- model -------------------------------------------------------------------------------------
def batch(tok, n=6, seed=0):
    rng = np.random.default_rng(seed)
    histories = [rng.integers(1, 61, rng.integers(1, 8)) for _ in range(n)]
    source, pad = tok.encode_batch(histories, np.arange(n))
    target = tok.item_tokens(rng.integers(1, 61, n))
    target_in = np.c_[np.full(n, BOS), target[:, :3]]
    return (torch.from_numpy(source), torch.from_numpy(pad), torch.from_numpy(target_in),
            torch.from_numpy(target))


def test_paper_default_sizes():
    config = Seq2SeqConfig(vocab_size=3027)
    assert (config.d_model, config.num_heads, config.head_dim) == (128, 6, 64)
    assert (config.encoder_layers, config.decoder_layers, config.mlp_dim) == (4, 4, 1024)
    assert config.dropout == 0.1 and config.activation == "relu"
    model = TigerSeq2Seq(config)
    # attention projects 128 -> 6 x 64 = 384 -> 128
    assert model.encoder[0].attn.qkv.weight.shape == (3 * 384, 128)
    assert model.encoder[0].attn.out.weight.shape == (128, 384)


def test_forward_shapes_and_loss(tok):
    torch.manual_seed(0)
    model = TigerSeq2Seq(tiny_config(tok.vocab_size)).eval()
    source, pad, target_in, target = batch(tok)
    logits = model(source, pad, target_in)
    assert logits.shape == (6, 4, tok.vocab_size)
    loss = model.loss(source, pad, target_in, target)
    assert loss.ndim == 0 and abs(loss.item() - np.log(tok.vocab_size)) < 0.5  # ~uniform at init
    # PAD targets are ignored
    padded = target.clone()
    padded[:, 3] = PAD
    expected = torch.nn.functional.cross_entropy(logits[:, :3].flatten(0, 1), target[:, :3].flatten())
    torch.testing.assert_close(model.loss(source, pad, target_in, padded), expected)


def test_decoder_is_causal(tok):
    torch.manual_seed(0)
    model = TigerSeq2Seq(tiny_config(tok.vocab_size)).eval()
    source, pad, target_in, _ = batch(tok)
    logits = model(source, pad, target_in)
    changed = target_in.clone()
    changed[:, 2] = tok.offsets[1] + (changed[:, 2] - tok.offsets[1] + 1) % tok.codebook_sizes[1]
    logits2 = model(source, pad, changed)
    torch.testing.assert_close(logits[:, :2], logits2[:, :2])  # earlier positions unaffected
    assert (logits[:, 2:] - logits2[:, 2:]).abs().max() > 1e-4  # later ones do see it


def test_padding_side_and_amount_do_not_matter(tok):
    torch.manual_seed(0)
    model = TigerSeq2Seq(tiny_config(tok.vocab_size)).eval()
    source, pad, target_in, _ = batch(tok)
    logits = model(source, pad, target_in)
    # more right padding
    wider = torch.cat([source, torch.zeros(6, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(model(wider, wider == PAD, target_in), logits, atol=1e-5, rtol=1e-5)
    # left padding: move each row's real tokens to the end
    left = torch.zeros_like(source)
    for r in range(len(source)):
        real = source[r][~pad[r]]
        left[r, source.shape[1] - len(real):] = real
    torch.testing.assert_close(model(left, left == PAD, target_in), logits, atol=1e-5, rtol=1e-5)
    # drop the longest row: the batch gets narrower, the other rows' logits do not change
    keep = (~pad).sum(1) < (~pad).sum(1).max()
    width = int((~pad[keep]).sum(1).max())
    torch.testing.assert_close(model(source[keep, :width], pad[keep, :width], target_in[keep]),
                               logits[keep], atol=1e-5, rtol=1e-5)


def test_beams_and_incremental_decoding_match_full_decode(tok):
    torch.manual_seed(0)
    model = TigerSeq2Seq(tiny_config(tok.vocab_size)).eval()
    source, pad, _, _ = batch(tok, n=3)
    K, T = 4, 4
    gen = torch.Generator().manual_seed(1)
    beams = torch.randint(3, tok.user_offset, (3, K, T), generator=gen)
    beams[:, :, 0] = BOS
    memory = model.encode(source, pad)
    full = model.decode(memory, pad, beams)  # [B, K, T, V]
    assert full.shape == (3, K, T, tok.vocab_size)
    for k in range(K):  # each beam alone through the plain [B, T] path
        torch.testing.assert_close(full[:, k], model.decode(memory, pad, beams[:, k]), atol=1e-5, rtol=1e-5)
    kv, cache = model.memory_kv(memory), None
    for t in range(T):  # one token at a time against the self-attention cache
        step, cache = model.decode_step(kv, pad, beams[:, :, t], cache)
        torch.testing.assert_close(step, full[:, :, t], atol=1e-5, rtol=1e-5)
    sliced, _ = model.decode_step(kv, pad, beams[:, :, 0], None, vocab_slice=slice(10, 20))
    torch.testing.assert_close(sliced, full[:, :, 0, 10:20], atol=1e-5, rtol=1e-5)


def test_model_learns_a_fixed_mapping(tok):
    torch.manual_seed(0)
    model = TigerSeq2Seq(tiny_config(tok.vocab_size))
    source, pad, target_in, target = batch(tok, n=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = model.loss(source, pad, target_in, target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


# ---- item-causal encoder (all-positions training) -------------------------------------------
def causal_model(vocab_size: int) -> TigerSeq2Seq:
    torch.manual_seed(0)
    return TigerSeq2Seq(tiny_config(vocab_size, encoder_attention="item_causal")).eval()


def window(tok, n_items=5, seed=0):
    """One user's window: the source of ``n_items`` items and, for every target k (the item after
    the first k + 1), its BOS-shifted tokens and the source tokens it may read."""
    rng = np.random.default_rng(seed)
    items = rng.integers(1, 61, n_items + 1)
    source, pad = tok.encode_batch([items[:-1]], np.array([3]))
    target = tok.item_tokens(items[1:])[None]  # [1, K, 4]
    target_in = np.concatenate([np.full((1, n_items, 1), BOS), target[..., :3]], axis=-1)
    lead = int(tok.use_user_token)
    visible = lead + 4 * np.arange(1, n_items + 1)[None]
    return items, *(torch.from_numpy(a) for a in (source, pad, target_in, target, visible))


@pytest.mark.parametrize("use_user_token", [True, False])
def test_item_causal_encoder_hides_later_items(tok, use_user_token):
    tok = SemanticIdTokenizer(tok.semantic_ids, num_user_buckets=50, max_history=5,
                              use_user_token=use_user_token)
    model = causal_model(tok.vocab_size)
    items, source, pad, _, _, _ = window(tok)
    memory = model.encode(source, pad)
    lead = int(use_user_token)
    for i in range(len(items) - 1):  # change item i: tokens of items < i (and the user token) stay
        changed = items[:-1].copy()
        changed[i] = changed[i] % 60 + 1
        other = model.encode(torch.from_numpy(tok.encode_batch([changed], np.array([3]))[0]), pad)
        cut = lead + 4 * i
        torch.testing.assert_close(other[:, :cut], memory[:, :cut])
        assert (other[:, cut:] - memory[:, cut:]).abs().amax(-1).min() > 1e-4  # all later ones see it


def test_item_causal_prefix_encodes_like_the_history_alone(tok):
    """What makes all-positions training exact: the encoding of a history's first k items equals
    the encoding of those k items as the whole source, as at inference (padding included)."""
    model = causal_model(tok.vocab_size)
    rng = np.random.default_rng(2)
    histories = [rng.integers(1, 61, n) for n in (5, 2, 4)]
    source, pad = (torch.from_numpy(a) for a in tok.encode_batch(histories, np.arange(3)))
    memory = model.encode(source, pad)
    for r, h in enumerate(histories):
        for k in range(1, len(h) + 1):
            alone = torch.from_numpy(tok.encode_history(h[:k], r))[None]
            torch.testing.assert_close(memory[r:r + 1, :alone.shape[1]],
                                       model.encode(alone, alone == PAD), atol=1e-5, rtol=1e-5)


def test_all_positions_logits_equal_each_example_decoded_alone(tok):
    """Target k of a window, reading its ``visible`` prefix, gets the logits of (its history ->
    it) encoded and decoded on its own; the loss of target t ignores items >= t."""
    model = causal_model(tok.vocab_size)
    items, source, pad, target_in, target, visible = window(tok)
    logits = model(source, pad, target_in, visible)  # [1, K, 4, V]
    for k in range(len(items) - 1):
        alone = torch.from_numpy(tok.encode_history(items[:k + 1], 3))[None]
        torch.testing.assert_close(logits[:, k], model(alone, alone == PAD, target_in[:, k]),
                                   atol=1e-5, rtol=1e-5)

    def target_losses(source):
        out = model(source, pad, target_in, visible)
        return torch.nn.functional.cross_entropy(out.flatten(0, -2), target.flatten(),
                                                 reduction="none").view(-1, 4).sum(1)

    losses = target_losses(source)
    for t in range(1, len(items) - 1):  # change the source items t, t + 1, ...
        changed = items[:-1].copy()
        changed[t:] = changed[t:] % 60 + 1
        new = target_losses(torch.from_numpy(tok.encode_batch([changed], np.array([3]))[0]))
        # slot k predicts items[k + 1] from items[:k + 1]: untouched while k < t (target items[t]
        # and before), changed from there on
        torch.testing.assert_close(new[:t], losses[:t])
        assert (new[t:] - losses[t:]).abs().min() > 1e-5


def test_visible_prefixes_need_the_item_causal_encoder(tok):
    torch.manual_seed(0)
    model = TigerSeq2Seq(tiny_config(tok.vocab_size)).eval()
    _, source, pad, target_in, _, visible = window(tok)
    with pytest.raises(ValueError, match="item_causal"):
        model(source, pad, target_in, visible)


@pytest.mark.parametrize("tie, attention", [(False, "bidirectional"), (True, "bidirectional"),
                                            (False, "item_causal")])
def test_save_load_round_trip(tmp_path, tok, tie, attention):
    torch.manual_seed(0)
    config = tiny_config(tok.vocab_size, tie_embeddings=tie, encoder_attention=attention)
    model = TigerSeq2Seq(config).eval()
    save_model(tmp_path / "best", model, config, tok, extra={"step": 7})
    loaded, tok2 = load_model(tmp_path / "best")
    assert loaded.config == config and not loaded.training
    assert tok2.state() == tok.state()
    np.testing.assert_array_equal(tok2.semantic_ids.codes, tok.semantic_ids.codes)
    source, pad, target_in, _ = batch(tok)
    torch.testing.assert_close(loaded(source, pad, target_in), model(source, pad, target_in))
    saved = json.loads((tmp_path / "best" / "config.json").read_text())
    assert saved["extra"] == {"step": 7} and saved["model"]["vocab_size"] == tok.vocab_size
    assert isinstance(torch.load(tmp_path / "best" / "model.pt", weights_only=True), dict)


def test_load_model_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
