"""The training loop: train_epoch and evaluate return their metrics; fit runs a whole recipe."""

from __future__ import annotations

import contextlib
import copy
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..accel.device import autocast, sync
from ..accel.kernels import training_threads
from ..errors import TinyMnistError
from ..models.model import Net
from .config import TrainConfig
from .data import MNIST, Loader
from .optim import make_optimizer
from .plan import Plan, build_for, make_plan


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
        # parameters and buffers, each once: a weight two layers share (a tied repeat, model.py) is one tensor,
        # which state_dict() would list, and the average would decay, once per layer
        pairs = list(zip([*self.model.parameters(), *self.model.buffers()], [*model.parameters(), *model.buffers()]))
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


class _Settled:
    """A one-cycle schedule that ends before the run does: it steps for its `steps`, then the LR stays at its final
    value. Saves and restores like the schedule itself (a resumed run continues the same LR)."""

    def __init__(self, inner, steps: int):
        self.inner, self.steps = inner, steps

    def step(self) -> None:
        if self.inner.last_epoch < self.steps - 1:  # OneCycleLR refuses a step past its total
            self.inner.step()

    def get_last_lr(self) -> list[float]:
        return self.inner.get_last_lr()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Return (scheduler, per_batch): OneCycleLR steps every batch, StepLR every epoch, 'none' never."""
    if cfg.scheduler == "onecycle":
        cycle = min(cfg.cycle_epochs or cfg.epochs, cfg.epochs)
        try:
            sched = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=cfg.lr, epochs=cycle, steps_per_epoch=steps_per_epoch, pct_start=cfg.pct_start,
                div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor, cycle_momentum=False)
        except ZeroDivisionError:  # PyTorch's warm-up phase ends at step pct_start * steps - 1: here step 0
            raise TinyMnistError(
                f"the one-cycle schedule cannot warm up over {cfg.pct_start:g} x {cfg.epochs * steps_per_epoch} "
                "batches = 1 step: train more batches (--limit-batches, --epochs) or choose another --scheduler"
            ) from None
        return (sched if cycle == cfg.epochs else _Settled(sched, cycle * steps_per_epoch)), True
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma), False
    return None, False


def distillation_loss(out: torch.Tensor, soft: torch.Tensor, y: torch.Tensor, weight: float, temp: float,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinton's knowledge distillation: (1 - weight) x the labels' cross-entropy + weight x temp^2 x KL(teacher's
    softened distribution || the student's), both softened by `temp` (the temp^2 keeps the term's gradient on the
    scale of the cross-entropy's)."""
    hard = F.cross_entropy(out, y, label_smoothing=label_smoothing)
    kl = F.kl_div(F.log_softmax(out / temp, dim=1), F.log_softmax(soft / temp, dim=1), log_target=True,
                  reduction="batchmean")
    return (1.0 - weight) * hard + weight * temp * temp * kl


