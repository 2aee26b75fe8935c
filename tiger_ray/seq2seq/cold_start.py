"""Cold-start evaluation (paper Sec. 4.3): recommend items the model never saw in training.

Protocol:
1. ``select_cold_items``: a deterministic 5% of the distinct test-target items become "unseen".
2. Training drops them: ``exclude_from_training`` removes examples whose target is unseen and
   deletes unseen items from the training histories (``tiger train-seq2seq`` does this when
   asked to, and saves the list beside the model with ``save_cold_items``).
3. Decoding: beam search over every item's ID gives a ranked list of Semantic IDs (the paper
   decodes unconstrained, so it can produce an unseen item's ID too). Walking that list, each
   generated ID contributes its own item and then the unseen items sharing its first 3 codes
   (same score); seen items are always taken, unseen ones only while fewer than
   ``floor(epsilon * k)`` of the top-k slots hold unseen items (the paper's epsilon; it uses
   epsilon = 0.1). The beam is widened by k so that skipped unseen IDs cannot leave slots empty
   in all but pathological cases.
4. ``evaluate_cold_start``: Recall@K over the test users whose target is an unseen item, written
   to RUN/eval/tiger-cold/test/.

How far the rule can reach depends on the Semantic IDs: an unseen item whose first 3 codes no
seen item shares can only be recommended if the model generates its ID itself, which a model
trained without it rarely does. The evaluation therefore also reports how many unseen items (and
target users) a prefix match can reach at all, and ``prefix_len`` (default 3, the paper's) makes
the match coarser: with 2, an unseen item joins any generated ID that shares its first 2 codes.
``unseen_beam`` (off by default; ours, not the paper's) adds a second beam search constrained to
the unseen items' IDs, whose log-probabilities are comparable with the first search's (both are
sums of the same per-position softmaxes), and merges the two lists by score before the rule.
A model trained without the unseen items scores them well below the seen ones, so under the
paper's rule (epsilon caps the unseen share) they rarely make the list; ``quota`` reads epsilon
as the share they get: the best floor(epsilon * k) unseen candidates replace the lowest seen ones.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from tiger_ray import atomic
from tiger_ray.data.schema import Sequences, read_sequences
from tiger_ray.data.split import Examples, build_examples
from tiger_ray.evaluation.metrics import MetricCollection
from tiger_ray.evaluation.retrieval import Recommendations, predictions_table
from tiger_ray.runs import RunDir
from tiger_ray.semantic_ids.table import SemanticIds
from tiger_ray.seq2seq.tokenizer import hash_user_ids

PREFIX_LEN = 3  # the paper: unseen items match a generated ID on its first 3 codes


# ---- 1-2: which items are unseen, and training without them -------------------------------------
def select_cold_items(sequences: Sequences, fraction: float = 0.05, seed: int = 0) -> np.ndarray:
    """A deterministic ``fraction`` of the distinct test-target items (each user's last item),
    chosen by a seeded hash of the item id, so every run and machine picks the same ones."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"cold-start fraction must be in (0, 1), got {fraction}")
    last = sequences.flat[sequences.offsets[1:] - 1]
    test_items = np.unique(last)
    n = max(1, math.ceil(fraction * len(test_items)))
    rank = hash_user_ids(test_items * 1_000_003 + seed, 2**61)  # a seeded stable shuffle
    return np.sort(test_items[np.argsort(rank, kind="stable")[:n]])


def exclude_from_training(examples: Examples, cold_items: np.ndarray) -> Examples:
    """Training examples without the unseen items: drop examples that target one, delete them
    from histories, and drop examples whose history becomes empty."""
    cold_items = np.asarray(cold_items, dtype=np.int64)
    row_of_item = np.repeat(np.arange(len(examples)), np.diff(examples.offsets))
    keep_item = ~np.isin(examples.flat, cold_items)
    lengths = np.bincount(row_of_item[keep_item], minlength=len(examples))
    keep = ~np.isin(examples.targets, cold_items) & (lengths > 0)
    offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[keep], out=offsets[1:])
    return Examples(user_index=examples.user_index[keep], user_ids=examples.user_ids[keep],
                    offsets=offsets, flat=examples.flat[keep_item & keep[row_of_item]],
                    targets=examples.targets[keep])


