"""What a trained model gets wrong: every misclassified test image, the confusion matrix, and pictures of both."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import torch

from ..core.data import MNIST, normalize
from ..accel.device import torch_memory_format
from ..core.runs import CONFUSION_FILE, ERRORS_FILE, GRID_FILE
from ..fileio import write_json



@torch.inference_mode()
def collect_errors(model: torch.nn.Module, data: MNIST, memory_format: str = "contiguous",
                   batch_size: int = 2000) -> dict:
    """Classify the whole test set; return every error (most confident first) and the 10x10 confusion matrix
    (rows: true digit, columns: predicted)."""
    model.eval()
    device = next(model.parameters()).device
    fmt = torch_memory_format(memory_format)
    probs = []
    for i in range(0, len(data.test_labels), batch_size):
        x = normalize(data.test_images[i:i + batch_size].to(device)).contiguous(memory_format=fmt)
        probs.append(torch.softmax(model(x).float(), dim=1).cpu())
    p = torch.cat(probs)
    y = data.test_labels.cpu()
    conf, pred = p.max(dim=1)
    confusion = torch.bincount(y * 10 + pred, minlength=100).reshape(10, 10)
    wrong = torch.nonzero(pred != y).flatten()
    wrong = wrong[torch.argsort(conf[wrong], descending=True, stable=True)]
    errors = [{"index": int(i), "true": int(y[i]), "predicted": int(pred[i]), "probability": round(float(conf[i]), 6),
               "probability_of_true": round(float(p[i, y[i]]), 6)} for i in wrong]
    total = len(y)
    return {"test_images": total, "errors": len(errors), "test_acc": round(100.0 * (total - len(errors)) / total, 4),
            "confusion": confusion.tolist(), "misclassified": errors}


def plot_misclassified(images: torch.Tensor, result: dict, path: str | os.PathLike, limit: int = 60,
                       title: str = "") -> None:
    """A grid of the misclassified test images, most confident first, captioned true -> predicted (probability)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.curves import save_figure

    shown = result["misclassified"][:limit]
    cols = 10
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.15, rows * 1.35 + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, e in zip(axes.flat, shown):
        ax.imshow(images[e["index"]].cpu().numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{e['true']}→{e['predicted']} ({e['probability']:.2f})", fontsize=8)
    more = result["errors"] - len(shown)
    fig.suptitle((title + ": " if title else "") + f"{result['errors']} misclassified test images, most confident "
                 f"first; true→predicted (probability)" + (f"; {more} more in errors.json" if more > 0 else ""),
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion(result: dict, path: str | os.PathLike, title: str = "") -> None:
    """The 10x10 confusion matrix with counts; the diagonal is shaded apart so the errors stand out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.curves import save_figure
    import numpy as np

    m = np.array(result["confusion"])
    off = m.copy()
    np.fill_diagonal(off, 0)
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    ax.imshow(off, cmap="Reds", vmin=0, vmax=max(1, off.max()))
    for t in range(10):
        for p in range(10):
            ax.text(p, t, str(m[t, p]), ha="center", va="center", fontsize=8,
                    color="#555" if t == p else ("white" if off[t, p] > off.max() / 2 else "black"))
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=(title + ": " if title else "") + f"confusion matrix ({result['errors']} errors)")
    fig.tight_layout()
    save_figure(fig, path)


PACKAGED_OUT = Path("errors-shipped")  # where a packaged checkpoint's errors go by default: under the current directory


def default_out(checkpoint: str | os.PathLike) -> Path:
    """Where `errors` writes without --out: beside the checkpoint, except for one inside the installed package (the
    shipped model), whose directory may be site-packages: then ./errors-shipped/."""
    here = Path(__file__).resolve().parents[1]  # the package, whose assets/ hold the shipped model
    where = Path(checkpoint).resolve().parent
    return PACKAGED_OUT if where == here or here in where.parents else Path(checkpoint).parent


def run_errors(checkpoint: str | os.PathLike, out: Optional[str | os.PathLike] = None, data_dir: Optional[str] = None,
               device: str = "cpu", progress: bool = True, models: Optional[str] = None) -> tuple[Path, dict]:
    """Evaluate a checkpoint on the test set and write errors.json, misclassified.png and confusion.png into `out`
    (default: the checkpoint's directory; ./errors-shipped/ for a checkpoint inside the package). The model runs in
    the memory format it was trained in."""
    from ..core.data import load_mnist
    from ..accel.device import pick_device
    from ..core.runs import load_checkpoint

    dev = pick_device(device)
    model, cfg = load_checkpoint(checkpoint, dev, models=models)
    fmt = cfg.memory_format if cfg.memory_format != "auto" else "contiguous"
    model = model.to(memory_format=torch_memory_format(fmt))
    data = load_mnist(data_dir, device=dev, progress=progress)
    result = collect_errors(model, data, fmt)
    result = {"checkpoint": str(checkpoint), "model": cfg.model, "layout": cfg.layout or None, **result}
    out = Path(out) if out else default_out(checkpoint)
    write_json(out / ERRORS_FILE, result)
    name = cfg.model if not cfg.layout else f"{cfg.model} ({cfg.layout})"
    plot_misclassified(data.test_images, result, out / GRID_FILE, title=name)
    plot_confusion(result, out / CONFUSION_FILE, title=name)
    return out, result
