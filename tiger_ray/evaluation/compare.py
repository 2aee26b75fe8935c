"""`tiger compare`: TIGER vs the dual-encoder baseline on one run, measured on this machine.

    tiger compare --run runs/beauty

Writes RUN/compare/comparison.json, comparison.md and comparison.png with, per model:
  quality        Recall/NDCG@5/10 from RUN/eval/<model>/<split>/metrics.json (`tiger evaluate`)
  latency        measured here and now through the model's ``load_retriever``: batch-1 requests
                 (p50/p95/mean ms) and batched requests (ms per query, queries/s)
  index bytes    what retrieval keeps beside the network, per item: TIGER's Semantic-ID table plus
                 its prefix trie; the dual encoder's FAISS index (vectors or codes, graph, id map)
  training time  from each model's saved training summary (TIGER: RQ-VAE + seq2seq)
Same histories, same k, same process and thread settings for both models.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import asdict, dataclass, field

from tiger_ray import atomic
from tiger_ray.config import build_config, stage_parser
from tiger_ray.runs import RunDir

log = logging.getLogger(__name__)

QUALITY_KEYS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
MODEL_LABELS = {"tiger": "TIGER (generative retrieval)", "ann": "Dual encoder + FAISS",
                "hybrid": "Hybrid (TIGER + dual encoder candidates, re-ranked by both)"}


@dataclass
class CompareConfig:
    models: tuple[str, ...] = field(default=("tiger", "ann", "hybrid"), metadata={"help": "models to compare"})
    split: str = field(default="test", metadata={"help": "split whose metrics and histories are used"})
    k: int = field(default=10, metadata={"help": "list length requested per query"})
    single_queries: int = field(default=100, metadata={"help": "batch-1 requests timed per model"})
    batch_size: int = field(default=256, metadata={"help": "queries per batched request"})
    batched_queries: int = field(default=1024, metadata={"help": "queries timed in batched requests"})
    warmup: int = field(default=3, metadata={"help": "untimed requests before timing"})
    threads: int = field(default=1, metadata={
        "help": "torch intra-op threads while timing both models (0 = torch's default); 1 is what a "
                "serving replica per core uses, and larger teams spin-wait on a busy machine"})
    ann_index_type: str | None = field(default=None, metadata={
        "help": "dual encoder: FAISS index to time (default: the one trained)"})
    tiger_beam_size: int | None = field(default=None, metadata={"help": "TIGER: beam size (default: its loader's)"})


PRESETS: dict[str, dict] = {
    "tiny": {"single_queries": 5, "batched_queries": 64, "batch_size": 32, "warmup": 1},
    "cpu": {},
    "paper": {"single_queries": 500, "batched_queries": 8192},
}


# ---------------------------------------------------------------- the measurements

def quality(run: RunDir, model: str) -> dict:
    """Saved metrics per split, or a note saying which command makes them."""
    out = {}
    for split in ("valid", "test"):
        path = run.eval_dir(model, split) / "metrics.json"
        if path.exists():
            metrics = atomic.read_json(path)
            out[split] = {k: metrics[k] for k in (*QUALITY_KEYS, "count") if k in metrics}
        else:
            out[split] = {"missing": f"run `tiger evaluate --run {run.root} --model {model} --split {split}`"}
    return out


def query_set(run: RunDir, split: str, n: int):
    """The first ``n`` (history, user id) pairs of a split: what both models are timed on. Only
    the first batch of users is read, however large the run."""
    import numpy as np

    from tiger_ray.data.schema import iter_batches
    from tiger_ray.evaluation.retrieval import eval_examples, user_columns

    histories, user_ids = [], []
    for users in iter_batches(run.require(run.sequences, "tiger prepare"), ["user_id", "item_ids"],
                              max(n, 1)):
        ids, offsets, flat = user_columns(users.slice(0, n - len(histories)))
        histories += eval_examples(offsets, flat, split)[0]
        user_ids.append(ids)
        if len(histories) >= n:
            break
    return histories, (np.concatenate(user_ids) if user_ids else np.zeros(0, np.int64))


def latency(retriever, histories, user_ids, config: CompareConfig) -> dict:
    """Batch-1 and batched request latency of ``retriever.recommend``."""
    import numpy as np

    for i in range(min(config.warmup, len(histories))):
        retriever.recommend([histories[i]], user_ids[i:i + 1], config.k)
    singles = []
    for i in range(min(config.single_queries, len(histories))):
        start = time.perf_counter()
        retriever.recommend([histories[i]], user_ids[i:i + 1], config.k)
        singles.append(time.perf_counter() - start)
    singles_ms = 1e3 * np.asarray(singles)
    n = min(config.batched_queries, len(histories))
    start = time.perf_counter()
    for lo in range(0, n, config.batch_size):
        retriever.recommend(histories[lo:lo + config.batch_size], user_ids[lo:lo + config.batch_size], config.k)
    batched = time.perf_counter() - start
    return {
        "single_p50_ms": float(np.percentile(singles_ms, 50)),
        "single_p95_ms": float(np.percentile(singles_ms, 95)),
        "single_mean_ms": float(singles_ms.mean()),
        "single_queries": len(singles),
        "batched_ms_per_query": 1e3 * batched / max(n, 1),
        "batched_queries_per_second": n / batched if batched > 0 else None,
        "batched_queries": n,
        "batch_size": config.batch_size,
    }


def tiger_index_bytes(run: RunDir, retriever=None) -> dict:
    """Semantic-ID table (as held in memory: [N+1, 4] codes indexed by item id) and the
    decoding index's arrays."""
    if retriever is not None and hasattr(retriever, "trie") and hasattr(retriever, "tokenizer"):
        table, trie = retriever.tokenizer.semantic_ids, retriever.trie
    else:
        from tiger_ray.semantic_ids.table import read_semantic_ids
        from tiger_ray.seq2seq.trie import SemanticIdTrie

        table = read_semantic_ids(run)
        trie = SemanticIdTrie.from_semantic_ids(table)
    table_bytes = int(table.nbytes())
    trie_bytes = int(trie.nbytes())
    items = int(table.num_items)
    return {"items": items, "semantic_id_table_bytes": table_bytes, "trie_bytes": trie_bytes,
            "bytes": table_bytes + trie_bytes, "bytes_per_item": (table_bytes + trie_bytes) / max(items, 1)}


