"""Leave-one-out split, defined once (paper protocol, Sec. 4).

For a user's chronological sequence s_1..s_n:
  test target        s_n,      history s_1..s_{n-1}
  validation target  s_{n-1},  history s_1..s_{n-2}
  training part      s_1..s_{n-2}; training examples are every prefix of it:
                     (s_1 -> s_2), (s_1 s_2 -> s_3), ..., (s_1..s_{n-3} -> s_{n-2})
History windows are cut to the most recent ``max_history`` items by the models, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from tiger_ray.data.schema import Sequences

Split = Literal["train", "valid", "test"]
SPLITS: tuple[str, ...] = ("train", "valid", "test")
MIN_SEQUENCE_LENGTH = 3  # one train item, one validation target, one test target


@dataclass(frozen=True)
class Examples:
    """(history, target) pairs; history i is flat[offsets[i]:offsets[i+1]]."""

    user_index: np.ndarray  # [E] row of the user in Sequences
    user_ids: np.ndarray  # [E]
    offsets: np.ndarray  # [E+1]
    flat: np.ndarray
    targets: np.ndarray  # [E]

    def __len__(self) -> int:
        return len(self.targets)

    def history(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]


def train_part(seq: np.ndarray) -> np.ndarray:
    return seq[:-2]


def eval_example(seq: np.ndarray, split: Split) -> tuple[np.ndarray, int]:
    """History and target of one user for the validation or test split."""
    if split == "valid":
        return seq[:-2], int(seq[-2])
    if split == "test":
        return seq[:-1], int(seq[-1])
    raise ValueError(f"eval_example: split must be 'valid' or 'test', got {split!r}")


def check_lengths(sequences: Sequences) -> None:
    short = np.flatnonzero(sequences.lengths < MIN_SEQUENCE_LENGTH)
    if len(short):
        examples = ", ".join(str(int(sequences.user_ids[u])) for u in short[:5])
        raise ValueError(
            f"{len(short)} users have fewer than {MIN_SEQUENCE_LENGTH} items and cannot be split "
            f"leave-one-out (e.g. user_id {examples})"
        )


def build_examples(sequences: Sequences, split: Split, max_history: int | None = None) -> Examples:
    """All (history, target) pairs of a split; histories keep the last ``max_history`` items."""
    check_lengths(sequences)
    user_index, histories, targets = [], [], []
    for u in range(len(sequences)):
        seq = sequences[u]
        if split == "train":
            part = train_part(seq)
            for t in range(1, len(part)):
                user_index.append(u)
                histories.append(part[:t])
                targets.append(part[t])
        else:
            history, target = eval_example(seq, split)
            user_index.append(u)
            histories.append(history)
            targets.append(target)
    if max_history is not None:
        histories = [h[-max_history:] for h in histories]
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    offsets = np.zeros(len(histories) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(histories).astype(np.int64) if histories else np.zeros(0, np.int64)
    user_index_arr = np.asarray(user_index, dtype=np.int64)
    return Examples(
        user_index=user_index_arr,
        user_ids=sequences.user_ids[user_index_arr],
        offsets=offsets,
        flat=flat,
        targets=np.asarray(targets, dtype=np.int64),
    )
