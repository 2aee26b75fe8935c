"""Ray Train plumbing: DDP workers, checkpoints, and resume from the last checkpoint."""

from __future__ import annotations

import pytest

from tiger_ray.distributed import TrainerResources, fit

pytestmark = pytest.mark.ray


def _loop(config):
    import torch

    from tiger_ray import distributed as dist

    state = dist.load_checkpoint_state()
    start = state["epoch"] + 1 if state else 0
    model = torch.nn.Linear(2, 1)
    if state:
        model.load_state_dict(state["model"])
    for epoch in range(start, config["epochs"]):
        with torch.no_grad():
            model.bias += 1.0
        dist.report({"epoch": epoch, "start": start, "world_size": dist.world_size(),
                     "bias": float(model.bias)},
                    state={"epoch": epoch, "model": model.state_dict()})


def test_fit_checkpoints_and_resumes_from_last_epoch(ray_local, tmp_path):
    resources = TrainerResources(workers=2)
    first = fit(_loop, {"epochs": 2}, name="toy", storage_dir=tmp_path, resources=resources)
    assert first.metrics["epoch"] == 1 and first.metrics["world_size"] == 2
    # Same name and storage: picks up after epoch 1 instead of starting over.
    second = fit(_loop, {"epochs": 4}, name="toy", storage_dir=tmp_path, resources=resources)
    assert second.metrics["start"] == 2 and second.metrics["epoch"] == 3
    assert second.metrics["bias"] == pytest.approx(first.metrics["bias"] + 2.0)
    fresh = fit(_loop, {"epochs": 1}, name="toy", storage_dir=tmp_path, resources=resources, fresh=True)
    assert fresh.metrics["start"] == 0