def ann_index_bytes(run: RunDir, retriever=None, index_type: str | None = None) -> dict:
    """The FAISS index as serialised (what serving loads)."""
    if retriever is not None and hasattr(retriever, "index_bytes"):
        nbytes, items = retriever.index_bytes(), retriever.index.ntotal
        index_type = retriever.index.config.index_type
    else:
        from tiger_ray.baseline.retriever import default_index_type, index_dir

        index_type = index_type or default_index_type(run)
        meta = atomic.read_json(run.require(index_dir(run, index_type) / "index.json", "tiger train-baseline"))
        nbytes, items = meta["bytes"], meta["count"]
    return {"items": int(items), "index_type": index_type, "bytes": int(nbytes),
            "bytes_per_item": nbytes / max(items, 1)}


def training_time(run: RunDir, model: str) -> dict:
    """Seconds of training from the saved summaries (None where a summary is missing)."""
    def read(path, key):
        return atomic.read_json(path).get(key) if path.exists() else None

    if model == "tiger":
        rqvae = (read(run.semantic_ids / "report.json", "training") or {}).get("train_seconds")
        seq2seq = read(run.seq2seq / "summary.json", "train_seconds")
        parts = {"rqvae_seconds": rqvae, "seq2seq_seconds": seq2seq}
    elif model == "ann":
        parts = {"dual_encoder_seconds": read(run.baseline / "summary.json", "train_seconds")}
    elif model == "hybrid":  # both models, plus choosing the weight on validation
        parts = {**{k: v for k, v in training_time(run, "tiger").items() if k != "seconds"},
                 **{k: v for k, v in training_time(run, "ann").items() if k != "seconds"},
                 "tune_seconds": read(run.root.joinpath("hybrid", "tuning.json"), "seconds")}
    else:
        parts = {}
    known = [v for v in parts.values() if v is not None]
    return {**parts, "seconds": sum(known) if known and len(known) == len(parts) else None}


