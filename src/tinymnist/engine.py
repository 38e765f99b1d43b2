"""The training loop: train_epoch and evaluate return their metrics; fit runs a whole recipe."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .config import TrainConfig
from .data import MNIST, Loader, validation_split
from .device import (autocast, hardware, resolve_memory_format, resolve_precision, seed_everything, sync,
                     torch_memory_format)
from .kernels import resolve_kernels, use_kernels
from .model import Net


@dataclass(frozen=True)
class Metrics:
    """Average loss and accuracy (percent) over `total` samples."""

    loss: float
    correct: int
    total: int

    @property
    def acc(self) -> float:
        return 100.0 * self.correct / max(1, self.total)


class EMA:
    """An exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        self._float = [(a, b) for a, b in pairs if a.is_floating_point()]
        self._other = [(a, b) for a, b in pairs if not a.is_floating_point()]  # e.g. BN's batch counter

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        # a short warm-up, so the average is not dominated by the random initialisation
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_([a for a, _ in self._float], [b for _, b in self._float], 1.0 - decay)
        for a, b in self._other:
            a.copy_(b)


def resolve_for(cfg: TrainConfig, device: torch.device, facts: dict, warn: bool = True) -> TrainConfig:
    """The recipe with 'auto' precision, memory format and kernels replaced by what this machine gets (the rules of
    device.py and kernels.py); an explicit bf16 without native support, or fused kernels that do not build here,
    is one line on stderr."""
    import sys

    warn = (lambda line: print(line, file=sys.stderr, flush=True)) if warn else None
    precision = resolve_precision(cfg.precision, device, facts, warn=warn)
    memory_format = resolve_memory_format(cfg.memory_format, device, facts)
    return dataclasses.replace(cfg, precision=precision, memory_format=memory_format,
                               kernels=resolve_kernels(cfg.kernels, device, precision, memory_format, note=warn))


def build_for(cfg: TrainConfig, device: torch.device) -> Net:
    """The untrained network of a resolved recipe, on `device`, in its memory format, with its kernels."""
    model = cfg.build_model().to(device, memory_format=torch_memory_format(cfg.memory_format))
    if cfg.kernels == "fused":
        use_kernels(model)
    return model


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov), Adam or AdamW, as the config says."""
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Return (scheduler, per_batch): OneCycleLR steps every batch, StepLR every epoch, 'none' never."""
    if cfg.scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, pct_start=cfg.pct_start,
            div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor, cycle_momentum=False)
        return sched, True
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma), False
    return None, False


def train_epoch(model: nn.Module, loader: Loader, optimizer: torch.optim.Optimizer, scheduler=None,
                label_smoothing: float = 0.0, desc: str = "train", progress: Optional[bool] = None,
                ema: Optional[EMA] = None, precision: str = "fp32",
                memory_format: torch.memory_format = torch.contiguous_format) -> Metrics:
    """One pass over `loader`. Counts stay on the device; the host reads them once, at the end."""
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    # progress=None lets tqdm decide: a bar on a terminal, nothing in a log file
    bar = tqdm(loader, desc=desc, leave=False, disable=None if progress is None else not progress, dynamic_ncols=True)
    refresh = max(1, len(loader) // 25)  # the bar reads the counters ~25 times an epoch, not every step
    for i, (x, y) in enumerate(bar):
        x = x.contiguous(memory_format=memory_format)  # a restride, not a copy: the batch has one channel
        with autocast(device, precision):
            out = model(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        n = y.shape[0]
        seen += n
        loss_sum += loss.detach() * n
        correct += (out.detach().argmax(1) == y).sum()
        if not bar.disable and (i + 1) % refresh == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100 * correct.item() / seen:.2f}%",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    return Metrics(loss_sum.item() / max(1, seen), int(correct.item()), seen)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Loader, verbose: bool = True, precision: str = "fp32",
             memory_format: torch.memory_format = torch.contiguous_format) -> Metrics:
    """Average loss and accuracy on `loader`, printed in the classic one-line form when verbose."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for x, y in loader:
        with autocast(device, precision):
            out = model(x.contiguous(memory_format=memory_format)).float()
        loss_sum += F.cross_entropy(out, y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        seen += y.shape[0]
    m = Metrics(loss_sum.item() / max(1, seen), int(correct.item()), seen)
    if verbose:
        print(f"Test set: Average loss: {m.loss:.4f}, Accuracy: {m.correct}/{m.total} ({m.acc:.2f}%)")
    return m


def fit(cfg: TrainConfig, data: MNIST, on_epoch: Optional[Callable[[dict, Net], None]] = None,
        progress: Optional[bool] = None, verbose: bool = True) -> tuple[Net, list[dict]]:
    """Train `cfg` on `data` (already on the training device); return the model and per-epoch history.

    With cfg.ema, the averaged model is the one evaluated and returned; train metrics are the raw model's."""
    device = data.train_images.device
    seed_everything(cfg.seed)
    if "auto" in (cfg.precision, cfg.memory_format, cfg.kernels):  # train_run resolves (and warns) before
        cfg = resolve_for(cfg, device, hardware(device), warn=False)
    fmt = torch_memory_format(cfg.memory_format)
    model = build_for(cfg, device)
    train_images, train_labels = data.train_images, data.train_labels
    val = None
    if cfg.val:
        keep, held = (i.to(device) for i in validation_split(data.train_labels, cfg.val))
        val = Loader(train_images[held], train_labels[held], cfg.eval_batch_size, limit_batches=cfg.limit_batches)
        train_images, train_labels = train_images[keep], train_labels[keep]
    train = Loader(train_images, train_labels, cfg.batch_size, shuffle=True, seed=cfg.seed,
                   aug=cfg.aug, limit_batches=cfg.limit_batches)
    test = Loader(data.test_images, data.test_labels, cfg.eval_batch_size, limit_batches=cfg.limit_batches)
    optimizer = make_optimizer(model, cfg)
    scheduler, per_batch = make_scheduler(optimizer, cfg, len(train))
    ema = EMA(model, cfg.ema) if cfg.ema else None
    final = ema.model if ema else model
    history: list[dict] = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]  # the LR at the start of the epoch
        tr = train_epoch(model, train, optimizer, scheduler if per_batch else None, cfg.label_smoothing,
                         desc=f"epoch {epoch}/{cfg.epochs}", progress=progress, ema=ema, precision=cfg.precision,
                         memory_format=fmt)
        if verbose:
            print(f"Epoch {epoch:2d}/{cfg.epochs}: train loss {tr.loss:.4f}, train accuracy {tr.acc:.2f}%, lr {lr:.3e}")
        record = {"epoch": epoch, "train_loss": round(tr.loss, 6), "train_acc": round(tr.acc, 4)}
        if val is not None:
            va = evaluate(final, val, verbose=False, precision=cfg.precision, memory_format=fmt)
            record.update(val_loss=round(va.loss, 6), val_acc=round(va.acc, 4))
            if verbose:
                print(f"Validation set: Average loss: {va.loss:.4f}, Accuracy: {va.correct}/{va.total} ({va.acc:.2f}%)")
        te = evaluate(final, test, verbose=verbose, precision=cfg.precision, memory_format=fmt)
        if scheduler is not None and not per_batch:
            scheduler.step()
        sync(device)
        record.update(test_loss=round(te.loss, 6), test_acc=round(te.acc, 4), lr=lr,
                      seconds=round(time.perf_counter() - t0, 3))
        history.append(record)
        if on_epoch is not None:
            on_epoch(record, final)
    return final, history
