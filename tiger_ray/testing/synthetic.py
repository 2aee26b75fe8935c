"""Synthetic run directories with learnable structure, for fast tests of every stage.

Items fall into ``n_topics`` topics; a user picks a topic and mostly walks through it in item
order, so next-item prediction is learnable and embeddings of one topic are close together.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tiger_ray import atomic
from tiger_ray.data.schema import ITEMS_SCHEMA, SEQUENCES_SCHEMA, read_items
from tiger_ray.embedding.store import write_embeddings
from tiger_ray.runs import RunDir

TOPICS = ["lipstick", "shampoo", "tent", "kayak", "puzzle", "robot", "novel", "drill"]


def make_synthetic_run(root, n_items: int = 64, n_users: int = 96, n_topics: int = 4,
                       min_len: int = 5, max_len: int = 12, seed: int = 0) -> RunDir:
    """Write items.parquet, sequences.parquet and stats.json of a small learnable catalog."""
    rng = np.random.default_rng(seed)
    run = RunDir(root)
    run.root.mkdir(parents=True, exist_ok=True)
    item_ids = np.arange(1, n_items + 1)
    topic_of = (item_ids - 1) % n_topics
    rows = []
    for item, topic in zip(item_ids, topic_of):
        name = TOPICS[topic % len(TOPICS)]
        title = f"{name} model {item}"
        price = float(5 + item % 17)
        rows.append({
            "item_id": int(item), "asin": f"B{item:09d}", "title": title,
            "brand": f"brand{topic}", "categories": [["Synthetic", name.title()]],
            "price": price, "text": f"{title}, {price:.2f}, brand{topic}, Synthetic, {name.title()}",
        })
    items = pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA)
    by_topic = [item_ids[topic_of == t] for t in range(n_topics)]
    users, sequences = [], []
    for user in range(1, n_users + 1):
        pool = by_topic[rng.integers(n_topics)]
        length = int(rng.integers(min_len, max_len + 1))
        start = int(rng.integers(len(pool)))
        seq = [int(pool[(start + step) % len(pool)]) for step in range(length)]
        if rng.random() < 0.2:  # some noise across topics
            seq[int(rng.integers(length))] = int(rng.integers(1, n_items + 1))
        users.append(user)
        sequences.append(seq)
    seq_table = pa.table({"user_id": pa.array(users, pa.int64()),
                          "item_ids": pa.array(sequences, pa.list_(pa.int64()))}, schema=SEQUENCES_SCHEMA)
    atomic.write_parquet(run.items, items)
    atomic.write_parquet(run.sequences, seq_table)
    atomic.write_json(run.stats, {"dataset": "synthetic", "users": n_users, "items": n_items,
                                  "interactions": int(sum(map(len, sequences)))})
    return run


def make_synthetic_embeddings(run: RunDir, dim: int = 32, n_topics: int = 4, noise: float = 0.3,
                              seed: int = 0) -> np.ndarray:
    """Topic-clustered unit vectors for every item of ``run``; written as RUN/embeddings."""
    rng = np.random.default_rng(seed)
    item_ids = read_items(run.items, columns=["item_id"]).column("item_id").to_numpy()
    centers = rng.normal(size=(n_topics, dim))
    vectors = centers[(item_ids - 1) % n_topics] + noise * rng.normal(size=(len(item_ids), dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_embeddings(run, item_ids, vectors.astype(np.float32), model="synthetic", normalized=True)
    return vectors.astype(np.float32)


def make_large_synthetic_run(root, n_items: int = 20_000, n_users: int = 20_000, dim: int = 32,
                             seed: int = 0, **overrides) -> RunDir:
    """A `tiger synth` run (items and sequences as Parquet parts, embeddings written): the
    large-catalog path at test size. Needs Ray (tests: the ``ray_local`` fixture)."""
    from tiger_ray.data.synth import SynthConfig, run_synth

    run = RunDir(root)
    run_synth(run, SynthConfig(items=n_items, users=n_users, dim=dim, seed=seed, **overrides))
    return run