# ---- 3: mixing unseen items into the ranked list ------------------------------------------------
@dataclass(frozen=True)
class ColdIndex:
    """Unseen items grouped by their first ``len(sizes)`` codes (sorted keys; a group is a
    searchsorted range), plus which of them some seen item shares that prefix with."""

    keys: np.ndarray  # [C] prefix key of each unseen item, ascending
    items: np.ndarray  # [C] item ids in that order
    sizes: tuple[int, ...]  # codebook sizes of the prefix positions
    reachable: np.ndarray  # [C] bool: a seen item has the same prefix, so a match can reach it

    @classmethod
    def build(cls, semantic_ids: SemanticIds, cold_items: np.ndarray,
              prefix_len: int = PREFIX_LEN) -> "ColdIndex":
        width = semantic_ids.codes.shape[1]
        if not 1 <= prefix_len < width:
            raise ValueError(f"prefix_len must be in [1, {width - 1}], got {prefix_len}")
        cold = np.isin(semantic_ids.item_ids, cold_items)
        rows = np.flatnonzero(cold)
        sizes = tuple(int(s) for s in semantic_ids.codebook_sizes[:prefix_len])
        keys = prefix_keys(semantic_ids.codes[rows], sizes)
        order = np.lexsort((*semantic_ids.codes[rows, prefix_len:].T[::-1], keys))  # prefix, then rest
        seen_keys = prefix_keys(semantic_ids.codes[~cold], sizes)
        return cls(keys=keys[order], items=semantic_ids.item_ids[rows][order], sizes=sizes,
                   reachable=np.isin(keys[order], seen_keys))

    @property
    def prefix_len(self) -> int:
        return len(self.sizes)

    def matching(self, codes: np.ndarray) -> list[np.ndarray]:
        """For each [.., 4] code row: the unseen items sharing its first ``prefix_len`` codes."""
        keys = prefix_keys(codes.reshape(-1, codes.shape[-1]), self.sizes)
        lo = np.searchsorted(self.keys, keys, side="left")
        hi = np.searchsorted(self.keys, keys, side="right")
        return [self.items[a:b] for a, b in zip(lo, hi)]


