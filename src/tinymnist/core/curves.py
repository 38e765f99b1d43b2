"""A run's pictures: its loss and accuracy curves, and the one atomic figure save that every picture ends with."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from ..fileio import atomic_path  # noqa: E402
from ..target import LAST, THRESHOLD  # noqa: E402


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


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a figure as a PNG, atomically (a reader never sees half a picture), and free it: every plot's last step."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
