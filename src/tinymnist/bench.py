"""Throughput of our tensor pipeline against the classic per-sample Dataset + DataLoader pipeline."""

from __future__ import annotations

import math
import platform
import statistics
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import AugConfig, TrainConfig
from .data import MEAN, MNIST, STD, Loader
from .device import autocast, available_cores, seed_everything, sync
from .engine import evaluate, make_optimizer, train_epoch
from .model import create_model


class ClassicDataset(torch.utils.data.Dataset):
    """The usual pipeline: one PIL image per __getitem__, randomly rotated and shifted, then ToTensor + Normalize."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, aug: AugConfig):
        self.images = images.cpu().numpy()
        self.labels = labels.cpu().numpy()
        self.aug = aug

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i], mode="L")
        a, t, s = self.aug.rotate, self.aug.translate, self.aug.scale
        angle = math.radians(np.random.uniform(-a, a))
        zoom = 1 + np.random.uniform(-s, s)
        dx, dy = (np.random.uniform(-t, t, size=2) * 28)
        # inverse map output -> input about the image centre, as PIL's AFFINE transform expects
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        cx = cy = 14.0
        matrix = (cos, sin, cx - cos * (cx + dx) - sin * (cy + dy), -sin, cos, cy + sin * (cx + dx) - cos * (cy + dy))
        img = img.transform((28, 28), Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=0)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)
        return (x - MEAN) / STD, int(self.labels[i])


def _worker_init(worker_id: int) -> None:
    np.random.seed(torch.initial_seed() % 2**32)


def _timed_steps(batches, step: Callable, steps: int, device: torch.device) -> float:
    """Images per second over `steps` training steps drawn from the iterator `batches`."""
    n = 0
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        step(x, y)
        n += y.shape[0]
    sync(device)
    return n / (time.perf_counter() - t0)


def run_bench(data: MNIST, model_name: str, cfg: TrainConfig, steps: int = 60, repeats: int = 3,
              epoch: bool = True, workers: int = 2, log: Optional[Callable[[str], None]] = print) -> dict:
    """Measure ours, classic and model-only throughput on the same model, batch size and augmentation."""
    device = data.train_images.device
    seed_everything(0)
    model = create_model(model_name, dropout=cfg.dropout).to(device)
    opt = make_optimizer(model, cfg)
    model.train()

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, cfg.precision):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def endless(make_iter):
        while True:
            yield from make_iter()

    bs = cfg.batch_size
    ours_loader = Loader(data.train_images, data.train_labels, bs, shuffle=True, seed=0, aug=cfg.aug)
    fixed = next(iter(ours_loader))
    results: dict = {}

    def measure(name: str, batches) -> None:
        _timed_steps(batches, step, 5, device)  # warm-up: allocator, kernels, worker start-up
        rates = [_timed_steps(batches, step, steps, device) for _ in range(repeats)]
        results[name] = {"images_per_s": round(statistics.median(rates), 1), "runs": [round(r, 1) for r in rates],
                         "steps": steps, "batch_size": bs}
        if log:
            log(f"{name:<11} {statistics.median(rates):>9,.0f} images/s  (median of {repeats} x {steps} steps)")

    measure("model_only", endless(lambda: iter([fixed])))
    measure("ours", endless(lambda: iter(ours_loader)))
    classic = torch.utils.data.DataLoader(
        ClassicDataset(data.train_images, data.train_labels, cfg.aug), batch_size=bs, shuffle=True,
        num_workers=workers, worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(0))
    batches = endless(lambda: iter(classic))
    measure("classic", batches)
    batches.close()  # drops the DataLoader iterator, which stops its workers before the epoch timing

    if epoch:
        full = Loader(data.train_images, data.train_labels, bs, shuffle=True, seed=0, aug=cfg.aug)
        test = Loader(data.test_images, data.test_labels, cfg.eval_batch_size)
        sync(device)
        t0 = time.perf_counter()
        train_epoch(model, full, opt, progress=False, precision=cfg.precision)
        t1 = time.perf_counter()
        evaluate(model, test, verbose=False, precision=cfg.precision)
        sync(device)
        t2 = time.perf_counter()
        results["ours"].update(epoch_s=round(t1 - t0, 2), test_pass_s=round(t2 - t1, 2),
                               epoch_plus_test_s=round(t2 - t0, 2))
        if log:
            log(f"ours: one full epoch {t1 - t0:.1f} s + test pass {t2 - t1:.1f} s = {t2 - t0:.1f} s")

    ours, classic_r, ceiling = (results[k]["images_per_s"] for k in ("ours", "classic", "model_only"))
    results["ratios"] = {"ours/classic": round(ours / classic_r, 3), "ours/model-only": round(ours / ceiling, 3)}
    results["env"] = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                      "precision": cfg.precision,
                      "classic_workers": workers, "model": model_name, "batch_size": bs,
                      "aug": {"rotate": cfg.aug.rotate, "translate": cfg.aug.translate, "scale": cfg.aug.scale},
                      "python": platform.python_version(), "platform": platform.platform(),
                      "processor": platform.processor() or platform.machine(), "cpu_count": available_cores()}
    if log:
        log(f"ratios: ours/classic {results['ratios']['ours/classic']:.2f}x, "
            f"ours/model-only {results['ratios']['ours/model-only']:.2f}")
    return results


def time_training(runs: int, data_dir: Optional[str], device: str, precision: str = "fp32",
                  log: Optional[Callable[[str], None]] = print) -> dict:
    """Wall time of the full default `tinymnist train`, as `time` would measure it, `runs` times."""
    import os
    import subprocess
    import sys
    import tempfile

    seconds = []
    cmd = [sys.executable, "-m", "tinymnist.cli", "train", "--no-progress", "--device", device, "--precision", precision]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    for i in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            p = subprocess.run(cmd + ["--out", os.path.join(tmp, "run")], capture_output=True, text=True)
            dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"training run failed: {p.stderr.strip().splitlines()[-1:]}")
        seconds.append(round(dt, 1))
        if log:
            log(f"tinymnist train (full default recipe), run {i + 1}/{runs}: {dt:.1f} s")
    shown = "tinymnist train" + (f" --precision {precision}" if precision != "fp32" else "")
    return {"command": shown, "seconds": seconds, "median_s": statistics.median(seconds)}
