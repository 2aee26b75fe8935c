"""`tiger embed` settings. Torch- and Ray-free, so the `tiger` command builds its flags quickly;
``ray_embed.py`` re-exports ``EmbedConfig`` and ``PRESETS`` next to ``run_embed``."""

from __future__ import annotations

from dataclasses import dataclass, field

from tiger_ray.embedding.encoder import DEFAULT_MODEL


@dataclass
class EmbedConfig:
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "sentence-transformers model: local directory, Hub id, or the packaged offline default"})
    normalize: bool = field(default=True, metadata={"help": "scale every embedding to unit L2 norm"})
    workers: int = field(default=2, metadata={
        "help": "encoder actors, each loads the model once; 0 with --use-gpu: one per GPU in the cluster"})
    batch_size: int = field(default=64, metadata={"help": "texts per encoder forward pass"})
    shard_size: int = field(default=1024, metadata={
        "help": "items per output shard: the unit of work an actor takes and a re-run skips once written"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per encoder actor (cuda device)"})
    cpus_per_worker: float = field(default=0.5, metadata={
        "help": "CPUs Ray reserves per CPU actor; below 1 so the Parquet read tasks still fit beside them"})
    threads_per_worker: int = field(default=1, metadata={"help": "torch intra-op threads per CPU actor"})
    allow_download: bool = field(default=False, metadata={
        "help": "let actors fetch a Hub model missing from the local cache (one attempt, no retries)"})

    def __post_init__(self):
        if self.workers < 0 or (self.workers == 0 and not self.use_gpu):
            raise ValueError("EmbedConfig: workers must be >= 1 (0 means one per GPU, with --use-gpu)")
        if self.batch_size < 1 or self.shard_size < 1 or self.threads_per_worker < 1:
            raise ValueError("EmbedConfig: batch_size, shard_size and threads_per_worker must be >= 1")
        if self.cpus_per_worker < 0:
            raise ValueError("EmbedConfig: cpus_per_worker must be >= 0")


PRESETS: dict[str, dict] = {
    # Tests: tiny shards so a 50-item catalog spreads over both actors and several files.
    "tiny": dict(workers=2, batch_size=16, shard_size=16, cpus_per_worker=0.5, threads_per_worker=1),
    # This 2-core machine: two single-threaded actors (measured faster than one 2-thread process).
    "cpu": dict(workers=2, batch_size=64, shard_size=1024, cpus_per_worker=0.5, threads_per_worker=1),
    # The paper: sentence-T5-base (768-d) on a GPU cluster, one actor per GPU.
    "paper": dict(model="sentence-transformers/sentence-t5-base", use_gpu=True, workers=0,
                  batch_size=256, shard_size=16384),
}
