"""Training examples as token arrays, length-bucketed batches, rank sharding and fast collation.

Every prefix of each user's training part is one example (``build_examples(..., "train")``).
``training_examples`` turns a batch of users into their tokenised examples as fixed-width columns;
under Ray Train it runs inside Ray Data (``ExampleBuilder``, a ``map_batches`` class) and every
rank reads its share with ``StreamedBatches`` (length buckets formed inside chunks of its shard).
For one-process training (tests, small runs) the examples are tokenised into a flat int32 array
plus offsets (``TokenizedExamples``, no Python objects per example), and each epoch:

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

All-positions training (``training_mode="all_positions"``) groups the same examples into windows
(``training_windows``, ``TrainingWindows``): one source per window, read once by the item-causal
encoder, and its examples' targets with the source prefix each may read. Batches are then cut by
examples, not rows, so ``batch_size`` means the same in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from tiger_ray.data.split import MIN_SEQUENCE_LENGTH, Examples
from tiger_ray.seq2seq.tokenizer import PAD


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


# ---------------------------------------------------------------- users -> example rows (Ray Data)

def _kept_examples(user_ids: np.ndarray, offsets: np.ndarray, flat: np.ndarray, max_history: int,
                   cold_items: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """The training examples of users, in ``build_examples`` order (user by user, shortest prefix
    first), after the max_history cut and the cold-item exclusion: (user_row, start, target_at,
    histories), where ``start``/``target_at`` index ``flat`` (the history window begins at
    ``start``, before the exclusion) and histories are item arrays."""
    lengths = np.diff(offsets)
    short = np.flatnonzero(lengths < MIN_SEQUENCE_LENGTH)
    if len(short):
        raise ValueError(f"{len(short)} users have fewer than {MIN_SEQUENCE_LENGTH} items and cannot "
                         f"be split leave-one-out (e.g. user_id {int(user_ids[short[0]])})")
    # Training part s_1..s_{n-2}; example t (1-based target position) predicts s_{t+1} from s_1..s_t.
    per_user = lengths - MIN_SEQUENCE_LENGTH
    user_row = np.repeat(np.arange(len(lengths)), per_user)
    first = np.cumsum(per_user) - per_user
    t = np.arange(len(user_row), dtype=np.int64) - np.repeat(first, per_user) + 1
    base = offsets[user_row]
    target_at = base + t
    start = base + np.maximum(0, t - max_history)  # the max_history cut comes first
    keep_item = np.ones(len(flat), dtype=bool)
    if cold_items is not None and len(cold_items):
        keep_item = ~np.isin(flat, np.asarray(cold_items, dtype=np.int64))
    before = np.zeros(len(flat) + 1, dtype=np.int64)  # kept items in flat[:i]
    np.cumsum(keep_item, out=before[1:])
    counts = before[target_at] - before[start]
    keep = keep_item[target_at] & (counts > 0)
    start, counts, target_at, user_row = start[keep], counts[keep], target_at[keep], user_row[keep]
    kept_positions = np.flatnonzero(keep_item)
    history_flat = flat[kept_positions[_ranges(before[start], counts)]]
    histories = np.split(history_flat, np.cumsum(counts)[:-1]) if len(counts) else []
    return user_row, start, target_at, histories


def _encode_sources(tokenizer, histories: list, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sources right-padded to the fixed width max_source_len: (source int32, source_len int32)."""
    width = tokenizer.max_source_len
    if not len(histories):
        return np.zeros((0, width), np.int32), np.zeros(0, np.int32)
    source, pad = tokenizer.encode_batch(histories, users, pad_to=width)
    return source.astype(np.int32), (~pad).sum(axis=1).astype(np.int32)


