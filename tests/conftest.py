"""Shared fixtures: synthetic IDX files and the real MNIST directory."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import torch

REAL_DATA = os.environ.get("TINYMNIST_DATA")


def idx_bytes(array: torch.Tensor) -> bytes:
    """Encode a uint8 tensor as an IDX file."""
    head = bytes([0, 0, 0x08, array.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + array.contiguous().numpy().tobytes()


def synthetic_mnist(root: Path, n_train: int = 64, n_test: int = 32, gz: bool = True, seed: int = 0,
                    learnable: bool = False) -> dict:
    """Write four small valid MNIST-format files; return name -> bytes as written. Random noise, or with
    `learnable`, noise plus a bright band whose row gives the label, so that a good recipe learns it quickly."""
    g = torch.Generator().manual_seed(seed)
    arrays = {
        "train-images-idx3-ubyte": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        "train-labels-idx1-ubyte": torch.randint(0, 10, (n_train,), generator=g, dtype=torch.uint8),
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
        "t10k-labels-idx1-ubyte": torch.randint(0, 10, (n_test,), generator=g, dtype=torch.uint8),
    }
    if learnable:
        for split in ("train", "t10k"):
            images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
            images //= 4
            for i, label in enumerate(labels.tolist()):
                images[i, 2 + 2 * label: 4 + 2 * label] = 255
    root.mkdir(parents=True, exist_ok=True)
    os.environ["TINYMNIST_VERIFY"] = "0"  # made data has no known MD5; the autouse fixture restores the check
    written = {}
    for name, arr in arrays.items():
        raw = idx_bytes(arr)
        data = gzip.compress(raw, mtime=0) if gz else raw
        fname = name + (".gz" if gz else "")
        (root / fname).write_bytes(data)
        written[fname] = data
    return written


@pytest.fixture(autouse=True)
def _verified_data(monkeypatch, tmp_path_factory):
    """Every test starts with MD5 verification on and a private cache (verified-file stamps go there)."""
    monkeypatch.setenv("TINYMNIST_VERIFY", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def synth_dir(tmp_path: Path) -> Path:
    synthetic_mnist(tmp_path / "mnist")
    return tmp_path / "mnist"


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real MNIST directory from $TINYMNIST_DATA; under CI its absence is a failure, not a skip."""
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    path = Path(REAL_DATA) if REAL_DATA else None
    ok = path is not None and all((path / n).exists() or (path / (n + ".gz")).exists() for n in names)
    if not ok:
        msg = f"real MNIST not found (set TINYMNIST_DATA to a directory holding the four files; got {REAL_DATA!r})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def trained_run(real_data_dir, tmp_path_factory) -> Path:
    """One epoch of the default recipe on the real MNIST via the CLI, shared by the tests that need a trained model."""
    from tinymnist.cli import main

    out = tmp_path_factory.mktemp("trained") / "run"
    code = main(["train", "--epochs", "1", "--out", str(out), "--data-dir", str(real_data_dir), "--no-progress"])
    assert code == 0
    return out


@pytest.fixture
def untrained_checkpoint(tmp_path) -> Path:
    """A valid checkpoint of an untrained default model, for tests that only need the file format."""
    from tinymnist.lab.series import last_step
    from tinymnist.models.model import create_model
    from tinymnist.core.runs import save_checkpoint

    cfg = last_step().config
    path = tmp_path / "model.pt"
    save_checkpoint(path, create_model(cfg.model, dropout=cfg.dropout), cfg)
    return path


@pytest.fixture(scope="module")
def learnable_dir(tmp_path_factory):
    """Small MNIST-format files a good recipe learns quickly (a bright band whose row gives the label)."""
    root = tmp_path_factory.mktemp("mnist")
    synthetic_mnist(root, n_train=512, n_test=256, learnable=True)
    return root


@pytest.fixture
def no_verify(monkeypatch):
    """Made-up data has no known MD5: skip the check for this test."""
    monkeypatch.setenv("TINYMNIST_VERIFY", "0")


@pytest.fixture(scope="session")
def built():
    """The C kernels, built for this machine: a test of them is skipped where they cannot build, but not in CI."""
    from tinymnist.accel import kernels

    lib, why = kernels.library()
    if lib is None:
        if os.environ.get("CI"):
            pytest.fail(f"the C kernels must build in CI: {why}")
        pytest.skip(why)
    return lib
