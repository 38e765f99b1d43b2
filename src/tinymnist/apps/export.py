"""Export a trained model to ONNX with a dynamic batch dimension."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from pathlib import Path

import torch

from ..errors import TinyMnistError, install_hint
from ..fileio import atomic_path

ONNX_PACKAGES = ("onnx", "onnxscript")  # torch's ONNX exporter needs both


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, opset: int = 18) -> Path:
    """Write `model` (logits out) as ONNX: input 'image' (N, 1, 28, 28) normalised, output 'logits' (N, 10)."""
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise TinyMnistError(f"ONNX export needs the package(s) {', '.join(missing)}: {install_hint('onnx')}")
    model = model.cpu().eval()
    example = torch.zeros(2, 1, 28, 28)
    path = Path(path)
    quiet = logging.getLogger("torch.onnx")  # it logs a line per missing torchvision op; we use none
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_path = tmp.with_suffix(".onnx")
        try:
            program = torch.onnx.export(
                model, (example,), input_names=["image"], output_names=["logits"], opset_version=opset,
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}}, dynamo=True,
                external_data=False, verbose=False)
            program.save(str(onnx_path), external_data=False)
            os.replace(onnx_path, tmp)
        finally:
            if onnx_path.exists():
                onnx_path.unlink()
            quiet.setLevel(level)
    return path
