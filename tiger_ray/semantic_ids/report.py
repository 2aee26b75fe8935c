"""What the Semantic IDs look like: report.json, report.png and learning_curve.png.

    report.png           per-level codebook usage (items per code, sorted), collision group sizes,
                         reconstruction error
    learning_curve.png   losses, per-level usage and unique-prefix rate per epoch
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tiger_ray import atomic
from tiger_ray.runs import RunDir
from tiger_ray.semantic_ids.config import RQVAEConfig

REPORT_FILE = "report.json"
PLOT_FILE = "report.png"
CURVE_FILE = "learning_curve.png"


def _perplexity(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def build_report(stats, history: list[dict], config: RQVAEConfig, extra: dict | None = None) -> dict[str, Any]:
    """The numbers of report.json from the assignment's aggregates (``assign.AssignmentStats``)."""
    counts, size, n = stats.code_counts, stats.codebook_size, stats.items
    final = history[-1] if history else {}
    return {
        "items": n,
        "levels": stats.levels,
        "codebook_size": size,
        # 4-code IDs are unique by construction, and the assignment verified it on the index
        "unique_ids": 1.0,
        "usage": [float((c > 0).mean()) for c in counts],
        "codes_used": [int((c > 0).sum()) for c in counts],
        "perplexity": [_perplexity(c) for c in counts],
        "max_items_per_code": [int(c.max()) for c in counts],
        "collisions": {**stats.collision_stats(), "max_c3": len(stats.c3_counts) - 1,
                       "max_collision_token": stats.max_collision_token},
        # mean, relative_mean and max exact; median and p95 from a 65536-bin histogram
        "reconstruction_error": {k: float(v) for k, v in stats.error.items()},
        "training": {"epochs": int(final.get("epoch", 0)),
                     "final": {k: v for k, v in final.items() if isinstance(v, (int, float))},
                     **(extra or {})},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
        "plots": [PLOT_FILE, CURVE_FILE] if history else [PLOT_FILE],
    }


def plot_report(path, stats, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size, levels = stats.codebook_size, stats.levels
    fig, axes = plt.subplots(2, max(levels, 3), figsize=(5 * max(levels, 3), 8))
    for level in range(levels):
        ax = axes[0, level]
        counts = np.sort(stats.code_counts[level])[::-1]
        ax.bar(np.arange(size), counts, width=1.0, color="tab:blue")
        ax.set_title(f"level {level}: {report['codes_used'][level]}/{size} codes used "
                     f"({100 * report['usage'][level]:.1f}%), perplexity {report['perplexity'][level]:.0f}")
        ax.set_xlabel("code (sorted by items)")
        ax.set_ylabel("items")
    for ax in axes[0, levels:]:
        ax.axis("off")
    col = report["collisions"]
    ax = axes[1, 0]
    sizes = sorted(col["group_size_counts"].items())
    ax.bar([s for s, _ in sizes], [c for _, c in sizes], color="tab:orange")
    ax.set_yscale("log")
    ax.set_xlabel("items sharing a 3-code prefix")
    ax.set_ylabel("prefixes")
    ax.set_title(f"collisions: largest group {col['largest_collision_group']}, "
                 f"c3 > 0 for {100 * col['fraction_c3_positive']:.2f}% of items")
    ax = axes[1, 1]
    ax.bar(np.arange(len(stats.c3_counts)), stats.c3_counts, width=1.0, color="tab:green")
    ax.set_yscale("log")
    ax.set_xlabel("collision token c3")
    ax.set_ylabel("items")
    ax.set_title(f"unique Semantic IDs: {100 * report['unique_ids']:.2f}% of {report['items']} items")
    ax = axes[1, 2]
    hist, edges = stats.error_hist
    ax.bar(edges[:-1], hist, width=np.diff(edges), align="edge", color="tab:red")
    rec = report["reconstruction_error"]
    ax.set_xlabel("||x - x_hat||^2")
    ax.set_ylabel("items")
    ax.set_title(f"reconstruction error: mean {rec['mean']:.4f} (relative {rec['relative_mean']:.3f})")
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def plot_learning_curves(path, history: list[dict], num_levels: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in history]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for key in ("loss", "recon_loss", "quant_loss", "recon_error"):
        label = "recon_error (end of epoch)" if key == "recon_error" else key
        ax.plot(epochs, [m[key] for m in history], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title("training losses")
    ax.legend()
    ax = axes[1]
    for level in range(num_levels):
        ax.plot(epochs, [m[f"usage_l{level}"] for m in history], label=f"level {level}")
    ax.axhline(0.8, color="gray", linestyle="--", linewidth=1, label="80%")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("epoch")
    ax.set_title("codebook usage (end of epoch)")
    ax.legend()
    ax = axes[2]
    ax.plot(epochs, [m["unique_rate"] for m in history])
    ax.set_xlabel("epoch")
    ax.set_ylabel("distinct 3-code prefixes / items")
    ax.set_title("unique-ID rate before the collision token")
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def write_report(run: RunDir, stats, history: list[dict], config: RQVAEConfig,
                 extra: dict | None = None) -> dict[str, Any]:
    """Write report.json and both plots to RUN/semantic_ids/; returns the report."""
    report = build_report(stats, history, config, extra)
    atomic.write_json(run.semantic_ids / REPORT_FILE, report)
    plot_report(run.semantic_ids / PLOT_FILE, stats, report)
    if history:
        plot_learning_curves(run.semantic_ids / CURVE_FILE, history, stats.levels)
    return report