def compare_model(run: RunDir, model: str, histories, user_ids, config: CompareConfig) -> dict:
    from tiger_ray.retrievers import load_retriever

    row = {"model": model, "label": MODEL_LABELS.get(model, model), "quality": quality(run, model),
           "training": training_time(run, model)}
    options = {}
    if model == "ann" and config.ann_index_type:
        options["index_type"] = config.ann_index_type
    if model == "tiger" and config.tiger_beam_size:
        options["beam_size"] = config.tiger_beam_size
    retriever = None
    try:
        start = time.perf_counter()
        retriever = load_retriever(run, model, **options)
        row["load_seconds"] = time.perf_counter() - start
    except (FileNotFoundError, ImportError) as err:
        # ImportError: the model's package is not installed/written yet; FileNotFoundError: not trained.
        row["unavailable"] = f"{type(err).__name__}: {err}"
        log.warning("compare: %s cannot be loaded (%s); its latency is not measured", model, err)
    if retriever is not None:
        log.info("compare: timing %s (%d single requests, %d batched queries)", model,
                 min(config.single_queries, len(histories)), min(config.batched_queries, len(histories)))
        from tiger_ray.baseline.retriever import torch_threads

        with torch_threads(config.threads):
            row["latency"] = latency(retriever, histories, user_ids, config)
    try:
        sizer = {"tiger": tiger_index_bytes, "ann": ann_index_bytes}.get(model)
        if sizer is not None:
            row["index"] = sizer(run, retriever) if model == "tiger" else sizer(run, retriever, config.ann_index_type)
    except (FileNotFoundError, ImportError) as err:
        row["index"] = {"missing": str(err)}
    return row


def run_compare(run: RunDir, config: CompareConfig) -> dict:
    """Measure every model of ``config.models`` and write RUN/compare/comparison.{json,md}."""
    import torch

    n = max(config.single_queries + config.warmup, config.batched_queries)
    histories, user_ids = query_set(run, config.split, n)
    result = {
        "run": str(run.root), "split": config.split, "config": asdict(config),
        "machine": {"cpus": os.cpu_count(), "torch_threads": config.threads or torch.get_num_threads(),
                    "load_average_1m": os.getloadavg()[0], "cuda": torch.cuda.is_available()},
        "models": [compare_model(run, m, histories, user_ids, config) for m in config.models],
    }
    result["machine"]["load_average_1m_after"] = os.getloadavg()[0]
    result["markdown"] = format_markdown(result, dataset_of(run))
    atomic.write_json(run.compare / "comparison.json", result)
    atomic.write_text(run.compare / "comparison.md", result["markdown"])
    plot_comparison(result, run.compare / "comparison.png", dataset_of(run))
    return result


def dataset_of(run: RunDir) -> str | None:
    return atomic.read_json(run.stats).get("dataset") if run.stats.exists() else None