def train_epoch(model: nn.Module, loader: Loader, optimizer: torch.optim.Optimizer, scheduler=None,
                label_smoothing: float = 0.0, desc: str = "train", progress: Optional[bool] = None,
                ema: Optional[EMA] = None, precision: str = "fp32",
                memory_format: torch.memory_format = torch.contiguous_format,
                teacher: Optional[nn.Module] = None, distill: float = TrainConfig.distill,
                distill_temp: float = TrainConfig.distill_temp, sam_rho: float = 0.0) -> Metrics:
    """One pass over `loader`. Counts stay on the device; the host reads them once, at the end. With a `teacher`
    (a trained network in eval mode), the loss is distillation_loss on its outputs for the same augmented batch.
    With `sam_rho` > 0, each step is sharpness-aware (sam_ascent): the optimizer steps with the gradient taken at
    the weights moved uphill by rho, a second forward and backward pass per batch."""
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    # progress=None lets tqdm decide: a bar on a terminal, nothing in a log file
    bar = tqdm(loader, desc=desc, leave=False, disable=None if progress is None else not progress, dynamic_ncols=True)
    refresh = max(1, len(loader) // 25)  # the bar reads the counters ~25 times an epoch, not every step
    with training_threads(model):  # the C kernels keep the run's threads; PyTorch's ops of a step take one
        for i, (x, y) in enumerate(bar):
            x = x.contiguous(memory_format=memory_format)  # a restride, not a copy: the batch has one channel
            soft = None
            if teacher is not None:
                with torch.no_grad(), autocast(device, precision):
                    soft = teacher(x).float()

            def loss_of(out: torch.Tensor) -> torch.Tensor:
                if soft is None:
                    return F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
                return distillation_loss(out.float(), soft, y, distill, distill_temp, label_smoothing)

            with autocast(device, precision):
                out = model(x)
                loss = loss_of(out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if sam_rho > 0:
                with sam_ascent(model, sam_rho):  # the weights moved uphill; put back before the step
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(device, precision):
                        loss_of(model(x)).backward()
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


@contextlib.contextmanager
def sam_ascent(model: nn.Module, rho: float):
    """Sharpness-aware minimisation's ascent (Foret et al., 2021): move every weight that has a gradient by
    rho * g / ||g|| (the norm over all of them), so that the gradient taken inside this block is the one at the
    worst nearby weights; then put the weights back, keeping that gradient for the optimizer's step. Batch norm's
    running statistics are not updated by the second pass (its momentum is 0 inside the block), so they average
    the same batches as without SAM."""
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        scale = rho / (norm + 1e-12)
        before = [p.clone() for p in params]  # put back exactly, not by subtracting (rounding)
        for p in params:
            p.add_(p.grad * scale)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
            for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (momentum, count) in zip(norms, kept):
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)
            for p, old in zip(params, before):
                p.copy_(old)


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


class Trainer:
    """One recipe in training: model, optimizer, schedule, EMA, loaders and every RNG, advanced an epoch at a time.

    state_dict() holds all that the next epoch depends on, so a run stopped after any epoch and resumed from it,
    in this process or another, gives the same history as a run that never stopped (the same seed, device and
    threads). That is what lets parallel runs move between worker processes at epoch boundaries."""

    def __init__(self, plan: Plan):
        """Train a plan (plan.make_plan: the recipe resolved once, its network built, its split drawn)."""
        cfg, data = plan.cfg, plan.data
        self.plan = plan
        self.cfg, self.device = cfg, plan.device
        self.fmt = plan.memory_format
        self.model = plan.model
        train_images, train_labels = data.train_images, data.train_labels
        self.val = None
        if plan.split is not None:
            keep, held = plan.split.keep, plan.split.held
            self.val = Loader(train_images[held], train_labels[held], cfg.eval_batch_size,
                              limit_batches=cfg.limit_batches)
            train_images, train_labels = train_images[keep], train_labels[keep]
        self.train = Loader(train_images, train_labels, cfg.batch_size, shuffle=True, seed=cfg.seed,
                            aug=cfg.aug, limit_batches=cfg.limit_batches)
        # a validation run chooses a recipe, so it never reads the test set: that is read once, by the chosen
        # recipe's run on all training images
        self.test = None if self.val is not None else Loader(data.test_images, data.test_labels, cfg.eval_batch_size,
                                                              limit_batches=cfg.limit_batches)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler, self.per_batch = make_scheduler(self.optimizer, cfg, len(self.train))
        self.ema = EMA(self.model, cfg.ema) if cfg.ema else None
        self.history: list[dict] = []
        self.data = data
        # distillation: the teacher trains before the first epoch, or comes back with a resumed run's state
        self.teacher_cfg = plan.teacher
        self.teacher: Optional[nn.Module] = None
        self.teacher_history: list[dict] = []

    @property
    def final(self) -> Net:
        """The model that is evaluated and kept: the EMA average when the recipe has one, else the raw model."""
        return self.ema.model if self.ema else self.model

    @property
    def done(self) -> bool:
        return len(self.history) >= self.cfg.epochs

    def run_epoch(self, progress: Optional[bool] = None, verbose: bool = True) -> dict:
        """Train one epoch, evaluate, and return (and keep) its history record."""
        cfg, epoch = self.cfg, len(self.history) + 1
        if self.teacher_cfg is not None and self.teacher is None:
            self._train_teacher(progress, verbose)
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # the LR at the start of the epoch
        augmented = cfg.aug.active and not (cfg.aug_epochs and epoch > cfg.aug_epochs)
        self.train.aug = cfg.aug if augmented else None  # after aug_epochs, the images as they are
        tr = train_epoch(self.model, self.train, self.optimizer, self.scheduler if self.per_batch else None,
                         cfg.label_smoothing, desc=f"epoch {epoch}/{cfg.epochs}", progress=progress, ema=self.ema,
                         precision=cfg.precision, memory_format=self.fmt, teacher=self.teacher,
                         distill=cfg.distill, distill_temp=cfg.distill_temp, sam_rho=cfg.sam_rho)
        if verbose:
            print(f"Epoch {epoch:2d}/{cfg.epochs}: train loss {tr.loss:.4f}, train accuracy {tr.acc:.2f}%, lr {lr:.3e}")
        record = {"epoch": epoch, "train_loss": round(tr.loss, 6), "train_acc": round(tr.acc, 4)}
        if self.val is not None:
            va = evaluate(self.final, self.val, verbose=False, precision=cfg.precision, memory_format=self.fmt)
            record.update(val_loss=round(va.loss, 6), val_acc=round(va.acc, 4))
            if verbose:
                print(f"Validation set: Average loss: {va.loss:.4f}, Accuracy: {va.correct}/{va.total} ({va.acc:.2f}%)")
        if self.test is not None:
            te = evaluate(self.final, self.test, verbose=verbose, precision=cfg.precision, memory_format=self.fmt)
            record.update(test_loss=round(te.loss, 6), test_acc=round(te.acc, 4))
        if self.scheduler is not None and not self.per_batch:
            self.scheduler.step()
        sync(self.device)
        record.update(lr=lr, seconds=round(time.perf_counter() - t0, 3))
        self.history.append(record)
        return record

    def _train_teacher(self, progress: Optional[bool], verbose: bool) -> None:
        """Train the teacher's recipe to its end, in this process, on the same data. Every RNG is put back as it was,
        so the student's history is the same whenever its teacher trained (or whether it came from a saved state)."""
        if verbose:
            print(f"teacher: {self.cfg.teacher} ({self.teacher_cfg.model}), {self.teacher_cfg.epochs} epochs first")
        saved = (random.getstate(), np.random.get_state())
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            trainer = Trainer(make_plan(self.teacher_cfg, self.data))
            trainer.run(progress=progress, verbose=verbose)
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        self._set_teacher(trainer.final, trainer.cfg, trainer.history)

    def _set_teacher(self, model: nn.Module, cfg: TrainConfig, history: list[dict]) -> None:
        self.teacher = model.eval().requires_grad_(False)
        self.teacher_resolved, self.teacher_history = cfg, list(history)

    def run(self, until: Optional[int] = None, on_epoch: Optional[Callable[[dict], None]] = None,
            progress: Optional[bool] = None, verbose: bool = True) -> list[dict]:
        """The one epoch loop: train up to epoch `until` (None: the last), calling on_epoch(record) after each
        epoch (it may raise to stop the run, as a sweep's pruner does); return the history so far."""
        stop = self.cfg.epochs if until is None else min(until, self.cfg.epochs)
        while len(self.history) < stop:
            record = self.run_epoch(progress=progress, verbose=verbose)
            if on_epoch is not None:
                on_epoch(record)
        return list(self.history)

    def state_dict(self) -> dict:
        """Everything the next epoch depends on, as tensors and plain values (torch.save, weights_only loads it)."""
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
               "order": self.train.order_gen.get_state(), "aug": self.train.aug_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"epoch": len(self.history), "history": list(self.history), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "ema": {"model": self.ema.model.state_dict(), "updates": self.ema.updates} if self.ema else None,
                "teacher": {"config": self.teacher_resolved.to_dict(), "model": self.teacher.state_dict(),
                            "history": self.teacher_history} if self.teacher is not None else None,
                "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        """Continue from state_dict() of the same recipe: the next run_epoch() is the epoch after the saved one."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.model.load_state_dict(state["ema"]["model"])
            self.ema.updates = int(state["ema"]["updates"])
        if self.teacher_cfg is not None and state.get("teacher"):
            saved = state["teacher"]
            cfg = TrainConfig.from_dict(saved["config"])
            model = build_for(cfg, self.device)  # a resolved recipe, saved with the state
            model.load_state_dict(saved["model"])
            self._set_teacher(model, cfg, saved["history"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(_python_rng_state(rng["python"]))
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        self.train.order_gen.set_state(rng["order"])
        self.train.aug_gen.set_state(rng["aug"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.history = list(state["history"])


def _python_rng_state(state):
    """random.setstate wants (version, tuple of ints, gauss); a saved and loaded state may come back as lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def fit(cfg: TrainConfig, data: MNIST, on_epoch: Optional[Callable[[dict, Net], None]] = None,
        progress: Optional[bool] = None, verbose: bool = True) -> tuple[Net, list[dict]]:
    """Train `cfg` on `data` (already on the training device); return the model and per-epoch history.

    With cfg.ema, the averaged model is the one evaluated and returned; train metrics are the raw model's."""
    trainer = Trainer(make_plan(cfg, data))
    trainer.run(on_epoch=None if on_epoch is None else lambda record: on_epoch(record, trainer.final),
                progress=progress, verbose=verbose)
    return trainer.final, trainer.history
