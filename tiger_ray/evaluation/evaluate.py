"""Evaluate a trained model of a run directory: `tiger evaluate` and the pipeline's step.

``EvaluateConfig`` holds every setting (the `tiger evaluate` flags come from it);
``run_evaluate`` evaluates one model on each split; ``evaluate`` is one split: load the model by
name (``tiger_ray.retrievers``), add Entropy@10, run ``evaluate_retriever`` in this process or as
Ray Data batch inference, write RUN/eval/<model>/<split>/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from tiger_ray.runs import RunDir

SPLITS = ("valid", "test")
# Loader options, passed to the model's loader only when set; one the loader does not take is an error.
MODEL_OPTIONS = ("beam_size", "temperature", "device", "chunk_size", "precision", "index_type",
                 "tiger_weight", "tiger_candidates", "dense_candidates")


@dataclass
class EvaluateConfig:
    model: Literal["tiger", "ann", "hybrid"] = field(default="tiger", metadata={
        "help": "model to evaluate: tiger, ann (dual encoder + FAISS) or hybrid (TIGER's and the "
                "dual encoder's candidates re-ranked by both; `tiger tune-hybrid` first)"})
    split: tuple[str, ...] = field(default=("test",), metadata={
        "help": "splits to evaluate, in order (valid and/or test)"})
    k: int = field(default=10, metadata={"help": "ranked list length"})
    batch_size: int = field(default=1024, metadata={
        "help": "users handed to the model at once; TIGER sorts them by history length inside a "
                "batch, so larger batches pad less"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N users"})
    workers: int = field(default=0, metadata={
        "help": "Ray Data actors decoding batches of users, each loading the model once (0 = in "
                "this process; both stream the users)"})
    # model options (None: the model's own default)
    beam_size: int | None = field(default=None, metadata={"help": "TIGER: beams kept per step (model default 20)"})
    temperature: float | None = field(default=None, metadata={
        "help": "TIGER: > 0 samples IDs without replacement at this temperature instead of beam "
                "search (the paper's diversity experiment; model default 0)"})
    device: str | None = field(default=None, metadata={"help": "cpu (model default) or cuda"})
    chunk_size: int | None = field(default=None, metadata={
        "help": "TIGER: users decoded together inside a batch (model default 64)"})
    precision: Literal["fp32", "bf16"] | None = field(default=None, metadata={
        "help": "TIGER: bf16 runs the matmuls in bfloat16, faster on CPUs with AVX512-BF16 and on "
                "GPUs (model default fp32)"})
    index_type: str | None = field(default=None, metadata={
        "help": "ann: which saved FAISS index to search (default: the one trained)"})
    tiger_weight: float | None = field(default=None, metadata={
        "help": "hybrid: TIGER's share of the mixed score (default: the one `tiger tune-hybrid` chose)"})
    tiger_candidates: int | None = field(default=None, metadata={
        "help": "hybrid: TIGER beam candidates per user (default 20)"})
    dense_candidates: int | None = field(default=None, metadata={
        "help": "hybrid: dual-encoder candidates per user (default 20)"})
    category_level: int = field(default=-1, metadata={
        "help": "which level of an item's first category path Entropy@10 uses (-1: the most specific)"})
    # cold start (paper Sec. 4.3)
    cold_start: bool = field(default=False, metadata={
        "help": "TIGER trained with held-out items: recall on the test users whose target is an "
                "unseen item, mixing unseen items in by the epsilon rule"})
    epsilon: float = field(default=0.1, metadata={
        "help": "cold start: largest share of the top-k given to unseen items"})
    cold_prefix_len: int = field(default=3, metadata={
        "help": "cold start: an unseen item joins a generated ID sharing this many leading codes "
                "(3 is the paper's; 2 reaches more unseen items)"})
    unseen_beam: int = field(default=0, metadata={
        "help": "cold start: also decode this many IDs among the unseen items alone and merge "
                "them in by score (0 = the paper's rule only)"})
    unseen_quota: bool = field(default=False, metadata={
        "help": "cold start: unseen items get exactly floor(epsilon * k) of the top-k when there "
                "are candidates (with --unseen-beam), instead of at most that many"})

    def __post_init__(self):
        self.split = tuple(self.split)
        bad = [s for s in self.split if s not in SPLITS]
        if bad or not self.split:
            raise ValueError(f"--split: choose from {', '.join(SPLITS)}, got {list(self.split)}")
        if self.k < 1 or self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("--k, --batch-size and --limit must be >= 1")
        if self.workers < 0:
            raise ValueError("--workers must be >= 0")
        if self.cold_start and self.model != "tiger":
            raise ValueError("--cold-start applies to --model tiger only")

    def model_options(self) -> dict:
        return {name: getattr(self, name) for name in MODEL_OPTIONS if getattr(self, name) is not None}


# Evaluation is the same at every scale: the full split, the paper's metrics.
PRESETS: dict[str, dict] = {"tiny": {}, "cpu": {}, "paper": {}}


def run_evaluate(run: RunDir, config: EvaluateConfig) -> dict:
    """Evaluate ``config.model`` on each split; returns {split: metrics}."""
    options = config.model_options()
    if config.cold_start:
        return evaluate_cold(run, config)
    return evaluate_splits(run, config.model, tuple(config.split), k=config.k,
                           batch_size=config.batch_size, limit=config.limit,
                           category_level=config.category_level, workers=config.workers, **options)


def load(run, model: str, **options):
    from tiger_ray.retrievers import load_retriever, loader_accepts

    accepted = loader_accepts(model)
    wrong = sorted(set(options) - accepted)
    if wrong:
        flags = ", ".join("--" + w.replace("_", "-") for w in wrong)
        raise ValueError(f"{flags} does not apply to --model {model}")
    return load_retriever(run, model, **options)


def item_categories(run, level: int = -1) -> tuple[np.ndarray, list[str]]:
    """[max_item_id + 1] int32 category index of each item (element ``level`` of its first category
    path, its last element when the path is shorter, "" when it has none) and the category
    names in order of first appearance. Streamed over items.parquet with array operations."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from tiger_ray.data.schema import iter_batches
    from tiger_ray.evaluation.retrieval import catalog_size

    path = run.require(run.items, "tiger prepare")
    lookup = np.full(catalog_size(run) + 1, -1, dtype=np.int32)  # 4 B/item, shipped to actors
    names: dict[str, int] = {}
    for batch in iter_batches(path, ["item_id", "categories"]):
        item_ids = batch.column("item_id").to_numpy()
        paths = batch.column("categories")
        n_paths = pc.fill_null(pc.list_value_length(paths), 0).to_numpy()
        inner = pc.list_flatten(paths)  # every path of these items, in order
        first = np.cumsum(n_paths) - n_paths  # index of each item's first path in ``inner``
        path_len = pc.fill_null(pc.list_value_length(inner), 0).to_numpy()
        words = pc.list_flatten(inner).to_numpy(zero_copy_only=False)
        word_start = np.cumsum(path_len) - path_len
        length = np.zeros(len(item_ids), dtype=np.int64)  # of each item's first path
        length[n_paths > 0] = path_len[first[n_paths > 0]]
        pick = level if level >= 0 else length + level
        pick = np.where((pick < 0) | (pick >= length), length - 1, pick)  # out of range: the leaf
        has = length > 0
        chosen = np.full(len(item_ids), "", dtype=object)
        if has.any():
            chosen[has] = words[word_start[first[has]] + pick[has]]
        encoded = pc.dictionary_encode(pa.array(chosen, pa.string()))  # first-appearance order
        codes = np.array([names.setdefault(name, len(names))
                          for name in encoded.dictionary.to_pylist()], dtype=np.int32)
        lookup[item_ids] = codes[encoded.indices.to_numpy()]
    return lookup, list(names)


