"""The hybrid retriever: TIGER's beam and the dual encoder's nearest neighbours, re-ranked by both.

    retriever = load_retriever(RunDir("runs/beauty"))          # the weight `tiger tune-hybrid` chose
    recs = retriever.recommend([np.array([3, 17, 42])], np.array([7]), k=10)

Candidates per user are the union of TIGER's top ``tiger_candidates`` Semantic IDs (beam search)
and the dual encoder's top ``dense_candidates`` items (its FAISS index). Each candidate then gets
both models' exact scores: TIGER's log-probability of its Semantic ID (teacher-forced) and the
dual encoder's logit, each turned into a log-softmax over the user's candidates, and the two are
mixed as ``tiger_weight * tiger + (1 - tiger_weight) * dense`` (a product of experts). Weight 1
ranks the candidates by TIGER alone, 0 by the dual encoder alone; ``tiger tune-hybrid`` picks the
weight on the validation split. After LIGER (Yang et al., 2024), which unifies generative and dense
retrieval for sequential recommendation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tiger_ray import atomic
from tiger_ray.evaluation.retrieval import Recommendations
from tiger_ray.runs import RunDir

log = logging.getLogger(__name__)

TUNING_FILE = ("hybrid", "tuning.json")  # RUN/hybrid/tuning.json, written by `tiger tune-hybrid`
DEFAULT_TIGER_WEIGHT = 0.5


def union_candidates(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per row, the distinct item ids of both [B, *] arrays (first's order kept, then second's new
    ones), -1 in the slots left over. Shape [B, C1 + C2]."""
    both = np.concatenate([first, second], axis=1).astype(np.int64)
    order = np.argsort(both, axis=1, kind="stable")  # duplicates side by side, first one first
    ranked = np.take_along_axis(both, order, axis=1)
    repeat = np.zeros_like(ranked, dtype=bool)
    repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    drop = np.zeros_like(repeat)
    np.put_along_axis(drop, order, repeat | (ranked < 0), axis=1)
    kept = np.where(drop, -1, both)
    # Push the dropped slots to the end of each row, keeping the order of the rest.
    slots = np.argsort(drop, axis=1, kind="stable")
    return np.take_along_axis(kept, slots, axis=1)


def log_softmax_rows(scores: np.ndarray) -> np.ndarray:
    """log-softmax over each row's finite entries; -inf entries stay -inf."""
    finite = np.isfinite(scores)
    top = np.max(np.where(finite, scores, -np.inf), axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    shifted = np.where(finite, scores - top, -np.inf)
    norm = np.log(np.sum(np.exp(shifted), axis=1, keepdims=True).clip(min=1e-30))
    return np.where(finite, shifted - norm, -np.inf)


def mix(tiger_logp: np.ndarray, dense_logits: np.ndarray, tiger_weight: float) -> np.ndarray:
    """The hybrid score [B, C] of candidates (-inf where either model has no score)."""
    if not 0.0 <= tiger_weight <= 1.0:
        raise ValueError(f"tiger_weight must be in [0, 1], got {tiger_weight}")
    tiger, dense = log_softmax_rows(tiger_logp), log_softmax_rows(dense_logits)
    scored = np.isfinite(tiger) & np.isfinite(dense)
    with np.errstate(invalid="ignore"):  # 0 * -inf in the unscored slots, masked below
        combined = tiger_weight * tiger + (1.0 - tiger_weight) * dense
    return np.where(scored, combined, -np.inf)


def top_k(items: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best candidates per row by score (-1 / -inf where a row has fewer)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best_items = np.take_along_axis(items, order, axis=1)
    best_scores = np.take_along_axis(scores, order, axis=1)
    best_items = np.where(np.isfinite(best_scores), best_items, -1)
    if best_items.shape[1] < k:  # fewer candidates than k
        pad = k - best_items.shape[1]
        best_items = np.pad(best_items, ((0, 0), (0, pad)), constant_values=-1)
        best_scores = np.pad(best_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return best_items, best_scores.astype(np.float32)


class HybridRetriever:
    name = "hybrid"

    def __init__(self, tiger, dense, tiger_weight: float = DEFAULT_TIGER_WEIGHT,
                 tiger_candidates: int = 20, dense_candidates: int = 20):
        if tiger_candidates < 1 or dense_candidates < 0:
            raise ValueError(f"tiger_candidates must be >= 1 and dense_candidates >= 0, got "
                             f"{tiger_candidates}, {dense_candidates}")
        mix(np.zeros((1, 1)), np.zeros((1, 1)), tiger_weight)  # validates the weight
        self.tiger, self.dense = tiger, dense
        self.tiger_weight = float(tiger_weight)
        self.tiger_candidates, self.dense_candidates = int(tiger_candidates), int(dense_candidates)
        # Each model reads its own window of the history (TIGER 20 items in the paper, the dual
        # encoder its max_history); callers keep at least the longer one.
        self.max_history = max(tiger.tokenizer.max_history, dense.model.config.max_history)

    def candidates(self, histories: list[np.ndarray], user_ids: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(candidate items [B, C], TIGER log-probabilities [B, C], dense logits [B, C])."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        generated, _, _ = self.tiger.decode(histories, user_ids, self.tiger_candidates)
        if self.dense_candidates:
            # The dual encoder reads its own window of the history (its max_history).
            nearest = self.dense.recommend(histories, user_ids, self.dense_candidates).item_ids
            items = union_candidates(generated, nearest)
        else:
            items = np.where(generated > 0, generated, -1)
        return (items, self.tiger.score_items(histories, user_ids, items),
                self.dense.score_items(histories, user_ids, items))

    def recommend(self, histories: list[np.ndarray], user_ids: np.ndarray, k: int) -> Recommendations:
        """Top-k of the candidates by the mixed score (a log-probability-like number)."""
        items, tiger_logp, dense_logits = self.candidates(histories, user_ids)
        best, scores = top_k(items, mix(tiger_logp, dense_logits, self.tiger_weight), k)
        return Recommendations(item_ids=best, scores=scores)


def tuning_path(run: RunDir) -> Path:
    return run.root.joinpath(*TUNING_FILE)


def tuned_weight(run: RunDir) -> float | None:
    """The weight `tiger tune-hybrid` chose on validation for this run, if it was run."""
    path = tuning_path(run)
    return float(atomic.read_json(path)["tiger_weight"]) if path.exists() else None


def load_retriever(run: RunDir, tiger_weight: float | None = None, tiger_candidates: int = 20,
                   dense_candidates: int = 20, device: str = "cpu", precision: str = "fp32",
                   index_type: str | None = None) -> HybridRetriever:
    """Both trained models of ``run``; ``tiger_weight`` defaults to the tuned one (RUN/hybrid/
    tuning.json), else 0.5."""
    from tiger_ray.baseline.retriever import load_retriever as load_dense
    from tiger_ray.seq2seq.retriever import load_retriever as load_tiger

    if tiger_weight is None:
        tiger_weight = tuned_weight(run)
        if tiger_weight is None:
            tiger_weight = DEFAULT_TIGER_WEIGHT
            log.warning("hybrid: %s not found (run `tiger tune-hybrid --run %s` to choose the "
                        "weight on validation); using tiger_weight %.2f", tuning_path(run),
                        run.root, tiger_weight)
    tiger = load_tiger(run, beam_size=tiger_candidates, device=device, precision=precision)
    dense = load_dense(run, index_type=index_type, device=device)
    return HybridRetriever(tiger, dense, tiger_weight=tiger_weight, tiger_candidates=tiger_candidates,
                           dense_candidates=dense_candidates)
