"""`tiger evaluate`: full-ranking leave-one-out metrics of a trained model, next to the paper's.

    tiger evaluate --run runs/beauty --split test                    # TIGER, beam 20
    tiger evaluate --run runs/beauty --split test --model ann        # dual encoder + FAISS
    tiger evaluate --run runs/beauty --split test --temperature 1.5  # diverse sampling (Entropy@10)
    tiger evaluate --run runs/beauty --cold-start --epsilon 0.1      # paper Sec. 4.3

Writes RUN/eval/<model>/<split>/{metrics.json, predictions.parquet/ (parts)}: Recall/NDCG@5/10, the
invalid-ID rate (TIGER), Entropy@10 of the top-10's item categories, throughput.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

log = logging.getLogger(__name__)

# Flags passed to the model's loader when given; a flag the loader does not take is an error.
MODEL_OPTIONS = ("beam_size", "temperature", "device", "chunk_size", "precision", "index_type")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="Recall/NDCG@5/10, invalid-ID rate and Entropy@10 on the valid or test split",
        description="Rank the whole catalog for every user's leave-one-out history and write "
        "RUN/eval/<model>/<split>/metrics.json and predictions.parquet; prints the paper's Table 1 "
        "row for the run's dataset beside ours.")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory")
    p.add_argument("--split", choices=("valid", "test"), default="test", help="default: test")
    p.add_argument("--model", default="tiger", help="tiger (default) or ann")
    p.add_argument("--k", type=int, default=10, help="list length to rank (default: 10)")
    p.add_argument("--batch-size", type=int, default=1024,
                   help="users handed to the model at once; TIGER sorts them by history length "
                        "inside a batch, so larger batches pad less (default: 1024)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N users")
    p.add_argument("--workers", type=int, default=0,
                   help="Ray Data actors decoding batches of users in parallel, each loading the "
                        "model once (default: 0 = in this process)")
    p.add_argument("--beam-size", dest="beam_size", type=int, default=None,
                   help="TIGER: beams kept per step (default: 20)")
    p.add_argument("--temperature", type=float, default=None,
                   help="TIGER: > 0 samples IDs without replacement at this temperature instead of "
                        "beam search (the paper's diversity experiment; default: 0)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--chunk-size", dest="chunk_size", type=int, default=None,
                   help="TIGER: users decoded together inside a batch (default: 64)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="TIGER: bf16 runs the matmuls in bfloat16, faster on CPUs with "
                        "AVX512-BF16 and on GPUs (default: fp32)")
    p.add_argument("--index-type", dest="index_type", default=None,
                   help="ann: which saved FAISS index to search (default: the one trained)")
    p.add_argument("--category-level", type=int, default=-1,
                   help="which level of an item's first category path Entropy@10 uses "
                        "(default: -1, the most specific)")
    p.add_argument("--cold-start", action="store_true",
                   help="TIGER trained with held-out items: recall on the test users whose target "
                        "is an unseen item, mixing unseen items in by the epsilon rule")
    p.add_argument("--epsilon", type=float, default=0.1,
                   help="cold start: largest share of the top-k given to unseen items (default: 0.1)")
    p.add_argument("--cold-prefix-len", dest="cold_prefix_len", type=int, default=3,
                   help="cold start: an unseen item joins a generated ID sharing this many leading "
                        "codes (default: 3, the paper's; 2 reaches more unseen items)")
    p.add_argument("--unseen-beam", dest="unseen_beam", type=int, default=0,
                   help="cold start: also decode this many IDs among the unseen items alone and "
                        "merge them in by score (default: 0 = the paper's rule only)")
    p.add_argument("--unseen-quota", dest="unseen_quota", action="store_true",
                   help="cold start: unseen items get exactly floor(epsilon * k) of the top-k when "
                        "there are candidates (with --unseen-beam), instead of at most that many")
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from tiger_ray.runs import RunDir

    run = RunDir(args.run)
    if args.k < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--k, --batch-size and --limit must be >= 1")
    if args.workers < 0:
        raise ValueError("--workers must be >= 0")
    options = {name: getattr(args, name) for name in MODEL_OPTIONS if getattr(args, name) is not None}
    if args.cold_start:
        result = evaluate_cold(run, args, options)
        print(format_cold(result, run))
        return 0
    result = evaluate(run, args.model, args.split, k=args.k, batch_size=args.batch_size,
                      limit=args.limit, category_level=args.category_level, workers=args.workers,
                      **options)
    print(format_table(result, dataset_of(run)))
    print(f"wrote {run.eval_dir(result['model'], args.split)}/metrics.json, predictions.parquet")
    return 0


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


def evaluate(run, model: str = "tiger", split: str = "test", *, k: int = 10, batch_size: int = 1024,
             limit: int | None = None, category_level: int = -1, write: bool = True,
             progress: bool = True, workers: int = 0, **options) -> dict:
    """Load ``model`` through the registry and run ``evaluate_retriever``; returns metrics.json.
    ``workers`` >= 1: Ray Data batch inference, each actor loading the model itself."""
    import functools

    from tiger_ray import atomic
    from tiger_ray.retrievers import RetrieverFactory
    from tiger_ray.evaluation.retrieval import evaluate_retriever

    retriever = load(run, model, **options)  # here too: bad options and missing models fail early
    category_of, _ = item_categories(run, category_level)
    wrap = functools.partial(WithEntropy, category_of=category_of, k=min(10, k))
    max_history = getattr(getattr(retriever, "tokenizer", None), "max_history", None)
    target = (RetrieverFactory(str(run.root), model, dict(options), wrap=wrap) if workers
              else wrap(retriever))
    result = evaluate_retriever(target, run, split, k=k, batch_size=batch_size,
                                max_history=max_history, limit=limit, write=write,
                                progress=progress, workers=workers)
    result["dataset"] = dataset_of(run)
    for name in ("beam_size", "temperature", "precision"):
        if hasattr(retriever, name):
            result[name] = getattr(retriever, name)
    if write:  # the loop wrote metrics.json; add what it does not know about
        atomic.write_json(run.eval_dir(result["model"], split) / "metrics.json", result)
    return result


def evaluate_cold(run, args: argparse.Namespace, options: dict) -> dict:
    """``--cold-start``: the model must have been trained with unseen items held out."""
    from tiger_ray.seq2seq.cold_items import load_cold_items
    from tiger_ray.seq2seq.cold_start import evaluate_cold_start
    from tiger_ray.seq2seq.retriever import model_dir

    if args.model != "tiger":
        raise ValueError("--cold-start applies to --model tiger only")
    cold_items = load_cold_items(model_dir(run))
    if cold_items is None:
        raise ValueError(f"{model_dir(run)} has no cold_items.json: this model saw every item in "
                         f"training; train it with unseen items held out to evaluate cold start")
    retriever = load(run, "tiger", **options)
    return evaluate_cold_start(retriever, run, cold_items, epsilon=args.epsilon, k=args.k,
                               batch_size=args.batch_size, split=args.split,
                               prefix_len=args.cold_prefix_len, unseen_beam=args.unseen_beam,
                               quota=args.unseen_quota)


def dataset_of(run) -> str | None:
    from tiger_ray import atomic

    if not run.stats.exists():
        return None
    stats = atomic.read_json(run.stats)
    return stats.get("dataset") if isinstance(stats, dict) else None


def format_table(result: dict, dataset: str | None) -> str:
    """Our row under the paper's Table 1 rows for the same dataset (when it has them)."""
    from tiger_ray.evaluation.metrics import PAPER_KEYS, PAPER_TABLE1

    header = f"{'':24}" + "".join(f"{key:>11}" for key in PAPER_KEYS)
    label = f"ours ({result['model']}, {result['split']})"
    rows = [header, f"{label:24}" + "".join(
        f"{result[key]:>11.4f}" if key in result else f"{'-':>11}" for key in PAPER_KEYS)]
    for name, values in PAPER_TABLE1.get((dataset or "").lower(), {}).items():
        rows.append(f"{'paper ' + name:24}" + "".join(f"{v:>11.4f}" for v in values))
    extras = [f"{result['count']} users ({dataset or 'dataset unknown'})"]
    if "invalid_id_rate" in result:
        extras.append(f"invalid-ID rate {result['invalid_id_rate']:.4f}")
    extras += [f"{key} {value:.3f}" for key, value in result.items() if key.startswith("entropy@")]
    if "beam_size" in result:
        extras.append(f"beam {result['beam_size']}" + (
            f", temperature {result['temperature']}" if result.get("temperature") else ""))
    if result.get("queries_per_second"):
        extras.append(f"{result['queries_per_second']:.0f} users/s")
    return "\n".join(rows + ["  ".join(extras)])


def format_cold(result: dict, run) -> str:
    recalls = "  ".join(f"{key} {value:.4f}" for key, value in result.items()
                        if key.startswith(("recall@", "ndcg@")))
    n = result["count"]
    return (f"cold start: {n} {result['split']} users whose target is one of {result['cold_items']} "
            f"unseen items, epsilon {result['epsilon']}, prefix {result['prefix_len']} codes"
            + (f", unseen beam {result['unseen_beam']}" if result.get("unseen_beam") else "")
            + (", unseen quota" if result.get("quota") else "") + "\n"
            f"{recalls}  unseen share of top-k {result['unseen_share']:.4f}\n"
            f"reach: {result['prefix_reachable_items']} unseen items share their prefix with a seen "
            f"item ({result['prefix_reachable_users']} of the {n} targets); the beam generated an "
            f"unseen item's own ID for {result['generated_unseen_users']} users\n"
            f"wrote {run.eval_dir(result['model'], result['split'])}")