def prefix_keys(codes: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """One int64 per code row from its first ``len(sizes)`` codes (mixed radix)."""
    key = np.zeros(len(codes), dtype=np.int64)
    for p, size in enumerate(sizes):
        key = key * size + codes[:, p]
    return key


def mix_cold_items(items: np.ndarray, scores: np.ndarray, codes: np.ndarray, index: ColdIndex,
                   k: int, epsilon: float, quota: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The epsilon rule over ranked generated IDs (items/scores/codes [B, W], best first): each ID
    adds its item, then the unseen items sharing its prefix (``index``); unseen items are admitted
    while fewer than floor(epsilon * k) are in the list. With ``quota``, the list holds exactly
    that many unseen items whenever the candidates have them: the best-ranked unseen candidates
    take the places of the lowest-ranked seen items, and the list is kept in score order.
    Returns (items, scores, is_unseen), [B, k]."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    budget = int(math.floor(epsilon * k + 1e-9))
    B, width = items.shape
    out_items = np.full((B, k), -1, dtype=np.int64)
    out_scores = np.full((B, k), -np.inf, dtype=np.float32)
    unseen = np.zeros((B, k), dtype=bool)
    is_cold = np.zeros(int(max(items.max(initial=0), index.items.max(initial=0))) + 1, dtype=bool)
    is_cold[index.items] = True
    matches = index.matching(codes)
    for b in range(B):
        ranked = []  # (score, rank j, item): each ID's item, then its prefix matches; each once
        taken: set[int] = set()
        for j in range(width):
            if items[b, j] < 0:
                break
            for item in (int(items[b, j]), *matches[b * width + j].tolist()):
                if item not in taken:
                    taken.add(item)
                    ranked.append((float(scores[b, j]), j, item))
        if quota:
            chosen_unseen = [c for c in ranked if is_cold[c[2]]][:budget]
            chosen_seen = [c for c in ranked if not is_cold[c[2]]][:k - len(chosen_unseen)]
            chosen = sorted(chosen_seen + chosen_unseen, key=lambda c: (-c[0], c[1]))
        else:  # walk the ranked list; unseen items only while the budget lasts
            chosen, used = [], 0
            for cand in ranked:
                if len(chosen) == k:
                    break
                cold = bool(is_cold[cand[2]])
                if cold and used >= budget:
                    continue
                chosen.append(cand)
                used += cold
        for n, (score, _, item) in enumerate(chosen):
            out_items[b, n], out_scores[b, n], unseen[b, n] = item, score, is_cold[item]
    return out_items, out_scores, unseen


def merge_by_score(first: tuple, second: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two decoded lists (items [B, W], tokens [B, W, L], scores [B, W]) as one, best score first
    per row (ties keep ``first`` ahead; empty slots, score -inf, go last)."""
    items, tokens, scores = (np.concatenate([a, b], axis=1) for a, b in zip(first, second))
    order = np.argsort(-scores, axis=1, kind="stable")
    return (np.take_along_axis(items, order, 1), np.take_along_axis(tokens, order[..., None], 1),
            np.take_along_axis(scores, order, 1))


class ColdStartRetriever:
    """Decodes over every item's ID, then keeps unseen items to the epsilon budget."""

    name = "tiger-cold"

    def __init__(self, base, cold_items: np.ndarray, epsilon: float = 0.1,
                 prefix_len: int = PREFIX_LEN, unseen_beam: int = 0, quota: bool = False):
        """``base``: a ``TigerRetriever`` decoding over every item. ``unseen_beam`` > 0 also
        decodes that many IDs from the unseen items alone and merges them in by score; ``quota``
        gives unseen items exactly floor(epsilon * k) slots when there are candidates (see
        ``mix_cold_items``)."""
        if unseen_beam < 0:
            raise ValueError(f"unseen_beam must be >= 0, got {unseen_beam}")
        self.base = base
        self.index = ColdIndex.build(base.tokenizer.semantic_ids, cold_items, prefix_len)
        self.cold_items = np.asarray(cold_items, dtype=np.int64)
        self.epsilon = epsilon
        self.unseen_beam = int(unseen_beam)
        self.quota = bool(quota)
        self.unseen = None
        if unseen_beam:
            from tiger_ray.seq2seq.retriever import TigerRetriever
            from tiger_ray.seq2seq.trie import SemanticIdTrie

            trie = SemanticIdTrie.from_semantic_ids(base.tokenizer.semantic_ids, only_items=cold_items)
            self.unseen = TigerRetriever(base.model, base.tokenizer, trie=trie, beam_size=unseen_beam,
                                         device=base.device, chunk_size=base.chunk_size,
                                         precision=base.precision)

    def recommend(self, histories, user_ids, k: int) -> Recommendations:
        """extras (summed over users): ``unseen_share`` of the k slots holding unseen items, and
        ``generated_unseen``, users for whom the search over every item decoded an unseen
        item's own ID."""
        width = max(k, self.base.beam_size) + k  # room for unseen IDs the budget skips
        items, tokens, scores = self.base.decode(histories, user_ids, width)
        generated = np.isin(items, self.cold_items).any(axis=1)  # by the search over every item
        if self.unseen is not None:
            more = self.unseen.decode(histories, user_ids, self.unseen_beam)
            items, tokens, scores = merge_by_score((items, tokens, scores), more)
        codes = tokens - self.base.tokenizer.offsets
        out, out_scores, unseen = mix_cold_items(items, scores, codes, self.index, k, self.epsilon,
                                                 quota=self.quota)
        return Recommendations(item_ids=out, scores=out_scores,
                               extras={"unseen_share": float(unseen.sum()) / k,
                                       "generated_unseen": float(generated.sum())})


# ---- 4: evaluation on the users whose test target is unseen --------------------------------------
def cold_examples(sequences: Sequences, cold_items: np.ndarray, split: str = "test") -> Examples:
    examples = build_examples(sequences, split)
    keep = np.isin(examples.targets, cold_items)
    lengths = np.diff(examples.offsets)[keep]
    offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    rows = np.repeat(keep, np.diff(examples.offsets))
    return replace(examples, user_index=examples.user_index[keep], user_ids=examples.user_ids[keep],
                   offsets=offsets, flat=examples.flat[rows], targets=examples.targets[keep])


def evaluate_cold_start(retriever, run: RunDir, cold_items: np.ndarray, *, epsilon: float = 0.1,
                        k: int = 10, batch_size: int = 256, split: str = "test",
                        prefix_len: int = PREFIX_LEN, unseen_beam: int = 0, quota: bool = False,
                        write: bool = True) -> dict:
    """Recall@1/5/10 (and NDCG) on the test users whose target was held out of training, with
    what bounds it: how many unseen items (and of these users' targets) a prefix match can reach,
    and for how many users the beam generated an unseen item's ID itself."""
    cold = retriever if isinstance(retriever, ColdStartRetriever) else \
        ColdStartRetriever(retriever, cold_items, epsilon=epsilon, prefix_len=prefix_len,
                           unseen_beam=unseen_beam, quota=quota)
    examples = cold_examples(read_sequences(run.require(run.sequences, "tiger prepare")), cold_items, split)
    metrics = MetricCollection.default(tuple(sorted({1, 5, 10, k} & set(range(1, k + 1)))))
    tables, unseen_share, generated = [], 0.0, 0.0
    start = time.perf_counter()
    for lo in range(0, len(examples), batch_size):
        hi = min(lo + batch_size, len(examples))
        recs = cold.recommend([examples.history(i) for i in range(lo, hi)], examples.user_ids[lo:hi], k)
        metrics.update(recs.item_ids, examples.targets[lo:hi])
        unseen_share += recs.extras["unseen_share"]
        generated += recs.extras["generated_unseen"]
        tables.append(predictions_table(examples.user_ids[lo:hi], examples.targets[lo:hi], recs))
    n = len(examples)
    reachable_items = cold.index.items[cold.index.reachable]
    result = {
        "model": cold.name, "split": split, "count": n, "epsilon": cold.epsilon,
        "prefix_len": cold.index.prefix_len, "unseen_beam": cold.unseen_beam, "quota": cold.quota,
        "cold_items": int(len(cold_items)), **metrics.compute(),
        "unseen_share": unseen_share / max(n, 1),
        "prefix_reachable_items": int(len(reachable_items)),
        "prefix_reachable_users": int(np.isin(examples.targets, reachable_items).sum()),
        "generated_unseen_users": int(generated), "seconds": time.perf_counter() - start,
    }
    if write:
        out = run.eval_dir(cold.name, split)
        if tables:
            atomic.write_parquet(out / "predictions.parquet", pa.concat_tables(tables))
        atomic.write_json(out / "metrics.json", result)
    return result
