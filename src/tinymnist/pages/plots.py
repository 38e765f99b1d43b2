"""Pictures of the evidence: a check's proof (every seed's accuracy per epoch), and the reliability frontier."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from ..core.curves import save_figure  # noqa: E402
from ..target import RELIABLE_PASSES, RELIABLE_SEEDS, pass_rate_bound, verdict_word  # noqa: E402


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
    labels, below = [], []  # the test checks' labels (above their dots) and the validation checks' (below)
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
        labels.append(ax.annotate(f"{p['name']}\n{verdict_word(p['passed'])}{rate}", (x, max(p["worst"])),
                                  textcoords="offset points", xytext=(off, 6 + 20 * k), ha=ha, fontsize=8,
                                  color=color))
    for j, v in enumerate(sorted(validation, key=lambda v: v["params"])):  # to the left of the test checks
        same = [w for w in validation if w["params"] == v["params"]]
        k = same.index(v)
        x = v["params"] - (k + 1) * dx
        ax.scatter([x] * len(v["worst"]), v["worst"], s=22, marker="D", facecolors="none", edgecolors="#2255aa",
                   alpha=0.7, zorder=3)
        ax.scatter([x], [min(v["worst"])], s=120, marker="_", color="#2255aa", linewidths=1.5, zorder=4)
        below.append(ax.annotate(v["name"], (x, min(v["worst"])), textcoords="offset points",
                                 xytext=(0, -16 - 9 * k), ha="center", fontsize=6.5, color="#2255aa"))
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
           "worst seed", ylim=(min(worst + [threshold]) - 0.2, max(worst + [threshold]) + 0.3))  # room for the labels
    xs = [p["params"] for p in [*points, *validation]] + [min(v["params"] for v in validation) - 3 * dx] * bool(validation)
    pad = max(200, (max(xs) - min(xs)) * 0.08)
    ax.set_xlim(min(xs) - pad * (2 if validation else 1), max(xs) + pad)  # room for a validation label on the left
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)  # clear of points
    fig.tight_layout()
    _unclutter(fig, labels, 4.0)
    _unclutter(fig, below, -3.0)
    save_figure(fig, path)


def _unclutter(fig, labels: list, step: float, tries: int = 60) -> None:
    """Move each label, left to right, until its box overlaps no label placed before it: up by `step` points at a
    time, or down for a negative step."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for ann in sorted(labels, key=lambda a: a.xy[0]):
        for _ in range(tries):
            box = ann.get_window_extent(renderer).expanded(1.02, 1.05)
            if not any(box.overlaps(other) for other in placed):
                break
            dx, dy = ann.xyann
            ann.xyann = (dx, dy + step)
        placed.append(ann.get_window_extent(renderer))


def _passes(evidence: dict) -> int:
    """How many seeds of a check's evidence pass on their own (check.proof counts them; evidence records them)."""
    if "pass_rate" in evidence:
        return evidence["pass_rate"]["passes"]
    from ..lab.check import proof

    return proof(evidence).passes


def plot_proof(evidence: dict, path: str | os.PathLike) -> None:
    """A check's proof as a picture: accuracy per epoch for every seed, the threshold, the judged window shaded."""
    metric = evidence.get("metric", "test_acc")
    k, threshold = evidence["last"], evidence["threshold"]
    fig, ax = plt.subplots(figsize=(8, 4))
    epochs = 0
    for s in evidence["seeds"]:
        h = s["history"]
        epochs = max(epochs, len(h))
        ax.plot([r["epoch"] for r in h], [r[metric] for r in h], "o-", ms=3, lw=1.2, label=f"seed {s['seed']}")
    ax.axvspan(epochs - k + 0.5, epochs + 0.5, color="#2a6f97", alpha=0.12, label=f"last {k} epochs")
    ax.axhline(threshold, color="#b22", ls="--", lw=1, label=f"{threshold:.2f}%")
    tail = [r[metric] for s in evidence["seeds"] for r in s["history"][-k - 3:]]
    ax.set(xlabel="epoch", ylabel=f"{metric.split('_')[0]} accuracy (%)",
           ylim=(min(min(tail), threshold) - 0.25, max(max(tail), threshold) + 0.15),
           title=f"{evidence.get('label', evidence['step'])} ({evidence['params']:,} params): "
                 f"{verdict_word(evidence['passed'])}, {_passes(evidence)} of {len(evidence['seeds'])} seeds pass "
                 f"(pass rate ≥ {pass_rate_bound(_passes(evidence), len(evidence['seeds'])):.2f}, 95%)")
    ax.set_xlim(0.5, epochs + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
