"""Loss and accuracy curves, train against test."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from .fileio import atomic_path  # noqa: E402


def plot_curves(history: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    """Write a two-panel PNG (loss, accuracy) of a history.json list, atomically."""
    epochs = [r["epoch"] for r in history]
    # the held-out sets the history carries: a validation run never reads the test set
    held = [s for s in ("val", "test") if history and f"{s}_acc" in history[0]]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split in ["train", *held]:
        label = "validation" if split == "val" else split
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], "o-", label=label, ms=3)
        ax_acc.plot(epochs, [r[f"{split}_acc"] for r in history], "o-", label=label, ms=3)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss", yscale="log")
    ax_acc.axhline(99.4, color="grey", ls="--", lw=1, label="99.4%")
    # zoom on where the runs differ: the first epoch (often far lower) may leave the axis
    later = history[1:] or history
    lo = min(min(r[f"{s}_acc"] for s in ["train", *held]) for r in later) if later else 0
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy", ylim=(max(lo - 0.3, 0), 100))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def plot_frontier(points: Sequence[dict], threshold: float, path: str | os.PathLike) -> None:
    """Parameters against the rule's number: for every checked step, each seed's worst of the last epochs (dots)
    and the step's minimum (a bar), the threshold as a line, passing steps filled. `points` are dicts with name,
    params, worst (one number per seed) and passed."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    curve = sorted((p["params"], min(p["worst"])) for p in points)
    ax.plot([c[0] for c in curve], [c[1] for c in curve], ":", color="#555", lw=1, zorder=2)
    points = sorted(points, key=lambda p: p["params"])
    near = max(1, (points[-1]["params"] - points[0]["params"]) * 0.04)  # labels closer than this would overlap
    for i, p in enumerate(points):
        color = "#2a7f3f" if p["passed"] else "#b22"
        xs = [p["params"]] * len(p["worst"])
        ax.scatter(xs, p["worst"], s=18, color=color, alpha=0.6, zorder=3)
        ax.scatter([p["params"]], [min(p["worst"])], s=120, marker="_", color=color, linewidths=2.5, zorder=4)
        # a step close to its left neighbour is labelled to the right, one close to its right neighbour to the left
        if i and p["params"] - points[i - 1]["params"] < near:
            ha, dx = "left", 6
        elif i + 1 < len(points) and points[i + 1]["params"] - p["params"] < near:
            ha, dx = "right", -6
        else:
            ha, dx = "center", 0
        ax.annotate(f"{p['name']}\n{'PASS' if p['passed'] else 'FAIL'}", (p["params"], max(p["worst"])),
                    textcoords="offset points", xytext=(dx, 6), ha=ha, fontsize=8, color=color)
    ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"{threshold:.2f}%: every seed's last epochs must reach it")
    ax.scatter([], [], s=18, color="grey", label="one seed's worst of its last epochs")
    ax.scatter([], [], s=120, marker="_", color="grey", linewidths=2.5, label="the step's worst seed")
    ax.scatter([], [], s=40, color="#2a7f3f", label="passes over every seed")
    ax.scatter([], [], s=40, color="#b22", label="fails")
    worst = [w for p in points for w in p["worst"]]
    ax.set(xlabel="parameters", ylabel="test accuracy (%)", title="The reliability frontier: parameters against the "
           "worst seed", ylim=(min(worst + [threshold]) - 0.12, max(worst + [threshold]) + 0.12))
    xs = [p["params"] for p in points]
    pad = max(200, (max(xs) - min(xs)) * 0.08)
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
