"""Settings of `tiger train-seq2seq`: the config dataclass and its presets.

    tiny   tests: a few-thousand-parameter model, a few dozen steps, seconds on one core
    cpu    this 2-core machine (the README main job); measured: docs/RESULTS.md#ablations
    paper  the paper's model and schedule (Rajput et al. 2023, Sec. 4 "Implementation details"):
           4+4 layers, 6 heads of 64, d_model 128, MLP 1024, ReLU, dropout 0.1, batch 256,
           lr 0.01 for 10k steps then inverse-square-root decay, 200k steps; for GPU clusters
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tiger_ray.seq2seq.dropout import DropoutMasks


@dataclass
class Seq2SeqTrainConfig:
    # ---- tokenisation (paper: last 20 items, 2000 user buckets)
    max_history: int = field(default=20, metadata={"help": "most recent items kept per history"})
    num_user_buckets: int = field(default=2000, metadata={"help": "user-id hash buckets"})
    use_user_token: bool = field(default=True, metadata={"help": "prepend a hashed user token"})
    # ---- model (paper sizes by default)
    d_model: int = field(default=128, metadata={"help": "embedding width"})
    num_heads: int = field(default=6, metadata={"help": "attention heads"})
    head_dim: int = field(default=64, metadata={"help": "width of one attention head"})
    encoder_layers: int = field(default=4, metadata={"help": "Transformer encoder layers"})
    decoder_layers: int = field(default=4, metadata={"help": "Transformer decoder layers"})
    mlp_dim: int = field(default=1024, metadata={"help": "feed-forward hidden width"})
    dropout: float = field(default=0.1, metadata={"help": "dropout rate"})
    dropout_masks: DropoutMasks = field(default="auto", metadata={
        "help": "random_bits: dropout masks from 16-bit slices of random words, the same "
                "distribution with p rounded to 1/65536, faster CPU steps "
                "(docs/RESULTS.md#dropout-masks); bernoulli: PyTorch's F.dropout and SDPA "
                "attention dropout (fused kernels on GPUs); "
                "auto: random_bits on CPU, bernoulli elsewhere"})
    training_mode: Literal["per_example", "all_positions"] = field(default="per_example", metadata={
        "help": "per_example: every (history, target) example encoded on its own by a "
                "bidirectional encoder (the paper); all_positions: an item-causal encoder reads a "
                "user's history once and trains all its targets, each decoder reading only its "
                "own history (the same examples, fewer encoder passes)"})
    # ---- optimisation
    batch_size: int = field(default=256, metadata={
        "help": "global batch in (history, target) examples (split across workers)"})
    optimizer: Literal["adamw", "adafactor"] = field(default="adamw", metadata={
        "help": "adamw, or adafactor (the paper's, whose lr is relative to each parameter's scale)"})
    lr: float = field(default=0.01, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=1000, metadata={"help": "linear warm-up steps"})
    decay_start: int = field(default=10000, metadata={"help": "step where 1/sqrt decay begins"})
    cooldown_fraction: float = field(default=0.0, metadata={
        "help": "anneal lr linearly to 0 over the last fraction of training: of the time budget "
                "if one is set (started when that much time is left, for as many steps as fit), "
                "else of max_steps; training stops when it reaches 0 (0 = off)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    max_steps: int = field(default=200_000, metadata={"help": "stop after this many optimizer steps"})
    max_epochs: int = field(default=1000, metadata={"help": "stop after this many epochs"})
    time_budget_minutes: float = field(default=0.0, metadata={
        "help": "stop cleanly after this many minutes of training, keeping the best checkpoint (0 = off)"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": "bf16 = autocast matmuls to bfloat16 (fp32 weights and optimizer); auto = bf16 "
                "where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16 or "
                "AMX), fp32 elsewhere"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the training forward/backward (fused kernels; the first steps "
                "pay a one-off compile, inference stays eager). Off in both presets: slower than "
                "eager on CPU (docs/RESULTS.md#seq2seq-training-step-vs-hugging-face-t5); "
                "unmeasured on GPU"})
    bucket_chunk_batches: int = field(default=64, metadata={
        "help": "length bucketing: sort by length within chunks of this many batches"})
    shuffle_buffer_batches: int = field(default=64, metadata={
        "help": "Ray Train: local shuffle buffer of each worker's stream, in its batches; mixes "
                "users from far apart before length bucketing (0 = off)"})
    data_users_per_batch: int = field(default=1024, metadata={
        "help": "Ray Train: users per Ray Data batch expanded into training examples"})
    data_workers: int = field(default=1, metadata={
        "help": "Ray Train: Ray Data actors building training examples while the workers train"})
    seed: int = field(default=0, metadata={"help": "random seed (init, data order, dropout)"})
    cold_start_fraction: float = field(default=0.0, metadata={
        "help": "hold this fraction of the test-target items out of training (paper Sec. 4.3: "
                "0.05), for `tiger evaluate --cold-start`; 0 = train on every item"})
    # ---- validation, checkpoints, early stopping (validation split only; never the test split)
    eval_every: int = field(default=2000, metadata={"help": "validate + checkpoint every N steps"})
    val_users: int = field(default=2000, metadata={"help": "validation users per check (0 = all)"})
    val_beam_size: int = field(default=20, metadata={"help": "beam size of validation decoding"})
    val_batch_size: int = field(default=256, metadata={"help": "users per validation batch"})
    patience: int = field(default=5, metadata={
        "help": "stop after this many validations without a better Recall@10 (0 = never)"})
    log_every: int = field(default=100, metadata={"help": "progress log line every N steps"})
    # ---- Ray Train resources
    workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP ranks)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker, NCCL backend"})
    cpus_per_worker: float = field(default=0.5, metadata={"help": "CPUs reserved per worker"})
    torch_threads: int = field(default=0, metadata={
        "help": "intra-op threads per worker (0 = max(1, cpus_per_worker))"})
    max_failures: int = field(default=2, metadata={"help": "worker restarts from the last checkpoint"})
    fresh: bool = field(default=False, metadata={
        "help": "start over instead of resuming an earlier run in RUN/seq2seq/ray"})

    def __post_init__(self):
        if self.batch_size < self.workers:
            raise ValueError(f"batch_size {self.batch_size} must be >= workers {self.workers}")
        for name in ("data_users_per_batch", "data_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shuffle_buffer_batches < 0:
            raise ValueError(f"shuffle_buffer_batches must be >= 0, got {self.shuffle_buffer_batches}")
        for name in ("max_steps", "eval_every", "log_every", "val_beam_size", "val_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.cold_start_fraction < 1.0:
            raise ValueError(f"cold_start_fraction must be in [0, 1), got {self.cold_start_fraction}")
        if not 0.0 <= self.cooldown_fraction < 1.0:
            raise ValueError(f"cooldown_fraction must be in [0, 1), got {self.cooldown_fraction}")
        if self.decay_start < 1:
            raise ValueError(f"decay_start must be >= 1, got {self.decay_start}")


TINY_PRESET = dict(
    d_model=32, num_heads=2, head_dim=16, encoder_layers=1, decoder_layers=1, mlp_dim=64,
    dropout=0.0, num_user_buckets=16, batch_size=32, lr=0.005, warmup_steps=5, decay_start=20,
    max_steps=60, eval_every=20, val_users=64, val_beam_size=10, log_every=10, patience=0,
    bucket_chunk_batches=4, precision="fp32",  # fp32: identical numbers on every test machine
)

# The README main job: the Beauty pipeline in 90 minutes on 2 cores, 55 of them in this stage.
# Why each setting, measured: docs/RESULTS.md#ablations
CPU_PRESET = dict(
    d_model=128, num_heads=6, head_dim=64, encoder_layers=4, decoder_layers=4, mlp_dim=1024,
    dropout=0.1, batch_size=128, optimizer="adafactor", lr=0.01, warmup_steps=200,
    decay_start=100_000, cooldown_fraction=0.2, precision="auto",
    max_steps=40_000, time_budget_minutes=55.0, eval_every=500, val_users=2000,
    val_beam_size=20, patience=8, log_every=50,
    workers=2, cpus_per_worker=0.5, torch_threads=1,
)

PAPER_PRESET = dict(
    max_history=20, num_user_buckets=2000, use_user_token=True,
    d_model=128, num_heads=6, head_dim=64, encoder_layers=4, decoder_layers=4, mlp_dim=1024,
    dropout=0.1, batch_size=256, lr=0.01, warmup_steps=1000, decay_start=10_000,
    max_steps=200_000, eval_every=5000, val_users=0, val_beam_size=20, patience=10,
)

PRESETS = {"tiny": TINY_PRESET, "cpu": CPU_PRESET, "paper": PAPER_PRESET}
