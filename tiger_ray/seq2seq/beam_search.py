"""Trie-constrained beam search over Semantic IDs: every returned ID is a real item.

At step d each live beam may only extend its prefix with a code that some item's ID has next
(``SemanticIdTrie.allowed_mask``), so after 4 steps every beam is an item (invalid-ID rate 0;
the paper reports 0.1-1.6% invalid IDs from unconstrained decoding). Scores are summed
log-probabilities; each step's softmax runs over the codes of that position (the only tokens
that can form an ID there), so the output layer computes 256 logits per beam, not the whole
vocabulary.

The encoder and the cross-attention keys/values run once per user; beams only add queries (see
``TigerSeq2Seq.decode_step``), and each step feeds one new token per beam against a cached
self-attention prefix, reordered to the surviving beams' parents. Step 0 has one beam per user,
so nothing is expanded before the first branching.

``temperature > 0`` switches to sampling without replacement (Stochastic Beam Search, Kool et al.
2019: Gumbel-top-k on the sequence tree), the diverse decoding of the paper's Entropy@K
experiment. Each step samples from the temperature-scaled distribution renormalised over the
allowed codes (constrained sampling: masked logits, then softmax), and the sampled items are
returned ordered by their log-probability under that distribution. ``renormalize=True`` gives the
deterministic search the same per-step renormalisation (its T -> 0 limit); by default beam search
ranks by the model's own joint probability, which does not favour prefixes with few items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tiger_ray.seq2seq.model import TigerSeq2Seq
from tiger_ray.seq2seq.tokenizer import BOS
from tiger_ray.seq2seq.trie import SemanticIdTrie


@dataclass
class BeamResult:
    items: torch.Tensor  # [B, K] item ids, best first; -1 where fewer than K items exist
    tokens: torch.Tensor  # [B, K, L] vocabulary ids of each beam's ID
    scores: torch.Tensor  # [B, K] summed log-probabilities, -inf for empty slots


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _gumbel_keys(phi: torch.Tensor, parent_keys: torch.Tensor, generator) -> torch.Tensor:
    """Perturbed keys of children given their parents' keys (Kool et al. 2019, Appendix B).

    phi [B, K, C] children's log-probabilities (-inf = not allowed), parent_keys [B, K]. Children's
    Gumbels are conditioned so that their maximum equals the parent's key, which makes top-k over
    all children a sample without replacement of whole sequences.
    """
    u = torch.rand(phi.shape, generator=generator, device=phi.device).clamp_(1e-20, 1.0)
    g = phi - torch.log(-torch.log(u))
    z = g.max(dim=-1, keepdim=True).values
    t = parent_keys[..., None]
    v = t - g + _log1mexp(g - z)
    keys = t - v.clamp(min=0) - torch.log1p(torch.exp(-v.abs()))
    return torch.where(torch.isfinite(phi) & torch.isfinite(t), keys, -torch.inf)


@torch.no_grad()
def beam_search(model: TigerSeq2Seq, trie: SemanticIdTrie, token_offsets, source: torch.Tensor,
                source_pad: torch.Tensor, beam_size: int = 20, temperature: float = 0.0,
                generator: torch.Generator | None = None, renormalize: bool = False) -> BeamResult:
    """Top ``beam_size`` item IDs per source row under the trie constraint.

    token_offsets[p]: vocabulary id of code 0 at position p (``SemanticIdTokenizer.offsets``).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    sampling = temperature > 0
    device = source.device
    B = source.shape[0]
    memory = model.encode(source, source_pad)
    kv = model.memory_kv(memory)

    tokens = torch.full((B, 1, 1), BOS, dtype=torch.long, device=device)  # BOS + chosen tokens
    nodes = torch.zeros(B, 1, dtype=torch.long, device=device)  # the root
    scores = torch.zeros(B, 1, device=device)
    keys = torch.zeros(B, 1, device=device)  # what top-k ranks: scores, or perturbed scores
    cache = None
    for level in range(trie.depth):
        K, size, lo = nodes.shape[1], trie.codebook_sizes[level], int(token_offsets[level])
        logits, cache = model.decode_step(kv, source_pad, tokens[:, :, -1], cache,
                                          vocab_slice=slice(lo, lo + size))
        logits = logits.float()
        if sampling:
            logits = logits / temperature
        allowed = trie.allowed_mask(nodes.flatten(), level).view(B, K, size)
        if sampling or renormalize:  # softmax over the allowed codes only
            logits = logits.masked_fill(~allowed, -torch.inf)
        logp = torch.log_softmax(logits, dim=-1)  # over this position's code range
        phi = torch.where(allowed, scores[..., None] + logp, -torch.inf)  # [B, K, size]
        cand = _gumbel_keys(phi, keys, generator) if sampling else phi
        width = min(beam_size, K * size)
        keys, flat = cand.flatten(1).topk(width, dim=1)  # sorted, best first
        parent, code = flat // size, flat % size
        scores = phi.flatten(1).gather(1, flat)
        alive = torch.isfinite(keys)  # fewer allowed candidates than beams: dead slots
        nodes = trie.child(nodes.gather(1, parent), level, code)
        nodes = torch.where(alive, nodes, -1)
        scores = torch.where(alive, scores, -torch.inf)
        prev = tokens.gather(1, parent[..., None].expand(-1, -1, tokens.shape[2]))
        tokens = torch.cat([prev, (lo + code)[..., None]], dim=2)
        if level + 1 < trie.depth:  # the new beams continue from their parents' cached prefix
            rows = (parent + torch.arange(B, device=device)[:, None] * K).flatten()
            cache = model.reorder_cache(cache, rows)

    tokens = tokens[:, :, 1:]  # drop BOS
    if sampling:  # a sample without replacement, shown best-scored first
        scores, order = scores.sort(dim=1, descending=True)
        nodes = nodes.gather(1, order)
        tokens = tokens.gather(1, order[..., None].expand_as(tokens))
    items = trie.items(nodes)
    if items.shape[1] < beam_size:  # tiny catalogs: pad to the requested width
        pad = beam_size - items.shape[1]
        items = torch.cat([items, items.new_full((B, pad), -1)], dim=1)
        scores = torch.cat([scores, scores.new_full((B, pad), -torch.inf)], dim=1)
        tokens = torch.cat([tokens, tokens.new_zeros((B, pad, tokens.shape[2]))], dim=1)
    return BeamResult(items=items, tokens=tokens, scores=scores)