def training_examples(user_ids: np.ndarray, offsets: np.ndarray, flat: np.ndarray, tokenizer,
                      cold_items: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The training examples of a batch of users as fixed-width columns, in ``build_examples``
    order (user by user, shortest prefix first) and with its tokens:

        source      [E, max_source_len] int32, the tokenizer's source, right-padded with PAD
        source_len  [E] int32, its non-padding length
        targets     [E, tokens_per_item] int32
        user_id     [E] int64

    User u's items are ``flat[offsets[u]:offsets[u+1]]``. The same examples as
    ``build_examples(..., "train", tokenizer.max_history)`` followed, when ``cold_items`` is
    given, by ``exclude_from_training`` (histories are cut to max_history first, then lose their
    cold items), found with array arithmetic instead of a loop over examples.
    """
    user_ids = np.asarray(user_ids, dtype=np.int64)
    flat = np.asarray(flat, dtype=np.int64)
    user_row, _, target_at, histories = _kept_examples(
        user_ids, np.asarray(offsets, dtype=np.int64), flat, tokenizer.max_history, cold_items)
    users = user_ids[user_row]
    source, source_len = _encode_sources(tokenizer, histories, users)
    targets = np.asarray(tokenizer.item_tokens(flat[target_at]), dtype=np.int32)
    return {"source": source, "source_len": source_len,
            "targets": targets.reshape(len(target_at), tokenizer.tokens_per_item),
            "user_id": users}


def training_windows(user_ids: np.ndarray, offsets: np.ndarray, flat: np.ndarray, tokenizer,
                     cold_items: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``training_examples``' examples grouped into all-positions windows, for the item-causal
    encoder: one window is encoded once and trains all its examples.

    Examples whose history window starts at the same item share a window: a user's first
    max_history targets (their histories all start at the user's first item) form one, and every
    later target (history: the max_history items before it) a window of its own. The window's
    source is its last example's history; every other example's history is a prefix of it, and
    the item-causal encoder encodes a prefix exactly as that history alone (as at inference), so
    each example is trained on precisely the view it has in per-example training. Columns:

        source, source_len, user_id   as in ``training_examples``, one per window
        targets  [W, max_history, tokens_per_item] int32, the window's examples' targets in
                 order, then PAD
        visible  [W, max_history] int32, source tokens example j reads (its history), then 0

    (Beauty: users have ~9 items, so a window holds ~6 examples; few users pass max_history.)
    """
    user_ids = np.asarray(user_ids, dtype=np.int64)
    flat = np.asarray(flat, dtype=np.int64)
    user_row, start, target_at, histories = _kept_examples(
        user_ids, np.asarray(offsets, dtype=np.int64), flat, tokenizer.max_history, cold_items)
    n, per_item = len(target_at), tokenizer.tokens_per_item
    new = np.ones(n, dtype=bool)
    new[1:] = start[1:] != start[:-1]  # examples come user by user, window starts ascending
    window = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    last = np.r_[first[1:], n][:len(first)] - 1
    slot = np.arange(n) - first[window]
    W, width = len(first), tokenizer.max_history
    targets = np.full((W, width, per_item), PAD, dtype=np.int32)
    targets[window, slot] = tokenizer.item_tokens(flat[target_at]).reshape(n, per_item)
    visible = np.zeros((W, width), dtype=np.int32)
    history_len = np.fromiter((len(h) for h in histories), dtype=np.int64, count=n)
    visible[window, slot] = int(tokenizer.use_user_token) + per_item * history_len
    users = user_ids[user_row[first]]
    source, source_len = _encode_sources(tokenizer, [histories[i] for i in last], users)
    return {"source": source, "source_len": source_len, "targets": targets, "visible": visible,
            "user_id": users}


def examples_per_window(visible: np.ndarray) -> np.ndarray:
    """[W] examples of each all-positions window (its non-zero ``visible`` slots)."""
    return (np.asarray(visible) > 0).sum(axis=1)


@dataclass(frozen=True)
class TrainingWindows:
    """``training_windows``' columns held in memory (one-process training)."""

    source: np.ndarray  # [W, max_source_len] int32, right-padded with PAD
    source_len: np.ndarray  # [W]
    targets: np.ndarray  # [W, max_history, tokens_per_item] int32, PAD after the examples
    visible: np.ndarray  # [W, max_history] int32, source tokens each example reads, then 0
    user_id: np.ndarray  # [W] int64

    def __len__(self) -> int:
        return len(self.source_len)

    @property
    def lengths(self) -> np.ndarray:
        return self.source_len

    @property
    def sizes(self) -> np.ndarray:
        return examples_per_window(self.visible)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in WINDOW_COLUMNS}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "TrainingWindows":
        return cls(**{f: np.asarray(arrays[f]) for f in WINDOW_COLUMNS})


WINDOW_COLUMNS = ("source", "source_len", "targets", "visible", "user_id")


