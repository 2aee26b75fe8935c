"""Dataset statistics written to stats.json and printed by `tiger prepare`."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Table 1 of the TIGER paper (Amazon Product Reviews 2014, 5-core).
PAPER_STATISTICS = {
    "beauty": {"users": 22_363, "items": 12_101, "interactions": 198_502},
    "sports": {"users": 35_598, "items": 18_357, "interactions": 296_337},
    "toys": {"users": 19_412, "items": 11_924, "interactions": 167_597},
}
COVERAGE_FIELDS = ("title", "brand", "price", "categories")


def field_coverage(items: pa.Table) -> dict[str, int]:
    """How many items have each metadata field (categories: at least one path)."""
    coverage = {}
    for name in COVERAGE_FIELDS:
        column = items.column(name)
        if name == "categories":
            present = pc.greater(pc.fill_null(pc.list_value_length(column), 0), 0)
            coverage[name] = int(pc.sum(present).as_py() or 0)
        else:
            coverage[name] = len(column) - column.null_count
    return coverage


def compute_stats(items: pa.Table, sequences: pa.Table) -> dict:
    item_lists = sequences.column("item_ids").combine_chunks()
    lengths = pc.list_value_length(item_lists).to_numpy(zero_copy_only=False).astype(np.int64)
    n_users, n_items = sequences.num_rows, items.num_rows
    interactions = int(lengths.sum())
    interacted = len(np.unique(item_lists.flatten().to_numpy()))
    return {
        "users": n_users,
        "items": n_items,
        "interactions": interactions,
        "items_with_interactions": int(interacted),
        "sequence_length": {
            "mean": float(lengths.mean()) if n_users else 0.0,
            "median": float(np.median(lengths)) if n_users else 0.0,
            "min": int(lengths.min()) if n_users else 0,
            "max": int(lengths.max()) if n_users else 0,
        },
        "density": interactions / (n_users * n_items) if n_users and n_items else 0.0,
        "coverage": field_coverage(items),
    }


def paper_check(dataset: str | None, stats: dict) -> dict | None:
    """Compare users/items/interactions with the paper's table, for the paper's datasets."""
    expected = PAPER_STATISTICS.get((dataset or "").lower())
    if expected is None:
        return None
    return {"expected": expected,
            "matches": all(stats[key] == value for key, value in expected.items())}


def format_stats(stats: dict, dataset: str | None = None) -> str:
    """A small aligned table for the terminal."""
    check = stats.get("paper")
    expected = check["expected"] if check else {}
    n_items = stats["items"] or 1

    def count_row(name: str, key: str) -> tuple[str, str, str]:
        paper = f"{expected[key]:,}" if key in expected else ""
        return name, f"{stats[key]:,}", paper

    length = stats["sequence_length"]
    rows = [
        count_row("users", "users"),
        count_row("items", "items"),
        count_row("interactions", "interactions"),
        ("sequence length mean", f"{length['mean']:.2f}", ""),
        ("sequence length median", f"{length['median']:g}", ""),
        ("sequence length min/max", f"{length['min']} / {length['max']}", ""),
        ("density", f"{stats['density']:.5f}", ""),
    ]
    rows += [(f"items with {name}", f"{count:,} ({count / n_items:.1%})", "")
             for name, count in stats["coverage"].items()]
    header = ("statistic", "value", "paper") if expected else ("statistic", "value", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    title = f"dataset: {dataset}" if dataset else "dataset"
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths if w).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    if check:
        lines.append("matches the paper's statistics" if check["matches"]
                     else "WARNING: differs from the paper's statistics")
    return "\n".join(lines)
