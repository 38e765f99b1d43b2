"""Classify digits in ordinary image files, preprocessed the way MNIST itself was made."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.data import normalize
from ..errors import TinyMnistError, first_line, install_hint

BOX = 20  # MNIST scaled each digit's longer side to 20 px ...
FIELD = 28  # ... and centred its centre of mass in a 28x28 field
INK = 0.25  # a pixel is ink if it is at least this fraction of the brightest one (for the bounding box)
BLANK = 24  # grey levels: less contrast than this between ink and paper is a blank image


class ImageError(TinyMnistError):
    """One input image cannot be classified; the others still can."""


def _to_gray(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> float32 grayscale in [0, 255]; transparency is flattened onto a contrasting backdrop."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("RGB", "L") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        gray = np.asarray(rgba.convert("L"), dtype=np.float32)
        if alpha.min() < 1.0:
            # Strokes drawn on a transparent canvas: put them on white paper, unless they are light
            # themselves, in which case black paper keeps them visible.
            ink = gray[alpha > 0.5]
            paper = 0.0 if ink.size and ink.mean() > 127 else 255.0
            return gray * alpha + paper * (1.0 - alpha)
        return gray
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.asarray(img.convert("L"), dtype=np.float32)


def preprocess_image(img: Image.Image, name: str = "image") -> torch.Tensor:
    """PIL image -> uint8 (28, 28): light ink on black, digit box 20 px, centre of mass at the centre."""
    gray = _to_gray(img)
    if gray.size == 0:
        raise ImageError(f"{name}: empty image")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    paper = float(np.median(border))
    if paper > 127:  # dark ink on light paper: invert, as MNIST is light ink on black
        gray, paper = 255.0 - gray, 255.0 - paper
    ink = np.clip(gray - paper, 0, None)  # the paper's own grey level becomes black
    peak = float(ink.max())
    if peak < BLANK:
        raise ImageError(f"{name}: blank image (no digit found)")
    rows = np.flatnonzero((ink >= INK * peak).any(axis=1))
    cols = np.flatnonzero((ink >= INK * peak).any(axis=0))
    crop = ink[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1] * (255.0 / peak)
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(crop.astype(np.uint8), mode="L").resize(size, Image.LANCZOS), dtype=np.float32)
    total = small.sum()
    if total <= 0:
        raise ImageError(f"{name}: blank image (no digit found)")
    ys, xs = np.indices(small.shape)
    cy, cx = (ys * small).sum() / total, (xs * small).sum() / total
    # MNIST's centres of mass sit at pixel index (14, 14) of the 28x28 field (measured on its test set)
    top, left = int(round(FIELD / 2 - cy)), int(round(FIELD / 2 - cx))
    field = np.zeros((FIELD, FIELD), dtype=np.float32)
    # paste with clipping: a very lopsided digit may have its centre of mass far from its box centre
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(FIELD, top + small.shape[0]), min(FIELD, left + small.shape[1])
    field[y0:y1, x0:x1] = small[y0 - top: y1 - top, x0 - left: x1 - left]
    return torch.from_numpy(np.clip(field, 0, 255).round().astype(np.uint8))


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file and preprocess it; any problem is an ImageError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            return preprocess_image(img, str(path))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        kind = "empty file" if path.stat().st_size == 0 else "not a readable image"
        raise ImageError(f"{path}: {kind} ({e.__class__.__name__})") from None


@dataclass(frozen=True)
class Prediction:
    file: str
    digit: int
    probability: float
    top: list  # [(digit, probability), ...] best first

    def to_dict(self) -> dict:
        return {"file": self.file, "digit": self.digit, "probability": round(self.probability, 6),
                "top": [{"digit": d, "probability": round(p, 6)} for d, p in self.top]}


@torch.inference_mode()
def classify(model: torch.nn.Module, images_u8: torch.Tensor, names: Sequence[str], top: int = 3) -> list[Prediction]:
    """Classify a stack of preprocessed uint8 (N, 28, 28) images."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # softmax of logits and of log-probabilities (a forward ending in log_softmax) is the same distribution
    probs = torch.softmax(model(normalize(images_u8.to(device))), dim=1).cpu()
    p, d = probs.topk(min(top, 10), dim=1)
    return [Prediction(n, int(di[0]), float(pi[0]), [(int(a), float(b)) for a, b in zip(di, pi)])
            for n, di, pi in zip(names, d, p)]


class OnnxModel(torch.nn.Module):
    """An exported .onnx file run by onnxruntime, callable like the model it came from: normalised (N, 1, 28, 28)
    in, (N, 10) scores out. Self-contained: a user's model needs no models file here."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            raise TinyMnistError(f"running an .onnx file needs onnxruntime: {install_hint('onnx')}")
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's errors for a missing, truncated or foreign file
            why = first_line(e) or e.__class__.__name__
            raise TinyMnistError(f"{path}: not an ONNX model onnxruntime can run ({why})") from None
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)


def load_classifier(path: str | os.PathLike, device: torch.device | str = "cpu",
                    models: Optional[str] = None) -> torch.nn.Module:
    """What `predict` runs: an exported .onnx file (on the CPU), or a run's model.pt (a user's model needs its
    models file, `models`)."""
    from ..core.runs import load_checkpoint

    if str(path).lower().endswith(".onnx"):
        if not Path(path).is_file():
            raise TinyMnistError(f"{path}: ONNX file not found")
        return OnnxModel(path)
    return load_checkpoint(path, device, models=models)[0]
