"""Semantic-ID tokenizer: item histories -> token sequences for the seq2seq model, and back.

Vocabulary (paper Sec. 3.2):

    0                      PAD
    1                      BOS (decoder start)
    2                      EOS (reserved; targets have a fixed length of 4, so never emitted)
    offsets[p] + code      code of Semantic-ID position p, a separate range per position
    user_offset + bucket   one token per user-id hash bucket (only if use_user_token)

A source is ``[user token] + 4 tokens per item`` for the last ``max_history`` items (oldest
first); a target is an item's 4 code tokens.
"""

from __future__ import annotations

import hashlib

import numpy as np

from tiger_ray.semantic_ids.table import SemanticIds

PAD, BOS, EOS = 0, 1, 2
NUM_SPECIAL = 3


def hash_user_ids(user_ids: np.ndarray, num_buckets: int) -> np.ndarray:
    """Stable user-id -> bucket (splitmix64 finaliser), the same on every machine and run."""
    x = np.asarray(user_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(num_buckets)).astype(np.int64)


def fingerprint(semantic_ids: SemanticIds) -> str:
    """Hash of the item -> code table, so a model is never paired with different Semantic IDs
    (stored with a saved table, so this is cheap for a memory-mapped one)."""
    return semantic_ids.fingerprint()


def legacy_fingerprint(semantic_ids: SemanticIds) -> str:
    """The hash models saved before the compact table recorded (int64 copies: small tables only)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(semantic_ids.item_ids, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(semantic_ids.codes, dtype="<i8").tobytes())
    h.update(repr(tuple(int(s) for s in semantic_ids.codebook_sizes)).encode())
    return h.hexdigest()[:16]


class SemanticIdTokenizer:
    def __init__(self, semantic_ids: SemanticIds, num_user_buckets: int = 2000,
                 use_user_token: bool = True, max_history: int = 20):
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        if use_user_token and num_user_buckets < 1:
            raise ValueError(f"num_user_buckets must be >= 1, got {num_user_buckets}")
        self.semantic_ids = semantic_ids
        self.num_user_buckets = int(num_user_buckets)
        self.use_user_token = bool(use_user_token)
        self.max_history = int(max_history)
        self.codebook_sizes = tuple(int(s) for s in semantic_ids.codebook_sizes)
        self.tokens_per_item = len(self.codebook_sizes)
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS
        starts = np.concatenate([[0], np.cumsum(self.codebook_sizes)[:-1]])
        self.offsets = (NUM_SPECIAL + starts).astype(np.int64)  # vocab id of code 0, per position
        self.user_offset = NUM_SPECIAL + int(sum(self.codebook_sizes))
        self.vocab_size = self.user_offset + (self.num_user_buckets if self.use_user_token else 0)
        self.max_source_len = int(self.use_user_token) + self.tokens_per_item * self.max_history

        # Item -> codes reads the (memory-mapped) table, codes -> item its sorted-key index: no
        # per-item copy is made here.

    # ---- items -> tokens ---------------------------------------------------------------------
    def item_tokens(self, item_ids: np.ndarray) -> np.ndarray:
        """[B] item ids -> [B, 4] vocabulary ids; ValueError for ids without a Semantic ID."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        codes, known = self.semantic_ids.codes_of(item_ids)
        bad = ~known
        if bad.any():
            raise ValueError(f"item_id {int(item_ids[bad].flat[0])} has no Semantic ID "
                             f"({int(bad.sum())} such ids)")
        return codes + self.offsets

    def user_token(self, user_ids: np.ndarray) -> np.ndarray:
        return self.user_offset + hash_user_ids(user_ids, self.num_user_buckets)

    def encode_history(self, history: np.ndarray, user_id: int) -> np.ndarray:
        """1-D int64: [user token] + 4 tokens per item of the last ``max_history`` items."""
        items = np.asarray(history, dtype=np.int64)[-self.max_history:]
        tokens = self.item_tokens(items).reshape(-1)
        if self.use_user_token:
            tokens = np.concatenate([self.user_token(np.array([user_id])), tokens])
        if len(tokens) == 0:
            raise ValueError("empty history and use_user_token=False: nothing to condition on")
        return tokens

    def encode_batch(self, histories: list[np.ndarray], user_ids: np.ndarray,
                     pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded sources [B, S] (S = longest, or ``pad_to``) and padding mask (True = PAD)."""
        cut = [np.asarray(h, dtype=np.int64)[-self.max_history:] for h in histories]
        lengths = np.fromiter((len(h) for h in cut), dtype=np.int64, count=len(cut))
        flat = np.concatenate(cut) if cut else np.zeros(0, np.int64)
        item_tok = self.item_tokens(flat)  # one vectorised lookup for the whole batch
        lead = int(self.use_user_token)
        n_tokens = lead + self.tokens_per_item * lengths
        if (n_tokens == 0).any():
            raise ValueError("empty history and use_user_token=False: nothing to condition on")
        width = int(n_tokens.max(initial=1)) if pad_to is None else int(pad_to)
        if n_tokens.max(initial=0) > width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest source ({n_tokens.max()})")
        source = np.full((len(cut), width), PAD, dtype=np.int64)
        if lead:
            source[:, 0] = self.user_token(np.asarray(user_ids))
        # Scatter each item's 4 tokens into its row: row r, columns lead .. lead + 4 * len_r.
        rows = np.repeat(np.arange(len(cut)), lengths * self.tokens_per_item)
        starts = np.repeat(np.cumsum(lengths * self.tokens_per_item) - lengths * self.tokens_per_item,
                           lengths * self.tokens_per_item)
        cols = lead + np.arange(len(rows)) - starts
        source[rows, cols] = item_tok.reshape(-1)
        return source, source == PAD

    # ---- tokens -> items ---------------------------------------------------------------------
    def items_from_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """[..., 4] vocabulary ids -> item ids [...]; -1 where the tokens are not a real item's ID."""
        tokens = np.asarray(tokens, dtype=np.int64)
        shape = tokens.shape[:-1]
        codes = tokens.reshape(-1, self.tokens_per_item) - self.offsets
        ok = ((codes >= 0) & (codes < np.asarray(self.codebook_sizes))).all(axis=1)
        items = self.semantic_ids.lookup(np.where(ok[:, None], codes, 0))
        return np.where(ok, items, -1).reshape(shape)

    # ---- persistence -------------------------------------------------------------------------
    def state(self) -> dict:
        """JSON-able settings; the Semantic-ID table itself is saved beside it (see model.save_model)."""
        return {
            "num_user_buckets": self.num_user_buckets,
            "use_user_token": self.use_user_token,
            "max_history": self.max_history,
            "codebook_sizes": list(self.codebook_sizes),
            "vocab_size": self.vocab_size,
            "num_items": int(self.semantic_ids.num_items),
            "fingerprint": fingerprint(self.semantic_ids),
        }

    @classmethod
    def from_state(cls, state: dict, semantic_ids: SemanticIds) -> "SemanticIdTokenizer":
        """Rebuild; ValueError if ``semantic_ids`` is not the table the state was made with."""
        got = fingerprint(semantic_ids)
        if state.get("fingerprint") not in (None, got) and state["fingerprint"] != legacy_fingerprint(semantic_ids):
            raise ValueError(f"Semantic IDs changed since this model was trained (fingerprint "
                             f"{got} != {state['fingerprint']}); retrain the seq2seq model")
        return cls(semantic_ids, num_user_buckets=state["num_user_buckets"],
                   use_user_token=state["use_user_token"], max_history=state["max_history"])