@torch.no_grad()
def greedy_decode(model: TigerSeq2Seq, trie: SemanticIdTrie, token_offsets, source: torch.Tensor,
                  source_pad: torch.Tensor) -> BeamResult:
    """Constrained greedy decoding the plain way (full forward per step): the reference beam=1
    must reproduce."""
    B = source.shape[0]
    tokens = torch.full((B, 1), BOS, dtype=torch.long, device=source.device)
    nodes = torch.zeros(B, dtype=torch.long, device=source.device)
    score = torch.zeros(B, device=source.device)
    for level in range(trie.depth):
        size, lo = trie.codebook_sizes[level], int(token_offsets[level])
        logp = torch.log_softmax(model(source, source_pad, tokens)[:, -1, lo:lo + size].float(), dim=-1)
        logp = torch.where(trie.allowed_mask(nodes, level), logp, -torch.inf)
        best, code = logp.max(dim=1)
        score = score + best
        nodes = trie.child(nodes, level, code)
        tokens = torch.cat([tokens, (lo + code)[:, None]], dim=1)
    return BeamResult(items=trie.items(nodes)[:, None], tokens=tokens[:, None, 1:], scores=score[:, None])


def to_numpy(result: BeamResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return result.items.cpu().numpy(), result.tokens.cpu().numpy(), result.scores.cpu().numpy()
