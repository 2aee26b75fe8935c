"""Training history on disk: ``history.jsonl`` (one event per line) and the learning-curve PNG.

Events (all carry ``step`` and ``epoch``):
    train   loss (mean over the last log window, all ranks), lr, examples_per_second
    epoch   the same over a whole epoch
    eval    val_recall@5/10, val_ndcg@5/10, val_loss on the validation subset, best_step, seconds
    cooldown  the learning rate starts its linear anneal to 0, over ``steps`` steps
"""

from __future__ import annotations

import json
from pathlib import Path

from tiger_ray import atomic


def write_history(path: str | Path, history: list[dict]) -> None:
    atomic.write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history))


def read_history(path: str | Path) -> list[dict]:
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
    return records


def plot_learning_curve(history: list[dict], path: str | Path, title: str = "TIGER seq2seq") -> None:
    """Train and validation loss (left axis), validation Recall@10 (right axis) against the step."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    train = [r for r in history if r.get("event") == "train"]
    evals = [r for r in history if r.get("event") == "eval"]
    fig, ax_loss = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue",
                 lw=1.2, label="train loss")
    with_loss = [r for r in evals if "val_loss" in r]
    if with_loss:
        ax_loss.plot([r["step"] for r in with_loss], [r["val_loss"] for r in with_loss],
                     color="tab:blue", ls="--", lw=1.2, label="validation loss")
        ax_loss.legend(loc="upper center", fontsize=8, frameon=False)
    for r in history:
        if r.get("event") == "cooldown":
            ax_loss.axvline(r["step"], color="gray", ls=":", lw=1)
            ax_loss.annotate("lr cool-down", (r["step"], 1), xycoords=("data", "axes fraction"),
                             xytext=(3, -12), textcoords="offset points", fontsize=8, color="gray")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("cross-entropy per token", color="tab:blue")
    ax_loss.grid(alpha=0.3)
    ax_val = ax_loss.twinx()
    ax_val.plot([r["step"] for r in evals], [r["val_recall@10"] for r in evals], color="tab:red",
                marker="o", ms=3, lw=1.2, label="val Recall@10")
    if evals:
        best = max(evals, key=lambda r: r["val_recall@10"])
        ax_val.annotate(f"best {best['val_recall@10']:.4f}", (best["step"], best["val_recall@10"]),
                        textcoords="offset points", xytext=(-12, -14), ha="right", fontsize=8,
                        color="tab:red")  # below-left: the best point is often the last, highest one
    ax_val.set_ylabel("validation Recall@10", color="tab:red")
    ax_loss.set_title(title)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
