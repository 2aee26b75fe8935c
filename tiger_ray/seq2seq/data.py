"""Training examples as token arrays, length-bucketed batches, rank sharding and fast collation.

Every prefix of each user's training part is one example (``build_examples(..., "train")``). We
tokenise them once into a flat int32 array plus offsets (a few bytes per token, no Python objects
per example), then each epoch:

1. shuffle all examples with a seed derived from (seed, epoch), cut the order into chunks of
   ``chunk_batches`` global batches, and sort each chunk by source length: batches then hold
   examples of (nearly) equal length, so padding to the batch maximum wastes almost nothing while
   the order stays random at the scale of a chunk;
2. shuffle the order of the batches, so long and short batches alternate across the epoch;
3. give each DDP rank the rows ``rank::world_size`` of every global batch: ranks step in lockstep
   (same number of batches, which DDP needs), the shards are disjoint and together complete, and a
   rank's rows have the same lengths as the global batch.

Everything is a function of (seed, epoch), so every rank computes the same plan without talking to
the others, and a resumed run replays exactly the batches it had not yet seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tiger_ray.data.split import Examples


@dataclass(frozen=True)
class TokenizedExamples:
    """Source token sequences (flat + offsets) and the 4 target tokens of every example."""

    source_flat: np.ndarray  # [total tokens] int32
    source_offsets: np.ndarray  # [E+1] int64; example i is source_flat[offsets[i]:offsets[i+1]]
    targets: np.ndarray  # [E, T] int32, the target item's Semantic-ID tokens
    user_ids: np.ndarray  # [E] int64

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.source_offsets)

    def subset(self, index: np.ndarray) -> "TokenizedExamples":
        """The examples at ``index`` (in that order), as a new compact TokenizedExamples."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return TokenizedExamples(
            source_flat=self.source_flat[_ranges(self.source_offsets[index], lengths)],
            source_offsets=offsets, targets=self.targets[index], user_ids=self.user_ids[index])

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"source_flat": self.source_flat, "source_offsets": self.source_offsets,
                "targets": self.targets, "user_ids": self.user_ids}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "TokenizedExamples":
        return cls(**{k: arrays[k] for k in ("source_flat", "source_offsets", "targets", "user_ids")})


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for every (s, n), without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    # Position within its own range = global position - where its range starts in the output.
    within = np.arange(total, dtype=np.int64) - np.repeat(ends - lengths, lengths)
    return np.repeat(starts, lengths) + within


def tokenize_examples(examples: Examples, tokenizer, chunk_size: int = 8192) -> TokenizedExamples:
    """Turn (history, target) item examples into token arrays with ``tokenizer``.

    The tokenizer is the one source of truth for the token layout: we let its vectorised
    ``encode_batch`` pad a chunk of examples and keep the non-padding tokens of each row.
    """
    n = len(examples)
    flats, lengths = [], []
    for lo in range(0, n, chunk_size):
        hi = min(lo + chunk_size, n)
        histories = [examples.history(i) for i in range(lo, hi)]
        source, pad = tokenizer.encode_batch(histories, examples.user_ids[lo:hi])
        flats.append(source[~pad].astype(np.int32))  # row-major: row by row, left to right
        lengths.append((~pad).sum(axis=1))
    lengths_arr = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths_arr, out=offsets[1:])
    flat = np.concatenate(flats) if flats else np.zeros(0, np.int32)
    targets = np.asarray(tokenizer.item_tokens(examples.targets), dtype=np.int32)
    return TokenizedExamples(source_flat=flat, source_offsets=offsets,
                             targets=targets.reshape(n, tokenizer.tokens_per_item),
                             user_ids=examples.user_ids.copy())


# ---------------------------------------------------------------- batching

def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def bucketed_batches(lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                     chunk_batches: int = 64, min_batch_size: int = 1) -> list[np.ndarray]:
    """One epoch of global batches (arrays of example indices) covering every example once.

    Examples are shuffled, cut into chunks of ``chunk_batches * batch_size``, sorted by length
    inside a chunk and cut into batches; the batch order is then shuffled. Only the last batch
    can be short; if it has fewer than ``min_batch_size`` examples (pass the world size, so no
    rank is ever left without a row) it joins the batch before it.
    """
    if batch_size < 1 or chunk_batches < 1:
        raise ValueError(f"batch_size and chunk_batches must be >= 1, got {batch_size}, {chunk_batches}")
    n = len(lengths)
    if n == 0:
        return []
    if n < min_batch_size:
        raise ValueError(f"{n} examples cannot feed {min_batch_size} ranks")
    rng = epoch_rng(seed, epoch)
    order = rng.permutation(n)
    chunk = batch_size * chunk_batches
    batches: list[np.ndarray] = []
    for lo in range(0, n, chunk):
        part = order[lo:lo + chunk]
        # Stable sort keeps the random order among equal lengths.
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    if len(batches) > 1 and len(batches[-1]) < min_batch_size:
        tail = batches.pop()
        batches[-1] = np.concatenate([batches[-1], tail])
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def shard_batch(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's rows of a global batch: strided, so shards are disjoint, complete and balanced."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return batch[rank::world_size]


# ---------------------------------------------------------------- collation

@dataclass
class Batch:
    source: torch.Tensor  # [B, S] int64 tokens, padded on the right with pad_id
    source_pad: torch.Tensor  # [B, S] bool, True at padding
    target_in: torch.Tensor  # [B, T] BOS + the first T-1 target tokens (teacher forcing)
    target_out: torch.Tensor  # [B, T] the T target tokens

    def __len__(self) -> int:
        return self.source.shape[0]

    @property
    def num_tokens(self) -> int:
        return int((~self.source_pad).sum()) + self.target_out.numel()

    def to(self, device: torch.device) -> "Batch":
        if device.type == "cpu":
            return self
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.source, self.source_pad, self.target_in, self.target_out)))


def pad_sources(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, max length] padded token matrix and its padding mask, with one vectorised gather."""
    width = int(lengths.max()) if len(lengths) else 0
    cols = np.arange(width, dtype=np.int64)
    pad = cols[None, :] >= lengths[:, None]
    # Padding positions read some valid index (0) and are overwritten by pad_id.
    positions = np.where(pad, 0, starts[:, None] + cols[None, :])
    tokens = np.where(pad, pad_id, flat[positions] if len(flat) else pad_id)
    return tokens, pad


def collate(data: TokenizedExamples, index: np.ndarray, *, pad_id: int, bos_id: int) -> Batch:
    """The padded tensors of examples ``index``; padding only up to this batch's longest source."""
    index = np.asarray(index, dtype=np.int64)
    starts = data.source_offsets[index]
    lengths = data.source_offsets[index + 1] - starts
    tokens, pad = pad_sources(data.source_flat, starts, lengths, pad_id)
    target_out = data.targets[index].astype(np.int64)
    target_in = np.empty_like(target_out)
    target_in[:, 0] = bos_id
    target_in[:, 1:] = target_out[:, :-1]
    return Batch(source=torch.from_numpy(tokens.astype(np.int64)), source_pad=torch.from_numpy(pad),
                 target_in=torch.from_numpy(target_in), target_out=torch.from_numpy(target_out))


def padding_fraction(data: TokenizedExamples, batches: list[np.ndarray]) -> float:
    """Share of source positions that are padding over an epoch of batches (lower is better)."""
    lengths = data.lengths
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - real / padded if padded else 0.0
