"""A tiny real run for the serving tests: both models trained briefly with their `tiny` presets.

Built in-process (no Ray Train) in a few seconds, with the trainers' own code and file formats:
the synthetic catalog (64 items in 4 topics), topic-derived Semantic IDs, a TIGER seq2seq model
from ``Seq2SeqTrainer`` saved as RUN/seq2seq/best, and a dual encoder saved with its flat FAISS
index as RUN/baseline. Serving loads both through ``tiger_ray.retrievers``, as in production.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from tiger_ray.runs import RunDir


def topic_semantic_ids(item_ids: np.ndarray, n_topics: int = 4) -> np.ndarray:
    """(topic, then two mixed-radix digits of the rank within the topic, 0): one-to-one for 64 items."""
    rank = (item_ids - 1) // n_topics
    return np.stack([(item_ids - 1) % n_topics, rank % 4, (rank // 4) % 4, np.zeros_like(item_ids)],
                    axis=1).astype(np.int64)


def train_tiny_tiger(run: RunDir) -> None:
    import dataclasses

    from tiger_ray.data.schema import read_items
    from tiger_ray.semantic_ids.table import write_semantic_ids
    from tiger_ray.seq2seq.model import save_model
    from tiger_ray.seq2seq.presets import TINY_PRESET, Seq2SeqTrainConfig
    from tiger_ray.seq2seq.ray_train import prepare_payload, tokenizer_from_payload
    from tiger_ray.seq2seq.data import TokenizedExamples
    from tiger_ray.seq2seq.train import ValidationSet, train_local

    item_ids = read_items(run.items, columns=["item_id"]).column("item_id").to_numpy()
    write_semantic_ids(run, item_ids, topic_semantic_ids(item_ids))
    config = Seq2SeqTrainConfig(**{**TINY_PRESET, "max_steps": 40, "eval_every": 40, "val_users": 32,
                                   "log_every": 40})
    payload = prepare_payload(run, config)
    tokenizer = tokenizer_from_payload(payload)
    trainer, _ = train_local(config, tokenizer, TokenizedExamples.from_arrays(payload["train"]),
                             ValidationSet.from_arrays(payload["valid"]))
    model = trainer.model.eval()
    save_model(run.seq2seq / "best", model, model.config, tokenizer,
               extra={"train_config": dataclasses.asdict(config)})


def train_tiny_ann(run: RunDir) -> None:
    import torch

    from tiger_ray.baseline import ray_train
    from tiger_ray.baseline.ann_index import IndexConfig
    from tiger_ray.baseline.config import PRESETS, BaselineConfig
    from tiger_ray.baseline.dual_encoder import DualEncoder
    from tiger_ray.baseline.retriever import build_run_index

    config = BaselineConfig(**PRESETS["tiny"])
    data = ray_train.load_training_data(run, config)
    torch.manual_seed(0)
    model = DualEncoder(ray_train.model_config(config, data), data.text)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in range(2):
        rows = ray_train.epoch_rows(len(data.targets), epoch, 0, 0, 1)
        ray_train.train_epoch(model, optimizer, data, rows, config, None, torch.device("cpu"),
                              progress=False)
    ray_train.export_model(run, model, data.user_ids)
    build_run_index(run, IndexConfig("flat"), measure_queries=16)


def build_serving_run(root: Path) -> RunDir:
    """The run, built once per directory (a finished run is reused)."""
    from tiger_ray.testing.synthetic import make_synthetic_embeddings, make_synthetic_run

    import torch

    run = RunDir(root)
    if (run.seq2seq / "best" / "config.json").exists() and (run.baseline / "index-flat").exists():
        return run
    torch.set_num_threads(1)  # the CPU is shared; more threads only contend
    run = make_synthetic_run(root)
    make_synthetic_embeddings(run)
    train_tiny_tiger(run)
    train_tiny_ann(run)
    return run


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serving_run(tmp_path_factory) -> RunDir:
    """One tiny trained run shared by every serving test of the session."""
    return build_serving_run(tmp_path_factory.getbasetemp() / "serving_run")
