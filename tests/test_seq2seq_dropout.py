"""Random-bits dropout: the same distribution as nn.Dropout, cheaper masks, exact gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiger_ray.seq2seq.dropout import Dropout, effective_p, keep_mask
from tiger_ray.seq2seq.model import Seq2SeqConfig, TigerSeq2Seq, attention_with_dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_drop_rate_and_scale_match_p(p):
    torch.manual_seed(0)
    mask = keep_mask((1000, 1000), p, torch.float32)
    dropped = (mask == 0).float().mean().item()
    assert effective_p(p) == pytest.approx(p, abs=1 / 65536)
    # 1e6 Bernoulli draws: the standard error is < 0.0005, so 0.002 is > 4 sigma.
    assert dropped == pytest.approx(p, abs=0.002)
    assert torch.unique(mask).tolist() == pytest.approx([0.0, 1 / (1 - effective_p(p))])
    assert mask.mean().item() == pytest.approx(1.0, abs=0.005)  # expectation preserved


def test_every_16_bit_slice_of_a_word_is_uniform():
    """Each int64 word feeds 4 consecutive elements; a slice with a biased bit (e.g. the sign
    bit of a non-negative draw) would show as a different drop rate at one offset mod 4, and
    dependent slices as pairs dropped together more often than p^2."""
    torch.manual_seed(1)
    dropped = (keep_mask((4_000_000,), 0.1, torch.float32) == 0).view(-1, 4).float()
    for rate in dropped.mean(0).tolist():
        assert rate == pytest.approx(0.1, abs=0.002)
    both = (dropped[:, :-1] * dropped[:, 1:]).mean().item()
    assert both == pytest.approx(0.01, abs=0.001)


def test_masks_are_reproducible_by_seed_and_differ_between_calls():
    torch.manual_seed(3)
    a, b = keep_mask((64, 33), 0.1, torch.float32), keep_mask((64, 33), 0.1, torch.float32)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((64, 33), 0.1, torch.float32), a)
    assert not torch.equal(a, b)


def test_odd_sizes_and_bf16():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.bfloat16)  # 105 elements: not a multiple of 4
    y = Dropout(0.1, "random_bits")(x)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    kept = y != 0
    # The scale is a bf16 number in a bf16 mask (nn.Dropout's bf16 masks round it the same way).
    scale = torch.tensor(1 / (1 - effective_p(0.1)), dtype=torch.bfloat16)
    assert torch.equal(y[kept], x[kept] * scale)


def test_gradient_is_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(50, 40, requires_grad=True)
    y = Dropout(0.2, "random_bits")(x)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    mask = torch.where(x != 0, y / x, 0.0).detach()  # the scaled keep mask actually applied
    torch.testing.assert_close(x.grad, upstream * mask)


def test_identity_in_eval_and_at_p0():
    x = torch.randn(10, 10)
    for masks in ("auto", "random_bits", "bernoulli"):
        assert Dropout(0.5, masks).eval()(x) is x
        assert Dropout(0.0, masks)(x) is x


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)
    with pytest.raises(ValueError, match="dropout_masks"):
        Dropout(0.1, "fancy")


@pytest.mark.parametrize("masks, reference", [
    ("random_bits", lambda x: x * keep_mask(x.shape, 0.1, x.dtype)),
    ("auto", lambda x: x * keep_mask(x.shape, 0.1, x.dtype)),  # on CPU
    ("bernoulli", lambda x: F.dropout(x, 0.1, training=True)),
])
def test_masks_setting_picks_the_generator(masks, reference):
    x = torch.randn(300, 200)
    torch.manual_seed(5)
    expected = reference(x)
    torch.manual_seed(5)
    torch.testing.assert_close(Dropout(0.1, masks)(x), expected)


def test_written_out_attention_matches_sdpa_without_dropout():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 6, 9, 64).unbind(0)
    keys = torch.rand(2, 1, 1, 9) > 0.3
    keys[..., 0] = True  # every row attends to something, as with real sources
    torch.testing.assert_close(attention_with_dropout(q, k, v, keys, False, 0.0),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=keys))
    torch.testing.assert_close(attention_with_dropout(q, k, v, None, True, 0.0),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_attention_dropout_drops_probabilities():
    """With dropout the rows of the (dropped) attention no longer sum to one, but in expectation
    they do: attend to v = ones and average over many draws."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 6, 200, 16).unbind(0)
    out = attention_with_dropout(q, k, torch.ones(1, 6, 200, 1), None, False, 0.1)
    assert out.std().item() > 0.01  # masks applied per probability
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)


def test_models_with_either_masks_agree_without_dropout():
    """The mask implementation changes training noise only: same weights, same outputs."""
    cfg = dict(vocab_size=40, d_model=16, num_heads=2, head_dim=8, encoder_layers=1,
               decoder_layers=1, mlp_dim=32, dropout=0.1, max_source_len=9)
    torch.manual_seed(0)
    ours = TigerSeq2Seq(Seq2SeqConfig(**cfg, dropout_masks="random_bits"))
    reference = TigerSeq2Seq(Seq2SeqConfig(**cfg, dropout_masks="bernoulli"))
    reference.load_state_dict(ours.state_dict())
    source = torch.randint(3, 40, (4, 9))
    pad = torch.zeros(4, 9, dtype=torch.bool)
    pad[0, :3] = True
    target = torch.randint(3, 40, (4, 5))
    torch.testing.assert_close(ours.eval()(source, pad, target), reference.eval()(source, pad, target))
    ours.train()
    assert not torch.allclose(ours(source, pad, target), reference.eval()(source, pad, target))
