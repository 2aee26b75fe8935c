"""Ranking metrics as reusable, mergeable objects (one target item per query, paper protocol).

Each metric accumulates over batches of ranked lists and can be merged across workers:

    metrics = MetricCollection.default()          # Recall@5/10, NDCG@5/10
    metrics.update(ranked_item_ids, targets)      # [B, K] ids (-1 = empty slot), [B]
    metrics.compute()                             # {"recall@5": ..., "ndcg@10": ...}

With a single relevant item, NDCG@K = 1 / log2(rank + 1) if the target is at 1-based rank <= K,
else 0 (the ideal DCG is 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def target_ranks(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each target in its ranked list, 0 where absent."""
    ranked = np.asarray(ranked)
    targets = np.asarray(targets).reshape(-1, 1)
    if ranked.ndim != 2 or ranked.shape[0] != targets.shape[0]:
        raise ValueError(f"ranked must be [B, K] and targets [B]; got {ranked.shape} and {targets.shape}")
    hit = ranked == targets
    has = hit.any(axis=1)
    return np.where(has, hit.argmax(axis=1) + 1, 0)


@dataclass
class RankingMetric:
    k: int
    total: float = 0.0
    count: int = 0
    name: str = field(default="", init=False)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"{type(self).__name__}: k must be >= 1, got {self.k}")

    def per_query(self, ranks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def update(self, ranked: np.ndarray, targets: np.ndarray) -> None:
        ranks = target_ranks(ranked, targets)
        self.total += float(self.per_query(ranks).sum())
        self.count += len(ranks)

    def merge(self, other: "RankingMetric") -> None:
        self.total += other.total
        self.count += other.count

    def compute(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def key(self) -> str:
        return f"{self.name}@{self.k}"


@dataclass
class RecallAtK(RankingMetric):
    """Fraction of queries whose target is in the top k (= HR@k with one target)."""

    def __post_init__(self):
        super().__post_init__()
        self.name = "recall"

    def per_query(self, ranks: np.ndarray) -> np.ndarray:
        return ((ranks >= 1) & (ranks <= self.k)).astype(np.float64)


@dataclass
class NDCGAtK(RankingMetric):
    def __post_init__(self):
        super().__post_init__()
        self.name = "ndcg"

    def per_query(self, ranks: np.ndarray) -> np.ndarray:
        inside = (ranks >= 1) & (ranks <= self.k)
        out = np.zeros(len(ranks), dtype=np.float64)
        out[inside] = 1.0 / np.log2(ranks[inside] + 1.0)
        return out


class MetricCollection:
    def __init__(self, metrics: list[RankingMetric]):
        self.metrics = metrics

    @classmethod
    def default(cls, ks: tuple[int, ...] = (5, 10)) -> "MetricCollection":
        return cls([m(k) for k in ks for m in (RecallAtK, NDCGAtK)])

    @property
    def max_k(self) -> int:
        return max(m.k for m in self.metrics)

    def update(self, ranked: np.ndarray, targets: np.ndarray) -> None:
        ranks = target_ranks(ranked, targets)  # computed once for all metrics
        for m in self.metrics:
            m.total += float(m.per_query(ranks).sum())
            m.count += len(ranks)

    def merge(self, other: "MetricCollection") -> None:
        for mine, theirs in zip(self.metrics, other.metrics, strict=True):
            mine.merge(theirs)

    def compute(self) -> dict[str, float]:
        return {m.key: m.compute() for m in self.metrics}

    @property
    def count(self) -> int:
        return self.metrics[0].count if self.metrics else 0


class CatalogCoverage:
    """Share of the catalog that appears in anyone's top-k ("coverage@k"). Not a quality metric
    but a symptom check: a model that ignores the history recommends the same few popular items to
    everyone (coverage ~ k / catalog) and still scores a popularity-level recall."""

    def __init__(self, k: int, catalog_size: int):
        if k < 1 or catalog_size < 1:
            raise ValueError(f"coverage needs k >= 1 and a catalog, got k={k}, catalog_size={catalog_size}")
        self.k = k
        self.seen = np.zeros(catalog_size + 1, dtype=bool)  # item ids are 1..N

    @property
    def key(self) -> str:
        return f"coverage@{self.k}"

    def update(self, ranked: np.ndarray) -> None:
        top = np.asarray(ranked)[:, :self.k].ravel()
        top = top[(top > 0) & (top < len(self.seen))]
        self.seen[top] = True

    def merge(self, other: "CatalogCoverage") -> None:
        self.seen |= other.seen

    def compute(self) -> float:
        return float(self.seen[1:].mean())


# The paper's Table 1 (Recall@5, NDCG@5, Recall@10, NDCG@10): our bar and the baseline's.
PAPER_TABLE1 = {
    "beauty": {"TIGER": (0.0454, 0.0321, 0.0648, 0.0384), "SASRec": (0.0387, 0.0249, 0.0605, 0.0318)},
    "sports": {"TIGER": (0.0264, 0.0181, 0.0400, 0.0225), "SASRec": (0.0233, 0.0154, 0.0350, 0.0192)},
    "toys": {"TIGER": (0.0521, 0.0371, 0.0712, 0.0432), "SASRec": (0.0463, 0.0306, 0.0675, 0.0374)},
}
PAPER_KEYS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


def category_entropy(categories: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each ranked list's category distribution: [B, K] category ids of the
    top-K items (-1 = empty slot, ignored) -> [B]. The paper's Entropy@K (Sec. 4.4) averages it."""
    categories = np.asarray(categories)
    out = np.zeros(len(categories), dtype=np.float64)
    for i, row in enumerate(categories):
        _, counts = np.unique(row[row >= 0], return_counts=True)
        if len(counts):
            p = counts / counts.sum()
            out[i] = float(-(p * np.log(p)).sum())
    return out