class WithEntropy:
    """Adds ``entropy@K`` (mean category entropy of the top-K, K = 10 or the list length) to any
    retriever's extras, so it lands in metrics.json with the other numbers."""

    def __init__(self, retriever, category_of, k: int = 10):
        self.inner, self.category_of, self.k = retriever, category_of, k
        self.name = retriever.name
        self.key = f"entropy@{k}"

    def recommend(self, histories, user_ids, k):
        from tiger_ray.evaluation.metrics import category_entropy

        recs = self.inner.recommend(histories, user_ids, k)
        top = recs.item_ids[:, :self.k]
        cats = self.category_of[top.clip(min=0, max=len(self.category_of) - 1)]
        recs.extras[self.key] = float(category_entropy(np.where(top >= 0, cats, -1)).sum())
        return recs


def evaluate(run, model: str = "tiger", split: str = "test", **kwargs) -> dict:
    """Load ``model`` through the registry and run ``evaluate_retriever`` on one split; returns
    metrics.json. Keywords as ``evaluate_splits``."""
    return evaluate_splits(run, model, (split,), **kwargs)[split]


def evaluate_splits(run, model: str = "tiger", splits: tuple[str, ...] = ("test",), *, k: int = 10,
                    batch_size: int = 1024, limit: int | None = None, category_level: int = -1,
                    write: bool = True, progress: bool = True, workers: int = 0,
                    **options) -> dict[str, dict]:
    """``evaluate`` on each of ``splits``, loading the model and the item categories once;
    returns {split: metrics}. ``workers`` >= 1: Ray Data batch inference, each actor loading the
    model itself."""
    import functools

    from tiger_ray import atomic
    from tiger_ray.retrievers import RetrieverFactory
    from tiger_ray.evaluation.retrieval import evaluate_retriever

    retriever = load(run, model, **options)  # here too: bad options and missing models fail early
    category_of, _ = item_categories(run, category_level)
    wrap = functools.partial(WithEntropy, category_of=category_of, k=min(10, k))
    # The history a model reads (its own max_history, or its tokenizer's); None: all of it.
    max_history = (getattr(retriever, "max_history", None)
                   or getattr(getattr(retriever, "tokenizer", None), "max_history", None))
    target = (RetrieverFactory(str(run.root), model, dict(options), wrap=wrap) if workers
              else wrap(retriever))
    results = {}
    for split in splits:
        result = evaluate_retriever(target, run, split, k=k, batch_size=batch_size,
                                    max_history=max_history, limit=limit, write=write,
                                    progress=progress, workers=workers)
        result["dataset"] = dataset_of(run)
        for name in ("beam_size", "temperature", "precision"):
            if hasattr(retriever, name):
                result[name] = getattr(retriever, name)
        if write:  # the loop wrote metrics.json; add what it does not know about
            atomic.write_json(run.eval_dir(result["model"], split) / "metrics.json", result)
        results[split] = result
    return results


def evaluate_cold(run: RunDir, config: EvaluateConfig) -> dict[str, dict]:
    """``--cold-start`` on each split; the model must have been trained with unseen items held out."""
    from tiger_ray.seq2seq.cold_items import load_cold_items
    from tiger_ray.seq2seq.cold_start import evaluate_cold_start
    from tiger_ray.seq2seq.retriever import model_dir

    cold_items = load_cold_items(model_dir(run))
    if cold_items is None:
        raise ValueError(f"{model_dir(run)} has no cold_items.json: this model saw every item in "
                         f"training; train it with unseen items held out to evaluate cold start")
    retriever = load(run, "tiger", **config.model_options())
    return {split: evaluate_cold_start(retriever, run, cold_items, epsilon=config.epsilon, k=config.k,
                                       batch_size=config.batch_size, split=split,
                                       prefix_len=config.cold_prefix_len, unseen_beam=config.unseen_beam,
                                       quota=config.unseen_quota)
            for split in config.split}


def dataset_of(run) -> str | None:
    from tiger_ray import atomic

    if not run.stats.exists():
        return None
    stats = atomic.read_json(run.stats)
    return stats.get("dataset") if isinstance(stats, dict) else None