# ---------------------------------------------------------------- the table

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_markdown(result: dict, dataset: str | None = None) -> str:
    from tiger_ray.evaluation.metrics import PAPER_TABLE1

    split = result["split"]
    lines = [f"# TIGER vs dual encoder on {dataset or result['run']} ({split} split)", "",
             "| model | R@5 | N@5 | R@10 | N@10 | batch-1 p50 ms | batch-1 p95 ms | batched ms/query "
             "| index bytes/item | training s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for row in result["models"]:
        q = row["quality"].get(split, {})
        lat = row.get("latency", {})
        index = row.get("index", {})
        cells = [row["label"], *(_fmt(q.get(k), ".4f") for k in QUALITY_KEYS),
                 _fmt(lat.get("single_p50_ms"), ".2f"), _fmt(lat.get("single_p95_ms"), ".2f"),
                 _fmt(lat.get("batched_ms_per_query"), ".3f"), _fmt(index.get("bytes_per_item"), ".1f"),
                 _fmt(row["training"].get("seconds"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
        if "missing" in q:
            notes.append(f"- {row['label']}: no {split} metrics; {q['missing']}")
        if "unavailable" in row:
            notes.append(f"- {row['label']}: latency not measured ({row['unavailable']})")
        if "missing" in index:
            notes.append(f"- {row['label']}: index size unknown ({index['missing']})")
        if row["model"] == "tiger" and "trie_bytes" in index:
            notes.append(f"- TIGER index = Semantic-ID table {index['semantic_id_table_bytes']:,} B + "
                         f"trie {index['trie_bytes']:,} B for {index['items']:,} items")
        if row["model"] == "ann" and "index_type" in index:
            notes.append(f"- Dual-encoder index: FAISS {index['index_type']}, {index['bytes']:,} B "
                         f"for {index['items']:,} items")
    for name, values in PAPER_TABLE1.get((dataset or "").lower(), {}).items():
        lines.append(f"| paper {name} | " + " | ".join(f"{v:.4f}" for v in values) + " | | | | | |")
    machine = result["machine"]
    lines += ["", f"Latency measured in one process on this machine ({machine['cpus']} CPUs, "
                  f"{machine['torch_threads']} torch threads, 1-min load average "
                  f"{machine['load_average_1m']:.1f} -> {machine['load_average_1m_after']:.1f}); "
                  f"k = {result['config']['k']}, batched requests of {result['config']['batch_size']}. "
                  "Training time is each model's own training loop (TIGER: RQ-VAE + seq2seq), "
                  "from its saved summary.", *([""] + notes if notes else [])]
    return "\n".join(lines) + "\n"


def plot_comparison(result: dict, path, dataset: str | None = None) -> None:
    """Two panels: test Recall/NDCG@10 (with the paper's rows) and batch-1 / batched latency."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    from tiger_ray.evaluation.metrics import PAPER_KEYS, PAPER_TABLE1

    split = result["split"]
    rows = [(r["label"], [r["quality"].get(split, {}).get(k, 0.0) for k in ("recall@10", "ndcg@10")])
            for r in result["models"]]
    for name, values in PAPER_TABLE1.get((dataset or "").lower(), {}).items():
        rows.append((f"paper {name}", [values[PAPER_KEYS.index(k)] for k in ("recall@10", "ndcg@10")]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(2)
    width = 0.8 / max(len(rows), 1)
    for i, (label, values) in enumerate(rows):
        left.bar(x + i * width, values, width, label=label)
    left.set_xticks(x + width * (len(rows) - 1) / 2, ["Recall@10", "NDCG@10"])
    left.set_title(f"{split} quality ({dataset or 'run'})")
    left.legend(fontsize=8)
    timed = [r for r in result["models"] if "latency" in r]
    for i, key in enumerate(("single_p50_ms", "batched_ms_per_query")):
        right.bar(np.arange(len(timed)) + i * 0.4, [r["latency"][key] for r in timed], 0.4,
                  label={"single_p50_ms": "batch 1 (p50)", "batched_ms_per_query": "batched, per query"}[key])
    right.set_xticks(np.arange(len(timed)) + 0.2, [r["label"] for r in timed], fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("ms per query")
    right.set_title("latency on this machine")
    right.legend(fontsize=8)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ---------------------------------------------------------------- CLI

def register(subparsers) -> None:
    stage_parser(
        subparsers, "compare", config_cls=CompareConfig, presets=PRESETS, func=_compare,
        help="table of TIGER vs the dual-encoder baseline: quality, latency, index size, "
        "training time",
        description="Read both models' saved metrics and training summaries, time both retrievers "
        "on the same histories (batch 1 and batched), and write RUN/compare/comparison.md and .json.",
        preset_help="how many requests to time: tiny (tests), cpu, paper")


def _compare(args: argparse.Namespace) -> int:
    run = RunDir(args.run)
    result = run_compare(run, build_config(CompareConfig, args, PRESETS[args.preset]))
    print(result["markdown"])
    print(f"wrote {run.compare / 'comparison.md'}, comparison.json")
    return 0
