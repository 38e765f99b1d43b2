"""Pictures of runs and checks: a run's loss and accuracy curves, and the reliability frontier."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from .fileio import atomic_path  # noqa: E402
from .target import LAST, RELIABLE_PASSES, RELIABLE_SEEDS, THRESHOLD, verdict_word  # noqa: E402


def plot_curves(history: Sequence[dict], path: str | os.PathLike, title: str = "", averaged: bool = False,
                threshold: float = THRESHOLD, last: int = LAST) -> None:
    """Write a three-panel PNG of a history.json list, atomically: loss; accuracy over every epoch; and the held-out
    accuracy of the last `last` epochs, zoomed to the band where the rule is judged. `averaged`: the held-out
    accuracy is measured on the averaged weights (EMA) and train accuracy on the raw ones; the legend says so."""
    epochs = [r["epoch"] for r in history]
    # the held-out sets the history carries: a validation run never reads the test set
    held = [s for s in ("val", "test") if history and f"{s}_acc" in history[0]]
    names = {"train": "train (raw weights)" if averaged else "train",
             "val": "validation (averaged weights)" if averaged else "validation",
             "test": "test (averaged weights)" if averaged else "test"}
    fig, (ax_loss, ax_acc, ax_rule) = plt.subplots(1, 3, figsize=(14, 3.8))
    for split in ["train", *held]:
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], "o-", label=names[split], ms=3)
        ax_acc.plot(epochs, [r[f"{split}_acc"] for r in history], "o-", label=names[split], ms=3)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss", yscale="log")
    ax_acc.axhline(threshold, color="grey", ls="--", lw=1, label=f"{threshold:g}%")
    # zoom on where the runs differ: the first epoch (often far lower) may leave the axis
    later = history[1:] or history
    lo = min(min(r[f"{s}_acc"] for s in ["train", *held]) for r in later) if later else 0
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy", ylim=(max(lo - 0.3, 0), 100))
    # the rule's band: the held-out accuracy of the judged epochs, on an axis that shows hundredths
    tail = history[-last:]
    for split in held:
        ax_rule.plot([r["epoch"] for r in tail], [r[f"{split}_acc"] for r in tail], "o-", ms=4, label=names[split],
                     color=f"C{1 + held.index(split)}")  # the colours of the other panels
    values = [r[f"{s}_acc"] for r in tail for s in held] + [threshold]
    ax_rule.axhline(threshold, color="grey", ls="--", lw=1, label=f"{threshold:g}%: the rule")
    ax_rule.set(xlabel="epoch", ylabel="accuracy (%)", title=f"The last {len(tail)} epochs, judged by the rule",
                ylim=(min(values) - 0.1, max(values) + 0.1))
    for ax in (ax_loss, ax_acc, ax_rule):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_frontier(points: Sequence[dict], threshold: float, path: str | os.PathLike,
                  validation: Sequence[dict] = ()) -> None:
    """Parameters against the rule's number: for every step checked on test, each seed's worst of the last epochs
    (dots) and the step's minimum (a bar), the threshold as a line, passing steps in green. No line joins the steps:
    they are different networks, not a trend. `validation`: 5-seed validation checks (of a yardstick, or of a
    candidate that has not earned a look at test), drawn as hollow diamonds, each seed's worst and the minimum.
    Points are dicts with name, params, worst (one number per seed) and passed."""
    fig, ax = plt.subplots(figsize=(8, 5.4))
    points = sorted(points, key=lambda p: p["params"])
    span = max(p["params"] for p in [*points, *validation]) - min(p["params"] for p in [*points, *validation])
    dx = max(1.0, span * 0.018)  # checks of one parameter count stand side by side, this far apart
    near = max(1, span * 0.04)  # labels closer than this would overlap
    shown: dict = {}  # parameter count -> how many checks already stand there
    for i, p in enumerate(points):
        k = shown[p["params"]] = shown.get(p["params"], -1) + 1
        x = p["params"] + k * dx
        color = "#2a7f3f" if p["passed"] else "#b22"
        ax.scatter([x] * len(p["worst"]), p["worst"], s=18, color=color, alpha=0.6, zorder=3)
        ax.scatter([x], [min(p["worst"])], s=120, marker="_", color=color, linewidths=2.5, zorder=4)
        # a step close to its left neighbour is labelled to the right, one close to its right neighbour to the left;
        # a second check of the same count is labelled a line higher
        if i and p["params"] - points[i - 1]["params"] < near:
            ha, off = "left", 6
        elif i + 1 < len(points) and points[i + 1]["params"] - p["params"] < near:
            ha, off = "right", -6
        else:
            ha, off = "center", 0
        if p.get("reliable"):  # reliable: a ring round its worst seed, apart from 5 of 5
            ax.scatter([x], [min(p["worst"])], s=220, marker="o", facecolors="none", edgecolors=color, linewidths=1.5,
                       zorder=4)
        rate = f" {p['rate_short']}" if p.get("rate_short") else ""
        ax.annotate(f"{p['name']}\n{verdict_word(p['passed'])}{rate}", (x, max(p["worst"])),
                    textcoords="offset points", xytext=(off, 6 + 20 * k), ha=ha, fontsize=8, color=color)
    for j, v in enumerate(sorted(validation, key=lambda v: v["params"])):  # to the left of the test checks
        same = [w for w in validation if w["params"] == v["params"]]
        k = same.index(v)
        x = v["params"] - (k + 1) * dx
        ax.scatter([x] * len(v["worst"]), v["worst"], s=22, marker="D", facecolors="none", edgecolors="#2255aa",
                   alpha=0.7, zorder=3)
        ax.scatter([x], [min(v["worst"])], s=120, marker="_", color="#2255aa", linewidths=1.5, zorder=4)
        ax.annotate(v["name"], (x, min(v["worst"])), textcoords="offset points", xytext=(0, -16 - 9 * k),
                    ha="center", fontsize=6.5, color="#2255aa")
    ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"{threshold:.2f}%: every seed's last epochs must reach it")
    ax.scatter([], [], s=18, color="grey", label="one seed's worst of its last epochs")
    ax.scatter([], [], s=120, marker="_", color="grey", linewidths=2.5, label="the step's worst seed")
    ax.scatter([], [], s=40, color="#2a7f3f", label="passes over every seed")
    ax.scatter([], [], s=40, color="#b22", label="fails")
    ax.scatter([], [], s=120, marker="o", facecolors="none", edgecolors="grey", linewidths=1.5,
               label=f"reliable: at least {RELIABLE_PASSES} of {RELIABLE_SEEDS} seeds pass (label: seeds that pass, 95% bound on the rate)")
    if validation:
        ax.scatter([], [], s=22, marker="D", facecolors="none", edgecolors="#2255aa",
                   label="validation check, 5 seeds (reads lower than test)")
    worst = [w for p in [*points, *validation] for w in p["worst"]]
    ax.set(xlabel="parameters", ylabel="accuracy (%): test, or validation", title="The reliability frontier: parameters against the "
           "worst seed", ylim=(min(worst + [threshold]) - 0.12, max(worst + [threshold]) + 0.12))
    xs = [p["params"] for p in [*points, *validation]] + [min(v["params"] for v in validation) - 3 * dx] * bool(validation)
    pad = max(200, (max(xs) - min(xs)) * 0.08)
    ax.set_xlim(min(xs) - pad * (2 if validation else 1), max(xs) + pad)  # room for a validation label on the left
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)  # clear of points
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a figure as a PNG, atomically (a reader never sees half a picture), and free it: every plot's last step."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
