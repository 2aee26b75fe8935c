"""The dual-encoder baseline: a SASRec-style query tower and an ID + text item tower.

    item tower   v_i = E_id[i] + W * text_i                (text_i: the item's `tiger embed` vector)
    query tower  q   = causal self-attention over the last <= max_history item vectors of the
                       history (oldest first at position 0, padding after), read out at the
                       newest item's position (+ an optional user embedding)
    score        s(q, i) = <q, v_i> / temperature          (both L2-normalised when `normalize`)

Training is SASRec's: because attention is causal and positions count from the window's start,
one pass over a user's window yields the query of every prefix at once, so every position with a
next item is a training example (the same prefix -> next-item pairs as ``build_examples``).

Because the text path is part of every item vector, an item never seen in training still gets a
meaningful vector; ID dropout during training makes the text path carry weight on its own.
Retrieval is maximum inner product search over the item vectors (FAISS, see ``ann_index.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tiger_ray.baseline import losses
from tiger_ray.mapped import release


@dataclass
class DualEncoderConfig:
    num_items: int  # catalog size N; item ids are 1..N, 0 is padding
    text_dim: int = 0  # width of the text embeddings; 0 = ID embeddings only
    num_users: int = 0  # > 0 adds a user embedding to the query (user index 1..num_users, 0 unknown)
    dim: int = 64
    max_history: int = 20
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.2
    id_dropout: float = 0.1  # probability of dropping an item's ID embedding in training
    normalize: bool = True  # cosine scores (unit vectors) divided by temperature
    temperature: float = 0.05
    # ID embedding rows; 0 = one per item (N+1). Fewer rows hash ids into them (id % (rows-1) + 1)
    # so a 10M-item catalog's ID table (and its optimiser state) stays bounded per worker.
    id_rows: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class SelfAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: causal multi-head attention, then a position-wise MLP."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(dim, dim=2)
        q, k, v = (t.view(b, length, self.num_heads, dim // self.num_heads).transpose(1, 2)
                   for t in (q, k, v))
        # Causal: position j sees items 0..j. Padding comes after the real items, so real positions
        # never see it and no key-padding mask is needed.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.dropout(self.proj(y.transpose(1, 2).reshape(b, length, dim)))
        return x + self.dropout(self.mlp(self.ln2(x)))


class DualEncoder(nn.Module):
    def __init__(self, config: DualEncoderConfig, text_embeddings: torch.Tensor | None = None):
        """``text_embeddings`` is [N+1, text_dim] (row 0 zero). It is needed to compute item vectors
        (training, index building) but not to encode queries from a precomputed item table."""
        super().__init__()
        self.config = c = config
        self.item_id = nn.Embedding(c.id_rows or c.num_items + 1, c.dim, padding_idx=0)
        self.text_proj = nn.Linear(c.text_dim, c.dim) if c.text_dim else None
        # A numpy array (the memory-mapped RUN/embeddings/vectors.npy) is indexed per batch, so
        # no process copies the matrix; a tensor is a buffer (small catalogs, tests).
        self.text_store = text_embeddings if isinstance(text_embeddings, np.ndarray) else None
        # Not persistent: the text matrix comes from RUN/embeddings, checkpoints stay small.
        self.register_buffer("text", None if text_embeddings is None or self.text_store is not None
                             else text_embeddings.float(), persistent=False)
        if text_embeddings is not None and tuple(text_embeddings.shape) != (c.num_items + 1, c.text_dim):
            raise ValueError(f"text_embeddings must be [{c.num_items + 1}, {c.text_dim}], "
                             f"got {tuple(text_embeddings.shape)}")
        self.position = nn.Embedding(c.max_history, c.dim)
        self.user = nn.Embedding(c.num_users + 1, c.dim, padding_idx=0) if c.num_users else None
        self.input_dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(SelfAttentionBlock(c.dim, c.num_heads, c.dropout)
                                    for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.dim)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

    # ------------------------------------------------------------------ item tower

    def id_row(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.item_id.num_embeddings
        if rows == self.config.num_items + 1:
            return ids
        return torch.where(ids == 0, ids, (ids - 1) % (rows - 1) + 1)

    def text_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        if self.text is not None:
            return self.text[ids]
        rows = np.array(self.text_store[ids.cpu().numpy()], dtype=np.float32)
        # The rows are copied; the mapped pages read need not stay resident (over an epoch they
        # would make the whole 10M-item table part of this process's RSS).
        release(self.text_store)
        return torch.from_numpy(rows).to(ids.device)

    def item_repr(self, ids: torch.Tensor) -> torch.Tensor:
        """Unnormalised item representations [..., dim]; padding (id 0) maps to zeros."""
        x = self.item_id(self.id_row(ids))
        if self.training and self.config.id_dropout > 0:
            keep = torch.rand(ids.shape, device=ids.device) >= self.config.id_dropout
            x = x * keep.unsqueeze(-1)
        if self.text_proj is not None:
            if self.text is None and self.text_store is None:
                raise RuntimeError("this DualEncoder was built without text embeddings; "
                                   "pass an item table to encode_queries instead")
            x = x + self.text_proj(self.text_vectors(ids)) * (ids != 0).unsqueeze(-1)
        return x

    def item_table(self) -> torch.Tensor:
        """[N+1, dim] representations of every item (row 0 zero); the query tower's input."""
        return self.item_repr(torch.arange(self.config.num_items + 1, device=self.item_id.weight.device))

    def score_vectors(self, reprs: torch.Tensor) -> torch.Tensor:
        """Vectors whose inner product is the score (up to the temperature)."""
        return F.normalize(reprs, dim=-1) if self.config.normalize else reprs

    def scale(self) -> float:
        return 1.0 / self.config.temperature if self.config.normalize else 1.0

    # ------------------------------------------------------------------ query tower

    def encode_positions(self, history: torch.Tensor, users: torch.Tensor | None = None,
                         table: torch.Tensor | None = None) -> torch.Tensor:
        """Query vectors at every position [B, L, dim] of left-aligned histories [B, L] (0 = padding
        after the items): row b, position j is the query for the prefix history[b, :j+1].

        ``table`` is a precomputed ``item_table()`` (inference); without it the history items go
        through the item tower (training, so gradients reach it).
        """
        c = self.config
        if history.shape[1] > c.max_history:
            raise ValueError(f"history must be [B, <= {c.max_history}], got {tuple(history.shape)}")
        x = table[history] if table is not None else self.item_repr(history)
        x = self.input_dropout(x + self.position.weight[: history.shape[1]])
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.user is not None and users is not None:
            x = x + self.user(users).unsqueeze(1)
        return self.score_vectors(x)

    def encode_queries(self, history: torch.Tensor, users: torch.Tensor | None = None,
                       table: torch.Tensor | None = None) -> torch.Tensor:
        """One query vector [B, dim] per left-aligned history [B, L]: the newest item's position."""
        last = ((history != 0).sum(dim=1) - 1).clamp(min=0)  # an empty history reads position 0
        # Only the read-out position is needed: keep the batch's columns up to the longest history.
        width = max(int(last.max()) + 1, 1) if len(last) else 1
        x = self.encode_positions(history[:, :width], users, table)
        return x[torch.arange(len(history), device=x.device), last]

    # ------------------------------------------------------------------ training

    def forward(self, history: torch.Tensor, users: torch.Tensor | None, targets: torch.Tensor,
                loss: str = "full", log_q: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss of a batch of windows: history [B, L], targets [B, L] where targets[b, j]
        is the item after history[b, :j+1] (0 = no example at that position).

        ``loss="full"`` is a softmax over the whole catalog; ``"in_batch"`` a sampled softmax whose
        negatives are the other targets of the batch, corrected by ``log_q`` (log sampling
        probability per item id) when given.
        """
        has_target = targets != 0
        targets = targets[has_target]
        if loss == "full":
            table = self.item_table()  # every item once: inputs and candidates share it
            queries = self.encode_positions(history, users, table=table)[has_target]  # [M, dim]
            return losses.full_softmax_loss(queries, self.score_vectors(table), targets, scale=self.scale())
        if loss == "in_batch":
            queries = self.encode_positions(history, users)[has_target]
            items = self.score_vectors(self.item_repr(targets))
            return losses.in_batch_softmax_loss(queries, items, targets, log_q=log_q, scale=self.scale())
        raise ValueError(f"loss must be 'full' or 'in_batch', got {loss!r}")


def pad_histories(histories: list[np.ndarray], max_history: int) -> np.ndarray:
    """Left-aligned [B, max_history] int64 matrix of the last ``max_history`` items, 0-padded after."""
    out = np.zeros((len(histories), max_history), dtype=np.int64)
    for row, items in enumerate(histories):
        items = np.asarray(items, dtype=np.int64)[-max_history:]
        out[row, :len(items)] = items
    return out


def pad_examples(offsets: np.ndarray, flat: np.ndarray, max_history: int) -> np.ndarray:
    """``pad_histories`` for histories stored flat with offsets (vectorised; for ~1e5+ examples)."""
    lengths = np.minimum(np.diff(offsets), max_history)
    out = np.zeros((len(lengths), max_history), dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, within] = flat[np.repeat(offsets[1:] - lengths, lengths) + within]
    return out


def training_windows(parts: list[np.ndarray], max_history: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows covering every (prefix -> next item) example of each user's training part once.

    Returns (histories [W, L], targets [W, L], part index [W]). A part of m items has m - 1
    examples; if m - 1 <= L one window holds them all with their full history. Longer parts are cut
    into windows of L items that overlap by L // 2; a target is counted only in the first window
    that holds it, so each example keeps at least L // 2 items of history (at most L, as
    ``build_examples(max_history=L)`` keeps), and no example is counted twice.
    """
    length = max_history
    histories, targets, owners = [], [], []
    for owner, part in enumerate(parts):
        m = len(part)
        covered = 0  # examples (target indices 1..covered) already emitted
        start = 0
        while covered < m - 1:
            start = max(0, min(start, m - 1 - length))
            end = min(start + length, m - 1)  # inputs part[start:end] -> targets part[start+1:end+1]
            h = np.zeros(length, dtype=np.int64)
            t = np.zeros(length, dtype=np.int64)
            h[: end - start] = part[start:end]
            t[: end - start] = part[start + 1:end + 1]
            t[: max(0, covered - start)] = 0  # targets an earlier window already counted
            histories.append(h)
            targets.append(t)
            owners.append(owner)
            covered = end
            start = end - length // 2
    if not histories:
        return (np.zeros((0, length), np.int64), np.zeros((0, length), np.int64), np.zeros(0, np.int64))
    return np.stack(histories), np.stack(targets), np.asarray(owners, dtype=np.int64)


def text_matrix(item_ids: np.ndarray, vectors: np.ndarray, num_items: int) -> torch.Tensor:
    """[N+1, dim] text embedding table indexed by item id; checks every catalog item has one."""
    if len(item_ids) != num_items or not np.array_equal(np.sort(item_ids), np.arange(1, num_items + 1)):
        missing = np.setdiff1d(np.arange(1, num_items + 1), item_ids)[:5].tolist()
        raise ValueError(f"embeddings cover {len(item_ids)} items but the catalog has {num_items} "
                         f"(ids 1..{num_items}); e.g. missing item_id {missing}")
    table = np.zeros((num_items + 1, vectors.shape[1]), dtype=np.float32)
    table[item_ids] = vectors
    return torch.from_numpy(table)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

