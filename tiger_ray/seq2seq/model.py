"""TIGER's sequence-to-sequence model: a small encoder-decoder Transformer over Semantic-ID tokens.

The encoder reads ``[user token] + 4 tokens per history item``; the decoder emits the next item's
4 tokens, one code per step (paper Sec. 3.2, sizes from Sec. 4: 4 + 4 layers, 6 heads of 64,
d_model 128, MLP 1024, ReLU, dropout 0.1). Design choices, all for speed and simplicity:

- pre-norm residual blocks, ``F.scaled_dot_product_attention`` (fused kernels on CPU and GPU);
- on CPU, dropout masks from random bits rather than one Bernoulli draw per element
  (``dropout.py``); in training the attention is then written out so its probabilities get the
  same cheap masks;
- attention projects d_model -> heads x head_dim -> d_model (6 x 64 = 384 != 128 in the paper);
- learned absolute positions; encoder positions count back from the newest token, so "the last
  item" has the same position whatever the history length or the padding side;
- ``encoder_attention="item_causal"`` (all-positions training, ``data.training_windows``): a
  token sees its own item, earlier items and the user token, and positions count forward from the
  oldest token, so every prefix of a source is encoded exactly as if it were the whole source;
  the decoder of target k then reads only the first ``visible[k]`` source tokens (its history),
  so one encoder pass trains every target of a user;
- decoding (``decode_step``): the cross-attention keys/values of the encoder output are computed
  once per user (``memory_kv``) and shared by all beams, which are folded into the query axis of
  the cross-attention, so nothing is copied per beam; self-attention keeps a k/v cache, so each
  step runs one new token per beam.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tiger_ray import atomic
from tiger_ray.semantic_ids.table import CODE_COLUMNS, SemanticIds
from tiger_ray.seq2seq.cold_items import save_cold_items
from tiger_ray.seq2seq.dropout import Dropout, DropoutMasks, random_bits_dropout, uses_random_bits
from tiger_ray.seq2seq.tokenizer import PAD, SemanticIdTokenizer


@dataclass
class Seq2SeqConfig:
    vocab_size: int = field(default=0, metadata={"help": "filled from the tokenizer", "cli": False})
    d_model: int = field(default=128, metadata={"help": "embedding / residual width"})
    num_heads: int = field(default=6, metadata={"help": "attention heads"})
    head_dim: int = field(default=64, metadata={"help": "width of each attention head"})
    encoder_layers: int = field(default=4, metadata={"help": "encoder blocks"})
    decoder_layers: int = field(default=4, metadata={"help": "decoder blocks"})
    mlp_dim: int = field(default=1024, metadata={"help": "hidden width of the feed-forward blocks"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings, attention, MLP"})
    max_source_len: int = field(default=81, metadata={"help": "1 user token + 4 x 20 history items"})
    max_target_len: int = field(default=5, metadata={"help": "BOS + 4 code tokens"})
    activation: Literal["relu", "gelu"] = field(default="relu", metadata={"help": "MLP activation"})
    tie_embeddings: bool = field(default=False, metadata={"help": "share input embedding and output layer"})
    norm_eps: float = field(default=1e-6, metadata={"help": "LayerNorm epsilon"})
    dropout_masks: DropoutMasks = field(default="auto", metadata={
        "help": "random_bits: masks from 16-bit slices of random words (p rounded to 1/65536); "
                "bernoulli: F.dropout and SDPA's attention dropout; auto: random_bits on CPU"})
    encoder_attention: Literal["bidirectional", "item_causal"] = field(default="bidirectional", metadata={
        "help": "bidirectional: every source token sees all others (the paper); item_causal: its "
                "own item, earlier items and the user token, positions counted from the oldest "
                "token (all-positions training)"})


def item_causal_mask(back: torch.Tensor, real: torch.Tensor, tokens_per_item: int) -> torch.Tensor:
    """[B, 1, S, S] bool, True = attend: a query sees the real tokens of its own item and of older
    ones. ``back`` [B, S] counts tokens back from the newest (0), so ``back // tokens_per_item``
    numbers items from the newest whether or not a user token leads; the user token is then the
    oldest "item", seen by all. Padding queries (back 0) see every real token, so no row is empty."""
    item = torch.div(back, tokens_per_item, rounding_mode="floor")
    return (real[:, None, :] & (item[:, None, :] >= item[:, :, None]))[:, None]


def attention_with_dropout(q, k, v, mask, is_causal: bool, p: float) -> torch.Tensor:
    """Attention written out, for training: SDPA applies its attention dropout with bernoulli_
    masks (and on CPU leaves its fused kernel for it), so we drop the probabilities ourselves."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if is_causal:
        T, S = scores.shape[-2:]
        future = torch.ones(T, S, dtype=torch.bool, device=scores.device).triu_(S - T + 1)
        scores = scores.masked_fill(future, float("-inf"))
    return random_bits_dropout(scores.softmax(-1), p) @ v


