"""The trained item tower over the whole catalog, as Ray Data batch inference into one mmap file.

    RUN/baseline/item_table.npy    float32 [N+1, dim], row = item_id, row 0 zeros: the item
                                   tower's representations (unnormalised; the query tower's input
                                   and, normalised, the index's vectors)
    RUN/baseline/item_table.json   the model_id of the model.pt it was computed from

Small catalogs keep the table inside model.pt (``export_model``); large ones write it here so no
process holds it: the driver creates the file (open_memmap, temp name), actors each load the model
once and write their batches' rows, the file is renamed when every row is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tiger_ray import atomic
from tiger_ray.runs import RunDir

ITEM_TABLE_FILE = "item_table.npy"
ITEM_TABLE_META = "item_table.json"


def _read_model(run: RunDir, with_text: bool):
    import torch

    from tiger_ray.baseline.dual_encoder import DualEncoder, DualEncoderConfig
    from tiger_ray.embedding.store import open_vectors

    payload = torch.load(run.baseline / "model.pt", map_location="cpu", weights_only=True)
    config = DualEncoderConfig(**payload["config"])
    text = open_vectors(run) if with_text and config.text_dim else None
    model = DualEncoder(config, text)
    model.load_state_dict(payload["model"])
    model.eval()
    return model, payload.get("model_id")


class _ItemTower:
    """Ray Data actor: the item tower, writing its batches' rows into the driver's file."""

    def __init__(self, run_root: str, path: str):
        import torch

        torch.set_num_threads(1)  # actors share 2 cores with everything else
        self.model, _ = _read_model(RunDir(run_root), with_text=True)
        self.path = path

    def __call__(self, batch: dict) -> dict:
        import torch

        ids = np.asarray(batch["id"], dtype=np.int64) + 1  # range() counts from 0, items from 1
        with torch.no_grad():
            reprs = self.model.item_repr(torch.from_numpy(ids)).numpy()
        out = np.load(self.path, mmap_mode="r+")
        out[ids] = reprs
        out.flush()
        return {"rows": np.array([len(ids)], dtype=np.int64)}


def write_item_table(run: RunDir, workers: int = 1, batch_rows: int = 16384) -> Path:
    """Compute the item tower for items 1..N with Ray Data into RUN/baseline/item_table.npy."""
    import ray.data

    from tiger_ray.ray_env import init_ray

    init_ray()
    model, model_id = _read_model(run, with_text=False)
    n, dim = model.config.num_items, model.config.dim
    del model
    path = run.baseline / ITEM_TABLE_FILE
    (run.baseline / ITEM_TABLE_META).unlink(missing_ok=True)
    with atomic.atomic_path(path) as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n + 1, dim)).flush()
        written = ray.data.range(n).map_batches(
            _ItemTower, fn_constructor_kwargs={"run_root": str(run.root), "path": str(tmp)},
            batch_size=batch_rows, batch_format="numpy", concurrency=max(1, workers),
            num_cpus=0.5).sum("rows")
        if written != n:
            raise RuntimeError(f"{path}: wrote {written} item rows, expected {n}")
    atomic.write_json(run.baseline / ITEM_TABLE_META, {"model_id": model_id, "shape": [n + 1, dim]})
    return path


def open_item_table(run: RunDir, model_id: str | None) -> np.ndarray:
    """RUN/baseline/item_table.npy read-only (memory-mapped), checked against ``model_id``."""
    path = run.baseline / ITEM_TABLE_FILE
    meta_path = run.baseline / ITEM_TABLE_META
    if not path.exists() or not meta_path.exists():
        raise FileNotFoundError(f"{path} does not exist (or is incomplete); re-run "
                                f"`tiger train-baseline --run {run.root}`")
    if atomic.read_json(meta_path).get("model_id") != model_id:
        raise ValueError(f"{path} was computed from another model than {run.baseline / 'model.pt'}; "
                         f"re-run `tiger train-baseline --run {run.root}`")
    return np.load(path, mmap_mode="r")