def examples_from_columns(columns: dict[str, np.ndarray]) -> TokenizedExamples:
    """Fixed-width example rows (``training_examples``' columns) -> flat ``TokenizedExamples``."""
    source = np.asarray(columns["source"])
    lengths = np.asarray(columns["source_len"], dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    valid = np.arange(source.shape[1])[None, :] < lengths[:, None]
    return TokenizedExamples(source_flat=source[valid].astype(np.int32), source_offsets=offsets,
                             targets=np.asarray(columns["targets"], dtype=np.int32),
                             user_ids=np.asarray(columns["user_id"], dtype=np.int64))


# Work items an epoch is cut into at least: their order is shuffled every epoch, so even a
# one-row-group file (Beauty) reaches the trainers in a new order each epoch.
MIN_WORK_ITEMS = 64


def user_slices(path) -> list[dict]:
    """Work items over sequences.parquet (a file or parts), from the footers: row groups, cut into
    slices when there are fewer than ``MIN_WORK_ITEMS``; what ``ExampleBuilder`` reads."""
    from tiger_ray.evaluation.retrieval import row_group_slices

    return row_group_slices(path, min_items=MIN_WORK_ITEMS)


class ExampleBuilder:
    """``map_batches`` class: row groups of sequences.parquet (``user_slices`` items) -> the
    example rows of their users, ``users_per_batch`` users at a time (a generator, so a large
    row group never becomes one huge block).

    Ray Data builds it once per actor, so the tokenizer (a lookup table over the whole catalog) is
    loaded once per actor, not once per batch. ``make_tokenizer`` is called there (a picklable
    zero-argument callable, e.g. a ``functools.partial``). It reads the row groups itself
    (``row_group_slices`` says why not ``ray.data.read_parquet``). ``windows``: all-positions
    windows (``training_windows``) instead of one row per example."""

    def __init__(self, make_tokenizer: Callable[[], object], cold_items: np.ndarray | None = None,
                 users_per_batch: int = 1024, windows: bool = False):
        self.tokenizer = make_tokenizer()
        self.cold_items = None if cold_items is None else np.asarray(cold_items, dtype=np.int64)
        self.users_per_batch = users_per_batch
        self.rows = training_windows if windows else training_examples

    def __call__(self, slices: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        from tiger_ray.evaluation.retrieval import read_slices

        for users in read_slices(slices, ["user_id", "item_ids"], self.users_per_batch):
            yield self.examples(users)

    def examples(self, users) -> dict[str, np.ndarray]:
        """A pyarrow batch of users (user_id, item_ids) -> their example rows."""
        items = users.column("item_ids")
        if hasattr(items, "combine_chunks"):
            items = items.combine_chunks()
        offsets = items.offsets.to_numpy().astype(np.int64)
        return self.rows(users.column("user_id").to_numpy().astype(np.int64),
                         offsets - offsets[0], items.flatten().to_numpy(), self.tokenizer,
                         self.cold_items)


# ---------------------------------------------------------------- batching

def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def _cut(index: np.ndarray, sizes: np.ndarray, size: int) -> list[np.ndarray]:
    """``index`` cut in order into runs of ``size`` examples (``sizes``: examples of each row);
    a row goes to the run its last example falls in, so a run is ``size`` give or take a row."""
    if not len(index):
        return []
    run = (np.cumsum(sizes) - 1) // size
    return np.split(index, np.flatnonzero(np.diff(run)) + 1)


def _chunk_batches(chunk: np.ndarray, lengths: np.ndarray, sizes: np.ndarray, batch_size: int,
                   last: bool) -> list[np.ndarray]:
    """A chunk of rows sorted by source length, then by examples per row (windows of one length
    batch with their like: fewer empty target slots), stably, so the random order survives among
    equals; cut into batches of ``batch_size`` examples. Windows leave a chunk's example count
    uneven: unless the chunk is the epoch's last, a tail under half a batch joins the batch
    before it (rows of one example fill every chunk but the last exactly)."""
    chunk = chunk[np.lexsort((sizes[chunk], lengths[chunk]))]
    batches = _cut(chunk, sizes[chunk], batch_size)
    if not last and len(batches) > 1 and sizes[batches[-1]].sum() < batch_size / 2:
        tail = batches.pop()
        batches[-1] = np.concatenate([batches[-1], tail])
    return batches


def bucketed_batches(lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                     chunk_batches: int = 64, min_batch_size: int = 1,
                     sizes: np.ndarray | None = None) -> list[np.ndarray]:
    """One epoch of global batches (arrays of row indices) covering every row once.

    Rows are shuffled, cut into chunks of ``chunk_batches * batch_size`` examples, sorted by
    length inside a chunk and cut into batches of ``batch_size`` examples (``_chunk_batches``);
    the batch order is then shuffled. A row is one example unless ``sizes`` says how many it
    holds (all-positions windows): batches then hold ``batch_size`` examples give or take a
    window (or half a batch, where a chunk's tail joined them). Only the last batch can be
    short; if it has fewer than ``min_batch_size`` rows (pass the world size, so no rank is ever
    left without a row) it joins the batch before it.
    """
    if batch_size < 1 or chunk_batches < 1:
        raise ValueError(f"batch_size and chunk_batches must be >= 1, got {batch_size}, {chunk_batches}")
    n = len(lengths)
    if n == 0:
        return []
    if n < min_batch_size:
        raise ValueError(f"{n} rows cannot feed {min_batch_size} ranks")
    sizes = np.ones(n, dtype=np.int64) if sizes is None else np.asarray(sizes, dtype=np.int64)
    rng = epoch_rng(seed, epoch)
    order = rng.permutation(n)
    chunks = _cut(order, sizes[order], batch_size * chunk_batches)
    batches: list[np.ndarray] = []
    for i, chunk in enumerate(chunks):
        batches.extend(_chunk_batches(chunk, lengths, sizes, batch_size, last=i == len(chunks) - 1))
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
    # All-positions windows: targets are [B, K, T] (K example slots, PAD in empty ones) and
    # visible [B, K] says how many source tokens each slot reads.
    visible: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.source.shape[0]

    @property
    def examples(self) -> int:
        """(history, target) examples trained on: rows, or the filled slots of windows."""
        if self.visible is None:
            return len(self)
        return int((self.target_out[..., 0] != PAD).sum())

    @property
    def num_tokens(self) -> int:
        return int((~self.source_pad).sum()) + int((self.target_out != PAD).sum())

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """The model's arguments: (source, source_pad, target_in[, visible])."""
        plain = (self.source, self.source_pad, self.target_in)
        return plain if self.visible is None else (*plain, self.visible)

    def to(self, device: torch.device) -> "Batch":
        if device.type == "cpu":
            return self
        return Batch(*(None if t is None else t.to(device, non_blocking=True) for t in
                       (self.source, self.source_pad, self.target_in, self.target_out, self.visible)))


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
    return Batch(source=torch.from_numpy(tokens.astype(np.int64)), source_pad=torch.from_numpy(pad),
                 target_in=torch.from_numpy(teacher_forcing(target_out, bos_id)),
                 target_out=torch.from_numpy(target_out))


def teacher_forcing(target_out: np.ndarray, bos_id: int) -> np.ndarray:
    """Decoder inputs: BOS, then every target token but the last (along the last axis)."""
    target_in = np.empty_like(target_out)
    target_in[..., 0] = bos_id
    target_in[..., 1:] = target_out[..., :-1]
    return target_in


def padding_fraction(data: "TokenizedExamples | TrainingWindows", batches: list[np.ndarray]) -> float:
    """Share of source positions that are padding over an epoch of batches (lower is better)."""
    lengths = data.lengths
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - real / padded if padded else 0.0


# ---------------------------------------------------------------- batch sources for the trainer

class InMemoryBatches:
    """One process's view of in-memory examples (or all-positions windows): ``bucketed_batches``
    over all of them, this rank's strided share of each global batch. A function of (seed,
    epoch): a resumed run replays exactly the batches it had not yet seen."""

    def __init__(self, data: TokenizedExamples | TrainingWindows, batch_size: int, *, seed: int,
                 chunk_batches: int, rank: int, world_size: int, pad_id: int, bos_id: int):
        if len(data) < world_size:
            raise ValueError(f"{len(data)} training rows cannot feed {world_size} workers")
        self.data, self.batch_size, self.seed, self.chunk_batches = data, batch_size, seed, chunk_batches
        self.rank, self.world_size, self.pad_id, self.bos_id = rank, world_size, pad_id, bos_id
        self.lengths = data.lengths
        self.windows = isinstance(data, TrainingWindows)
        self.sizes = data.sizes if self.windows else np.ones(len(data), dtype=np.int64)

    def plan(self, epoch: int) -> list[np.ndarray]:
        return bucketed_batches(self.lengths, self.batch_size, seed=self.seed, epoch=epoch,
                                chunk_batches=self.chunk_batches, min_batch_size=self.world_size,
                                sizes=self.sizes)

    def batches_per_epoch(self) -> int:
        return len(self.plan(0))

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[Batch, int]]:
        """(this rank's batch, examples in the global batch) for the batches after the first ``skip``."""
        for index in self.plan(epoch)[skip:]:
            rows = shard_batch(index, self.rank, self.world_size)
            if self.windows:
                batch = collate_rows(self.data.to_arrays(), rows, pad_id=self.pad_id, bos_id=self.bos_id)
            else:
                batch = collate(self.data, rows, pad_id=self.pad_id, bos_id=self.bos_id)
            yield batch, int(self.sizes[index].sum())


def collate_rows(rows: dict[str, np.ndarray], index: np.ndarray, *, pad_id: int, bos_id: int) -> Batch:
    """``collate`` for fixed-width example rows or all-positions windows (``training_windows``):
    padding only up to this batch's longest source and, for windows, its fullest window."""
    lengths = rows["source_len"][index]
    width = int(lengths.max()) if len(index) else 0
    source = rows["source"][index, :width].astype(np.int64)  # right-padded with PAD already
    pad = np.arange(width)[None, :] >= lengths[:, None]
    source[pad] = pad_id
    target_out = rows["targets"][index].astype(np.int64)
    visible = None
    if "visible" in rows:
        visible = rows["visible"][index].astype(np.int64)
        filled = visible > 0
        slots = int(filled.sum(1).max()) if len(index) else 0  # slots fill from the first
        # An empty slot reads the whole source (a query that may read nothing gives NaN); its
        # PAD targets keep it out of the loss.
        visible = torch.from_numpy(np.where(filled, visible, lengths[:, None])[:, :slots])
        target_out = target_out[:, :slots]
    return Batch(source=torch.from_numpy(source), source_pad=torch.from_numpy(pad),
                 target_in=torch.from_numpy(teacher_forcing(target_out, bos_id)),
                 target_out=torch.from_numpy(target_out), visible=visible)


class StreamedBatches:
    """This rank's batches from its Ray Data shard (``ray.train.get_dataset_shard``).

    Length bucketing as in ``bucketed_batches``, within what streams by: the rows come in chunks
    of ``chunk_batches`` batches (after Ray Data's local shuffle buffer); a chunk is shuffled,
    sorted by source length (stable, so the shuffle survives among equal lengths) and cut into
    batches, whose order is shuffled. ``batch_size`` is this rank's share of the global batch, in
    examples (all-positions windows, recognised by their ``visible`` column, hold several).

    DDP needs every rank to take the same number of steps. Ray Train splits the dataset with
    ``equal=True`` (every shard the same row count), and ``agree`` (the minimum over the ranks,
    one all-reduce per chunk) makes every rank stop a chunk, and the epoch, where the shortest
    shard does, whatever the split gave.

    Unlike ``InMemoryBatches`` the order is not a function of (seed, epoch) (Ray Data decides
    which rows reach which rank, in which order): a resumed run skips as many batches of the
    interrupted epoch as were trained, without replaying the same ones.
    """

    def __init__(self, shard, batch_size: int, *, chunk_batches: int, seed: int, rank: int,
                 pad_id: int, bos_id: int, world_size: int = 1, examples: int | None = None,
                 agree: Callable[[int], int] | None = None, shuffle_buffer: int | None = None):
        if batch_size < 1 or chunk_batches < 1:
            raise ValueError(f"batch_size and chunk_batches must be >= 1, got {batch_size}, {chunk_batches}")
        self.shard, self.batch_size, self.chunk_batches = shard, batch_size, chunk_batches
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pad_id, self.bos_id = pad_id, bos_id
        self.examples = examples  # all ranks together, for the progress bar only
        self.agree = agree or (lambda n: n)
        self.shuffle_buffer = shuffle_buffer

    def batches_per_epoch(self) -> int:
        """An estimate (progress bar): ceil of this rank's rows over its batch size."""
        if not self.examples:
            return 0
        return -(-self.examples // (self.world_size * self.batch_size))

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[Batch, int]]:
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        chunks = iter(self.shard.iter_batches(
            batch_size=self.batch_size * self.chunk_batches, batch_format="numpy",
            prefetch_batches=1, local_shuffle_buffer_size=self.shuffle_buffer,
            local_shuffle_seed=None if self.shuffle_buffer is None else int(rng.integers(2**31))))
        while True:
            rows = next(chunks, None)
            plan = [] if rows is None else self._plan(rows, rng)
            plan = plan[:self.agree(len(plan))]  # a collective: every rank, every chunk
            if not plan:
                return
            for index in plan:
                if skip > 0:
                    skip -= 1
                    continue
                batch = collate_rows(rows, index, pad_id=self.pad_id, bos_id=self.bos_id)
                yield batch, batch.examples * self.world_size

    def _plan(self, rows: dict[str, np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        lengths = rows["source_len"]
        sizes = (examples_per_window(rows["visible"]) if "visible" in rows
                 else np.ones(len(lengths), dtype=np.int64))
        last = len(lengths) < self.batch_size * self.chunk_batches  # the stream's last chunk
        batches = _chunk_batches(rng.permutation(len(lengths)), lengths, sizes, self.batch_size, last)
        return [batches[i] for i in rng.permutation(len(batches))]