class Attention(nn.Module):
    """Multi-head attention d_model -> H x Dh -> d_model; self-attention uses one fused QKV matmul."""

    def __init__(self, cfg: Seq2SeqConfig, cross: bool):
        super().__init__()
        self.h, self.dh, self.cross, self.p = cfg.num_heads, cfg.head_dim, cross, cfg.dropout
        self.masks = cfg.dropout_masks
        inner = cfg.num_heads * cfg.head_dim
        if cross:
            self.q = nn.Linear(cfg.d_model, inner, bias=False)
            self.kv = nn.Linear(cfg.d_model, 2 * inner, bias=False)
        else:
            self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.out = nn.Linear(inner, cfg.d_model, bias=False)

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H*Dh] -> [B, H, T, Dh]
        return x.unflatten(-1, (self.h, self.dh)).transpose(1, 2)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self.heads(k), self.heads(v)

    def forward(self, x, mask=None, is_causal=False, kv=None, cache=None):
        """x [B, T, D]; mask [B, 1, 1, S] bool, True = attend; ``kv`` precomputed (k, v) for
        cross-attention; ``cache`` earlier (k, v) for incremental self-attention.
        Returns (output [B, T, D], (k, v) to cache)."""
        if self.cross:
            q = self.heads(self.q(x))
            k, v = kv
        else:
            q, k, v = map(self.heads, self.qkv(x).chunk(3, dim=-1))
            if cache is not None:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        if self.training and self.p > 0 and uses_random_bits(self.masks, q.device):
            y = attention_with_dropout(q, k, v, mask, is_causal, self.p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               dropout_p=self.p if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_dim, bias=False)
        self.down = nn.Linear(cfg.mlp_dim, cfg.d_model, bias=False)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()
        self.drop = Dropout(cfg.dropout, cfg.dropout_masks)

    def forward(self, x):
        return self.down(self.drop(self.act(self.up(x))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.attn = Attention(cfg, cross=False)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.mlp = MLP(cfg)
        self.drop = Dropout(cfg.dropout, cfg.dropout_masks)

    def forward(self, x, mask):
        x = x + self.drop(self.attn(self.norm1(x), mask=mask)[0])
        return x + self.drop(self.mlp(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.self_attn = Attention(cfg, cross=False)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.cross_attn = Attention(cfg, cross=True)
        self.norm3 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.mlp = MLP(cfg)
        self.drop = Dropout(cfg.dropout, cfg.dropout_masks)

    def forward(self, x, kv, mask, cache=None):
        """x [B, K, T, D]: K target sequences (beams) per source row share its memory ``kv``.
        With ``cache`` (self-attention k, v of the earlier positions, [B*K, H, t, Dh]) x holds
        only the new position. Returns (x, cache extended by these positions)."""
        B, K, T, D = x.shape
        # Causal self-attention within each sequence; targets are never padded, so no mask.
        # A new position attends to everything cached, so the incremental step needs no mask.
        y, cache = self.self_attn(self.norm1(x).view(B * K, T, D), cache=cache,
                                  is_causal=cache is None and T > 1)
        x = x + self.drop(y.view(B, K, T, D))
        # Cross-attention with the K x T queries of a row stacked: one memory read for all beams.
        y, _ = self.cross_attn(self.norm2(x).view(B, K * T, D), mask=mask, kv=kv)
        x = x + self.drop(y.view(B, K, T, D))
        return x + self.drop(self.mlp(self.norm3(x))), cache


class TigerSeq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("Seq2SeqConfig.vocab_size must be set (from SemanticIdTokenizer.vocab_size)")
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model, padding_idx=PAD)
        self.source_pos = nn.Embedding(c.max_source_len, c.d_model)
        self.target_pos = nn.Embedding(c.max_target_len, c.d_model)
        self.drop = Dropout(c.dropout, c.dropout_masks)
        self.encoder = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))
        self.encoder_norm = nn.LayerNorm(c.d_model, eps=c.norm_eps, bias=False)
        self.decoder = nn.ModuleList(DecoderLayer(c) for _ in range(c.decoder_layers))
        self.decoder_norm = nn.LayerNorm(c.d_model, eps=c.norm_eps, bias=False)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.apply(self._init_weights)
        # Residual outputs start small so the deep stack begins close to the identity (GPT-2).
        depth = c.encoder_layers + c.decoder_layers
        for name, p in self.named_parameters():
            if name.endswith(("out.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- encoder -----------------------------------------------------------------------------
    def encode(self, source: torch.Tensor, source_pad: torch.Tensor) -> torch.Tensor:
        """source [B, S] tokens, source_pad [B, S] True at padding -> memory [B, S, D]."""
        if source.shape[1] > self.config.max_source_len:
            raise ValueError(f"source length {source.shape[1]} > max_source_len {self.config.max_source_len}")
        real = ~source_pad
        # Position 0 = newest real token, counting back; padding (either side) gets position 0.
        back = (real.flip(1).cumsum(1).flip(1) - 1).clamp_(min=0)
        if self.config.encoder_attention == "item_causal":
            # Counted forward, a token's position does not depend on what follows it.
            pos = (real.cumsum(1) - 1).clamp_(min=0)
            mask = item_causal_mask(back, real, self.config.max_target_len - 1)  # BOS + an item
        else:
            pos = back
            mask = real[:, None, None, :]  # [B, 1, 1, S] broadcast over heads and queries
        x = self.drop(self.embed(source) + self.source_pos(pos))
        for layer in self.encoder:
            x = layer(x, mask)
        return self.encoder_norm(x)

    def memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of every decoder layer, computed once per source."""
        return [layer.cross_attn.keys_values(memory) for layer in self.decoder]

    # ---- decoder -----------------------------------------------------------------------------
    def decode(self, memory: torch.Tensor, source_pad: torch.Tensor, target_in: torch.Tensor,
               memory_kv: list | None = None, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for target_in [B, T] (teacher forcing), or [B, K, T, V] for K
        sequences per source row [B, K, T] (e.g. scoring candidate IDs, or all-positions
        training). ``visible`` [B, K]: sequence k reads only the first visible[b, k] source tokens
        (its history in an all-positions window; the item-causal encoder only)."""
        beams = target_in.dim() == 3
        if not beams:
            target_in = target_in[:, None, :]
        T = target_in.shape[-1]
        if T > self.config.max_target_len:
            raise ValueError(f"target length {T} > max_target_len {self.config.max_target_len}")
        if memory_kv is None:
            memory_kv = self.memory_kv(memory)
        x = self.drop(self.embed(target_in) + self.target_pos.weight[:T])
        mask = (~source_pad)[:, None, None, :]
        if visible is not None:
            if self.config.encoder_attention != "item_causal":
                raise ValueError("per-target visible prefixes need encoder_attention='item_causal': "
                                 "a bidirectional encoder mixes later items into earlier tokens")
            prefix = torch.arange(source_pad.shape[1], device=visible.device) < visible[..., None]
            mask = mask & prefix.repeat_interleave(T, dim=1)[:, None]  # [B, 1, K*T, S], k-major
        for layer, kv in zip(self.decoder, memory_kv):
            x, _ = layer(x, kv, mask)
        logits = self.lm_head(self.decoder_norm(x))
        return logits if beams else logits[:, 0]

    def decode_step(self, memory_kv: list, source_pad: torch.Tensor, tokens: torch.Tensor,
                    cache: list | None = None, vocab_slice: slice | None = None
                    ) -> tuple[torch.Tensor, list]:
        """One incremental decoding step for K beams per source row: tokens [B, K] are the newest
        target tokens; ``cache`` holds every layer's self-attention (k, v) [B*K, H, t, Dh] of the
        t earlier positions (None at the first step). Returns (logits [B, K, V], new cache).
        ``vocab_slice`` computes only those logits (e.g. the one code range that can come next).
        Beam search reorders the cache between steps with ``reorder_cache``."""
        t = 0 if cache is None else cache[0][0].shape[2]
        if t >= self.config.max_target_len:
            raise ValueError(f"target length {t + 1} > max_target_len {self.config.max_target_len}")
        x = self.drop(self.embed(tokens) + self.target_pos.weight[t])[:, :, None]  # [B, K, 1, D]
        mask = (~source_pad)[:, None, None, :]
        new_cache = []
        for i, (layer, kv) in enumerate(zip(self.decoder, memory_kv)):
            x, layer_cache = layer(x, kv, mask, cache=None if cache is None else cache[i])
            new_cache.append(layer_cache)
        weight = self.lm_head.weight if vocab_slice is None else self.lm_head.weight[vocab_slice]
        return F.linear(self.decoder_norm(x[:, :, 0]), weight), new_cache

    @staticmethod
    def reorder_cache(cache: list, index: torch.Tensor) -> list:
        """Keep cache rows ``index`` (flat beam ids into [B*K]), e.g. the parents of new beams."""
        return [(k.index_select(0, index), v.index_select(0, index)) for k, v in cache]

    def forward(self, source, source_pad, target_in, visible=None):
        return self.decode(self.encode(source, source_pad), source_pad, target_in, visible=visible)

    def loss(self, source, source_pad, target_in, target_out, visible=None) -> torch.Tensor:
        """Mean token cross-entropy under teacher forcing (target_in = [BOS, t0, t1, t2]); PAD
        targets (empty slots of an all-positions window) are left out."""
        logits = self.forward(source, source_pad, target_in, visible)
        return F.cross_entropy(logits.flatten(0, -2).float(), target_out.flatten(), ignore_index=PAD)


# ---- checkpoints: model.pt (state dict) + config.json + the Semantic-ID table it was trained on --
MODEL_FILE, CONFIG_FILE, SEMANTIC_IDS_FILE = "model.pt", "config.json", "semantic_ids.parquet"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (``.module``) and/or torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def save_model(directory: str | Path, model: nn.Module, config: Seq2SeqConfig,
               tokenizer: SemanticIdTokenizer, extra: dict | None = None,
               cold_items: np.ndarray | None = None) -> Path:
    """Write a self-contained model directory; config.json goes last, so it marks completeness.
    The Semantic-ID table goes with the weights as codes.npy + its sorted-key index (12 B/item,
    memory-mapped by every process that loads the model). ``cold_items``: items held out of
    training for the cold-start evaluation (see cold_start.py)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sids = tokenizer.semantic_ids
    if sids.dense:
        sids.save(directory)
    else:  # a table over sparse item ids (tests, hand-made tables): the Parquet form
        import pyarrow as pa

        atomic.write_parquet(directory / SEMANTIC_IDS_FILE, pa.table(
            {"item_id": sids.item_ids, **{c: sids.codes[:, j] for j, c in enumerate(CODE_COLUMNS)}}))
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    with atomic.atomic_path(directory / MODEL_FILE) as tmp:
        torch.save(state, tmp)
    if cold_items is not None:
        save_cold_items(directory, cold_items)
    atomic.write_json(directory / CONFIG_FILE, {
        "model": dataclasses.asdict(config),
        "tokenizer": tokenizer.state(),
        "extra": extra or {},
    })
    return directory


def _load_semantic_ids(directory: Path, codebook_sizes: tuple[int, ...]) -> SemanticIds:
    """The model's Semantic-ID table: memory-mapped codes.npy, or the Parquet of older models."""
    from tiger_ray.semantic_ids.table import META_FILE, read_parquet_table

    if (directory / META_FILE).exists():
        return SemanticIds.open(directory, codebook_size=codebook_sizes[0])
    if (directory / SEMANTIC_IDS_FILE).exists():
        legacy = read_parquet_table(directory / SEMANTIC_IDS_FILE, codebook_sizes[0])
        return SemanticIds(item_ids=legacy.item_ids, codes=legacy.codes, codebook_sizes=codebook_sizes)
    raise FileNotFoundError(f"{directory / META_FILE} does not exist; run `tiger train-seq2seq` to "
                            f"produce a model directory")


def load_model(directory: str | Path, map_location: str | torch.device = "cpu"
               ) -> tuple[TigerSeq2Seq, SemanticIdTokenizer]:
    """Inverse of ``save_model``: (model in eval mode, tokenizer); config is ``model.config``."""
    from tiger_ray.config import from_dict

    directory = Path(directory)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name} does not exist; "
                                    f"run `tiger train-seq2seq` to produce a model directory")
    saved = atomic.read_json(directory / CONFIG_FILE)
    config = from_dict(Seq2SeqConfig, saved["model"])
    tok_state = saved["tokenizer"]
    sids = _load_semantic_ids(directory, tuple(int(s) for s in tok_state["codebook_sizes"]))
    tokenizer = SemanticIdTokenizer.from_state(tok_state, sids)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"{directory / CONFIG_FILE}: tokenizer vocabulary {tokenizer.vocab_size} != "
                         f"model vocab_size {config.vocab_size}")
    model = TigerSeq2Seq(config)
    model.load_state_dict(torch.load(directory / MODEL_FILE, map_location=map_location, weights_only=True))
    return model.to(map_location).eval(), tokenizer
