"""The items a model was trained without (cold_items.json beside its weights).

Its own module because the model directory's format (model.py) and the cold-start evaluation
(cold_start.py, which loads models) both need it; neither may import the other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tiger_ray import atomic

COLD_ITEMS_FILE = "cold_items.json"


def save_cold_items(directory: str | Path, cold_items: np.ndarray, fraction: float | None = None,
                    seed: int | None = None) -> None:
    atomic.write_json(Path(directory) / COLD_ITEMS_FILE, {
        "fraction": fraction, "seed": seed, "item_ids": [int(i) for i in np.sort(cold_items)]})


def load_cold_items(directory: str | Path) -> np.ndarray | None:
    """The unseen items a model was trained without, or None if it saw every item."""
    path = Path(directory) / COLD_ITEMS_FILE
    if not path.exists():
        return None
    data = atomic.read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("item_ids"), list):
        raise ValueError(f"{path}: expected an object with an 'item_ids' list")
    return np.asarray(data["item_ids"], dtype=np.int64)
