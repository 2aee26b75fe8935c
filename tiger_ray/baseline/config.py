"""Settings of `tiger train-baseline` (dual encoder + Ray Train); no heavy imports here.

The FAISS index has its own ``IndexConfig`` in ``ann_index.py``; `tiger train-baseline` takes the
flags of both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class BaselineConfig:
    # model
    dim: int = field(default=64, metadata={"help": "width of item and query vectors"})
    max_history: int = field(default=20, metadata={"help": "most recent history items the query tower reads"})
    num_layers: int = field(default=2, metadata={"help": "self-attention blocks in the query tower"})
    num_heads: int = field(default=2, metadata={"help": "attention heads per block"})
    dropout: float = field(default=0.2, metadata={"help": "dropout in the query tower"})
    id_dropout: float = field(default=0.1, metadata={"help": "probability of dropping an item's ID embedding "
                                                              "in training, so the text path works alone (cold items)"})
    use_text: bool = field(default=True, metadata={"help": "item tower uses the item text embeddings (tiger embed)"})
    user_embedding: bool = field(default=False, metadata={"help": "add a learned user embedding to the query"})
    normalize: bool = field(default=True, metadata={"help": "cosine scores (unit vectors) / temperature"})
    temperature: float = field(default=0.05, metadata={"help": "softmax temperature for cosine scores"})
    # training
    loss: Literal["auto", "full", "in_batch"] = field(default="auto", metadata={
        "help": "full = softmax over the whole catalog; in_batch = sampled softmax over the batch's "
                "targets (log-Q corrected); auto = full up to --large-catalog items, else in_batch"})
    data: Literal["auto", "memory", "stream"] = field(default="auto", metadata={
        "help": "memory = every worker builds the training windows from the whole sequences file "
                "(small catalogs, as before); stream = windows made by Ray Data and fed through "
                "get_dataset_shard, text vectors read from the memory-mapped vectors.npy; "
                "auto = memory up to --large-catalog items, else stream"})
    large_catalog: int = field(default=100_000, metadata={
        "help": "catalog size above which loss=auto and data=auto pick in_batch and stream"})
    max_id_rows: int = field(default=1_000_000, metadata={
        "help": "ID embedding rows; larger catalogs hash item ids into this many rows (the text "
                "path tells hashed items apart) so the ID table stays bounded per worker"})
    valid_users: int = field(default=0, metadata={
        "help": "validation users scored each epoch (the first ones in file order); 0 = all with "
                "data=memory, 10000 with data=stream"})
    log_q: bool = field(default=True, metadata={"help": "in_batch: log-Q correction by item frequency"})
    batch_size: int = field(default=128, metadata={"help": "training windows (user sequences of up to "
                                                               "max_history items) per step per worker"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    epochs: int = field(default=20, metadata={"help": "maximum epochs"})
    steps_per_epoch: int = field(default=0, metadata={
        "help": "end an epoch (validate, checkpoint) after this many steps; bounds "
                "the time between validations on huge catalogs (0 = a full pass)"})
    patience: int = field(default=3, metadata={"help": "stop after this many epochs without a better "
                                                       "validation recall@10"})
    eval_batch_size: int = field(default=1024, metadata={"help": "queries per validation batch"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    # Ray Train
    workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP ranks)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker (NCCL)"})
    cpus_per_worker: float = field(default=0.5, metadata={"help": "CPUs reserved per worker"})
    torch_threads: int = field(default=0, metadata={"help": "torch threads per worker (0 = Ray's default)"})
    max_failures: int = field(default=2, metadata={"help": "worker failures tolerated (restart from checkpoint)"})
    fresh: bool = field(default=False, metadata={"help": "discard an earlier training run instead of resuming it"})


PRESETS: dict[str, dict] = {
    # seconds on a synthetic run
    "tiny": {"dim": 16, "max_history": 8, "num_layers": 1, "num_heads": 1, "dropout": 0.1,
             "batch_size": 32, "epochs": 3, "patience": 2, "eval_batch_size": 256},
    # Beauty on this 2-core machine in about 10-15 minutes
    "cpu": {},
    # the SASRec baseline's usual settings, for GPU clusters and large catalogs: sampled softmax
    # with log-Q correction scales to catalogs whose item matrix does not fit in one batch.
    "paper": {"dim": 128, "num_layers": 2, "num_heads": 2, "dropout": 0.3, "loss": "in_batch",
              "batch_size": 2048, "lr": 1e-3, "epochs": 200, "patience": 10, "workers": 4,
              "cpus_per_worker": 4},
}
