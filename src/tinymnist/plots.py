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
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train", ms=3)
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "o-", label="test", ms=3)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss", yscale="log")
    ax_acc.plot(epochs, [r["train_acc"] for r in history], "o-", label="train", ms=3)
    ax_acc.plot(epochs, [r["test_acc"] for r in history], "o-", label="test", ms=3)
    ax_acc.axhline(99.4, color="grey", ls="--", lw=1, label="99.4%")
    # zoom on where the runs differ: the first epoch (often far lower) may leave the axis
    later = history[1:] or history
    lo = min(min(r["train_acc"], r["test_acc"]) for r in later) if later else 0
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
