"""Ray Train plumbing shared by the three trainers (RQ-VAE, seq2seq, dual encoder).

The driver side is ``fit``: a ``TorchTrainer`` (DDP; gloo on CPU, NCCL on GPU) whose run lives at
``storage_dir/name``. Ray Train keeps a snapshot of its checkpoints there, so running ``fit`` again
with the same name resumes from the latest checkpoint, and ``FailureConfig`` restarts crashed
workers from it. The worker side is a handful of helpers the training loops call, so no loop
touches Ray's checkpoint objects directly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

STATE_FILE = "state.pt"


@dataclass
class TrainerResources:
    """How many Ray Train workers and what each one gets."""

    workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP ranks)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker, NCCL backend"})
    # Fractional so that 2 workers (plus Ray Data) fit on a 2-core machine.
    cpus_per_worker: float = field(default=0.5, metadata={"help": "CPUs reserved per worker"})


# ---------------------------------------------------------------- driver side

def fit(train_loop: Callable[[dict], None], loop_config: dict, *, name: str,
        storage_dir: str | os.PathLike, resources: TrainerResources, max_failures: int = 2,
        datasets: dict | None = None, num_to_keep: int = 2, fresh: bool = False):
    """Run ``train_loop`` on ``resources.workers`` DDP workers; returns the ``ray.train.Result``.

    ``fresh=True`` deletes an earlier run of the same name instead of resuming it.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tiger_ray.ray_env import init_ray

    init_ray()
    storage_dir = Path(storage_dir).resolve()
    if fresh and (storage_dir / name).exists():
        shutil.rmtree(storage_dir / name)
    storage_dir.mkdir(parents=True, exist_ok=True)
    resources_per_worker = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        resources_per_worker["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=resources_per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_dir),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
        ),
        datasets=datasets,
    )
    return trainer.fit()


def latest_checkpoint_dir(storage_dir: str | os.PathLike, name: str) -> Path | None:
    """Newest checkpoint directory of a run on local storage (for inspection and tests)."""
    run = Path(storage_dir) / name
    candidates = [p for p in run.glob("checkpoint_*") if (p / STATE_FILE).exists()] if run.exists() else []
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


# ---------------------------------------------------------------- worker side

def world_rank() -> int:
    import ray.train

    return ray.train.get_context().get_world_rank()


def world_size() -> int:
    import ray.train

    return ray.train.get_context().get_world_size()


def is_main() -> bool:
    return world_rank() == 0


def torch_device():
    import ray.train.torch

    return ray.train.torch.get_device()


def load_checkpoint_state() -> dict[str, Any] | None:
    """The state saved by the last ``report`` of this run (after a resume or a restart), or None."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = Path(directory) / STATE_FILE
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


def report(metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
    """Report metrics from every rank; rank 0 also saves ``state`` as a checkpoint.

    Every rank must call this the same number of times (it is a barrier in Ray Train).
    """
    import ray.train
    import torch

    if state is None or not is_main():
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, Path(directory) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
