"""Item lookup for the API: item id or ASIN -> catalog row, and the metadata returned with results.

Reads RUN/items.parquet (``item_id`` dense 1..N, see ``data/schema.py``). Kept compact so a
catalog of millions of items fits in the ingress replica: the columns stay Arrow arrays, and
ASIN -> id is a sorted byte-string array searched with ``np.searchsorted`` instead of a dict of
Python strings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from tiger_ray.data.schema import read_items
from tiger_ray.runs import RunDir
from tiger_ray.serving.schema import ApiError

DETAIL_COLUMNS = ["item_id", "asin", "title", "brand", "categories", "price"]


class Catalog:
    def __init__(self, items: pa.Table, source: str = "items table"):
        ids = items.column("item_id").to_numpy()
        if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
            raise ValueError(f"{source}: item_id must be 1..N in row order (as `tiger prepare` "
                             f"writes it)")
        self.source = source
        self.table = items.select([c for c in DETAIL_COLUMNS if c in items.column_names]).combine_chunks()
        self.asins = self.table.column("asin").combine_chunks()
        self.titles = self.table.column("title").combine_chunks()
        # ASIN -> id: sorted UTF-8 bytes plus the item id of each sorted entry. A stable sort keeps
        # the lowest item id first if an ASIN were ever repeated.
        asin_list = self.asins.to_pylist()
        known = np.array([a is not None for a in asin_list], dtype=bool)
        encoded = np.array([a.encode("utf-8") for a in asin_list if a is not None], dtype=np.bytes_)
        order = np.argsort(encoded, kind="stable")
        self._sorted_asins = encoded[order]
        self._sorted_ids = (np.flatnonzero(known) + 1)[order]

    @classmethod
    def from_run(cls, run: RunDir) -> "Catalog":
        path: Path = run.require(run.items, "tiger prepare")
        return cls(read_items(path, columns=DETAIL_COLUMNS), source=str(path))

    @property
    def size(self) -> int:
        return self.table.num_rows

    def ids_of_asins(self, asins: list[str]) -> np.ndarray:
        """Item id per ASIN; 0 where the ASIN is not in the catalog."""
        if not asins or len(self._sorted_asins) == 0:
            return np.zeros(len(asins), dtype=np.int64)
        keys = np.array([a.encode("utf-8") for a in asins], dtype=np.bytes_)
        pos = np.searchsorted(self._sorted_asins, keys).clip(max=len(self._sorted_asins) - 1)
        # numpy byte strings drop trailing NULs, so "B0A\0" would otherwise match "B0A".
        found = (self._sorted_asins[pos] == keys) & np.array(["\0" not in a for a in asins])
        return np.where(found, self._sorted_ids[pos], 0).astype(np.int64)

    def resolve_history(self, history: list[int | str], field: str = "history") -> np.ndarray:
        """Request history (ids and/or ASINs) -> int64 item ids; ApiError naming every unknown one."""
        ids = np.zeros(len(history), dtype=np.int64)
        asin_positions = [i for i, v in enumerate(history) if isinstance(v, str)]
        unknown: list[tuple[str, str]] = []
        for i, value in enumerate(history):
            if isinstance(value, str):
                continue
            if 1 <= value <= self.size:  # Python ints: no overflow for ids beyond int64
                ids[i] = value
            else:
                unknown.append((f"{field}[{i}]", f"unknown item id {value} (the catalog has ids "
                                                  f"1..{self.size})"))
        if asin_positions:
            found = self.ids_of_asins([history[i] for i in asin_positions])
            for i, item in zip(asin_positions, found):
                if item:
                    ids[i] = item
                else:
                    unknown.append((f"{field}[{i}]", f"unknown ASIN {history[i]!r}"))
        if unknown:
            unknown.sort(key=lambda f: int(f[0][len(field) + 1:-1]))
            raise ApiError(422, unknown, error="unknown_items")
        return ids

    def items(self, item_ids: np.ndarray) -> list[dict]:
        """item_id, asin and title of each id (ids must be in 1..N)."""
        rows = pa.array(np.asarray(item_ids, dtype=np.int64) - 1)
        asins = self.asins.take(rows).to_pylist()
        titles = self.titles.take(rows).to_pylist()
        return [{"item_id": int(i), "asin": a, "title": t} for i, a, t in zip(item_ids, asins, titles)]

    def details(self, item_id: int) -> dict | None:
        """Every metadata column of one item, or None if the id is not in the catalog."""
        if not 1 <= item_id <= self.size:
            return None
        row = self.table.slice(item_id - 1, 1).to_pylist()[0]
        row["categories"] = row.get("categories") or []
        return row
