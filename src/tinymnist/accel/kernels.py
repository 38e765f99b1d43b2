"""Compiled CPU kernels for the training step: convolutions, batch norm and ReLU fused into one forward and one
backward pass, and a leaner 2x2 max pool.

Why: on a 2-core CPU the step of a tiny CNN is many small operations, and PyTorch's are slow for a few channels in
channels-last memory. Profiled on a 2-core AVX2 host (AMD EPYC), one training step of Model_7 at batch 128 and 2
threads spent about 40% of its time in batch norm forward and backward and ReLU's backward; the (128, 8, 26, 26)
batch-norm backward took 4.3 ms at 2 threads against 1.3 ms at 1. The fused kernels (csrc/kernels.c) read each
activation three times and write it once in each direction; on the same host, (128, 16, 24, 24) forward 0.24 ms
and backward 0.37 ms at 2 threads, against 1.3-1.8 ms and about 3 ms for PyTorch's kernels (batch norm, ReLU,
their backward). The max pool keeps a 1-byte winner per output instead of an 8-byte index and writes its input
gradient in one pass; it is exact, so it changes no result.

The convolutions (stride 1, unpadded, bias-free: every conv block of the series' models) replace oneDNN's, which
for 1-16 channels reorder activations and weights into blocked layouts around each call: 53 parallel regions per
step of Model_7 became 34. Depthwise convolutions (one filter per channel, as in Model_11's body) have kernels of
their own: in a profile of Model_11's step at batch 32 they had been 13% of the step on PyTorch's ops. With them,
`tinymnist bench --model Model_11 --batch-size 32 --no-epoch --concurrency 0` on a 2-core AMD EPYC gave fused/native
1.90 against 1.32 before (and 1.97 against 1.68 at batch 128): results/bench-depthwise/. `tinymnist bench` measures the whole step as configured against the plain one on every
host (ratios["lean/plain"], ["fused/native"] and ["model-step/peak"]).

Threads: the kernels run on a small thread pool of their own (csrc/kernels.c), not on PyTorch's OpenMP threads. On
a 2-core AMD EPYC virtual machine a sleeping OpenMP thread took about 0.1-0.3 ms to wake (a bare OpenMP loop
under the passive wait policy), and a step paid that about twice per operation, so a second thread made a step
of Model_7 hardly faster than one (strace: ~200 futex calls per step). The pool's helpers wait between operations
by spinning with sched_yield(), so they are awake when the next operation comes while a process beside them still
gets the core at once; after runtime.SPIN_US without work they sleep. Measured on that host (interleaved, 2
threads, 80 steps, 3 repeats): 5,479-6,817 images/s against 4,652-5,236 with helpers that sleep at once.
These were one-off measurements with scratch scripts (quoted in the commit messages); `tinymnist bench` is the
repeatable one.

The C source is built once per machine with the system's C compiler (CC, or cc/gcc/clang on PATH; POSIX threads,
no OpenMP needed) for this CPU (-march=native), into a cache (TINYMNIST_CACHE, else ~/.cache/tinymnist). The
build is atomic, so parallel workers never load half a library. Where no compiler is found or the build fails,
`kernels="auto"` trains with PyTorch's ops and says so in one line; an explicit `kernels="fused"` is an error.

Results: the batch norm kernels and the convolutions' weight gradient sum over fixed slices of the batch in double,
and every other output is computed whole by one thread, so the results depend on the data alone, not on the thread
count; whole fused runs of the final recipe at 1 and 2 threads had identical histories (results/check-final-jobs*.json).
They are not bit-identical to PyTorch's kernels (another summation order), so a run trained fused and one trained
native differ in the last digits, and then in their histories. tests/test_kernels.py holds them to PyTorch's
outputs, gradients and running statistics.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import runtime
from ..errors import TinyMnistError
from ..fileio import atomic_path

KERNELS = ("auto", "fused", "native")  # the choices of a recipe's kernels field; "auto" resolves per machine

OPS = ("convolutions", "batch norm + activation", "2x2 max pool")  # what "fused" trains in C
SOURCE = Path(__file__).with_name("csrc") / "kernels.c"
FLAGS = ("-O3", "-march=native", "-pthread", "-std=gnu11", "-shared", "-fPIC")
CACHE_ENV = "TINYMNIST_CACHE"
_P, _I, _L, _D, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_double, ctypes.c_float
# the C library's exported functions and their parameters, as ctypes sees them (every pointer a void pointer);
# tests/test_kernels.py holds this to the prototypes in csrc/kernels.c
PROTOTYPES = {
    "tm_bn_act_forward": (_P, _L, _I, _P, _P, _D, _I, _F, _P, _P, _P, _P, _I),
    "tm_bn_act_backward": (_P, _P, _P, _L, _I, _P, _P, _I, _F, _P, _P, _P, _I),
    "tm_maxpool2_forward": (_P, _L, _L, _L, _I, _P, _P, _I),
    "tm_maxpool2_backward": (_P, _P, _L, _L, _L, _I, _P, _I),
    "tm_conv_forward": (_P, _L, _L, _L, _I, _P, _I, _I, _P, _I),
    "tm_conv_backward": (_P, _L, _L, _L, _I, _P, _I, _I, _P, _P, _P, _I),
    "tm_dwconv_forward": (_P, _L, _L, _L, _I, _P, _I, _I, _P, _I),
    "tm_dwconv_backward": (_P, _L, _L, _L, _I, _P, _I, _I, _P, _P, _P, _I),
    "tm_set_spin": (_L,),
    "tm_set_pixel_tiles": (_I,),
    "tm_bn_supports": (_I,),
    "tm_chain_forward": (_P, _I, _I),
    "tm_chain_backward": (_P, _I, _I),
    "tm_op_layout": (_P,),
}


class ChainOp(ctypes.Structure):
    """One op of a chain the C library runs in one call (csrc/kernels.c: tm_op, tm_chain_forward and
    tm_chain_backward; accel/program.py builds them): its kernel (CHAIN_KINDS), its input's shape (N, H, W, C,
    channels-last) and its memory. Field for field the C struct (tm_op_layout says where C puts each)."""

    _fields_ = [(name, _L) for name in ("kind", "n", "h", "w", "c", "co", "k", "act")] + [
        ("eps", _D), ("slope", _F)] + [(name, _P) for name in (
            "x", "out", "weight", "bias", "mean", "var", "coef", "idx", "g", "dx", "dweight", "dbias")] + [
        ("ns_forward", _L), ("ns_backward", _L)]


CHAIN_KINDS = {"conv": 0, "dwconv": 1, "bn": 2, "pool": 3}  # csrc/kernels.c: OP_CONV ...


def supports(channels: int) -> bool:
    """Whether the batch norm kernels take this many channels: the C library's own rule (tm_bn_supports)."""
    lib = library()[0]
    return lib is not None and bool(lib.tm_bn_supports(channels))


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "tinymnist")
    return Path(root) / "kernels"


def _compiler() -> Optional[list[str]]:
    """The compiler command: CC as the user wrote it (e.g. "ccache gcc"), else cc, gcc or clang from PATH."""
    cc = shlex.split(os.environ.get("CC", ""))
    if cc:
        first = shutil.which(cc[0])
        return [first, *cc[1:]] if first else None
    return next(([p] for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _build_key(compiler: list[str], version: str) -> str:
    from .device import cpu_info  # -march=native: the library is for this CPU only

    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(json.dumps([compiler, version, FLAGS, cpu_info(), sys.platform]).encode())
    return h.hexdigest()[:16]


class _BuildError(Exception):
    pass


@functools.lru_cache(maxsize=None)
def library() -> tuple[Optional[ctypes.CDLL], str]:
    """(the loaded kernels, "") or (None, why they are unavailable). Built on first use, then taken from the
    cache; one process builds at most once."""
    if sys.platform == "win32":
        return None, "the C kernels are built for Linux and macOS only"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc)"
    try:
        probe = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30)
        version = (probe.stdout.splitlines() or [""])[0]
        path = cache_dir() / f"kernels-{_build_key(compiler, version)}.so"
        if not path.exists():
            with atomic_path(path) as tmp:  # renamed into place only if the block ends without an exception
                built = subprocess.run([*compiler, *FLAGS, "-o", str(tmp), str(SOURCE), "-lm"],
                                       capture_output=True, text=True, timeout=300)
                if built.returncode != 0:
                    why = next((l for l in built.stderr.splitlines() if "error" in l),
                               built.stderr.strip()[:200]) or f"exit status {built.returncode}"
                    raise _BuildError(f"{Path(compiler[-1]).name} could not build {SOURCE.name}: {why.strip()}")
        lib = ctypes.CDLL(str(path))
    except _BuildError as e:
        return None, str(e)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building the C kernels failed: {e}"
    for name, params in PROTOTYPES.items():
        getattr(lib, name).argtypes = list(params)
    set_spin(runtime.pool_spin_us(), lib)
    return lib, ""


def set_spin(us: int, lib: Optional[ctypes.CDLL] = None) -> None:
    """How long the kernels' idle helper threads spin (yielding the core) before they sleep; -1: never sleep."""
    lib = lib or library()[0]
    if lib is not None:
        lib.tm_set_spin(-1 if us < 0 else us * 1000)


def resolve_kernels(requested: str, device: torch.device, precision: str, memory_format: str,
                    note: Optional[Callable[[str], None]] = None) -> str:
    """'auto' -> 'fused' where the kernels apply (CPU, fp32, channels_last) and build, else 'native'. If they
    apply but do not build, `note` gets one line saying why. An explicit 'fused' that cannot run is an error."""
    if requested not in KERNELS:
        raise TinyMnistError(f"unknown kernels {requested!r} (choose from {', '.join(KERNELS)})")
    if requested == "native":
        return "native"
    applies = device.type == "cpu" and precision == "fp32" and memory_format == "channels_last"
    if not applies:
        if requested == "fused":
            raise TinyMnistError(f"fused kernels need a CPU, fp32 and channels_last; this run has {device.type}, "
                                 f"{precision} and {memory_format}")
        return "native"
    lib, why = library()
    if lib is None:
        if requested == "fused":
            raise TinyMnistError(f"fused kernels unavailable: {why}")
        if note is not None:
            note(f"tinymnist: note: {why}; training with PyTorch's ops (slower, and another summation order)")
        return "native"
    return "fused"


# The kernels' thread count while this Python thread trains a model on them (unset: PyTorch's intra-op count). Like
# PyTorch's own count (OpenMP's, which is per thread), it belongs to one thread. See training_threads.
_local = threading.local()


def threads() -> int:
    """How many threads of the kernels' pool each kernel call uses."""
    return getattr(_local, "threads", None) or torch.get_num_threads()


def trains_on_kernels(model: nn.Module) -> bool:
    """Whether every convolution and batch norm of `model` trains on the kernels (after use_kernels), and it has
    at least one: then PyTorch's own ops in its step are the small ones (see training_threads)."""
    mods = list(model.modules())
    convs = [m for m in mods if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    return bool(convs) and all(isinstance(m, (Conv2d, BatchNormAct)) for m in convs)


@contextlib.contextmanager
def training_threads(model: nn.Module):
    """While a model that trains on the kernels takes its training steps: the kernels keep the run's thread count
    and PyTorch's own ops (the loss, the optimizer, the EMA, the augmentation) run on one thread.

    Why: at small batches those ops are each below PyTorch's parallel grain, so they ran on one thread already;
    but with 2 intra-op threads, an op that does cross it (autograd's gradient buffers) wakes an OpenMP worker,
    and where OpenMP's workers spin after their work (its default wait policy) they take the second core from the
    kernels' pool. runtime.py sets a passive wait before torch loads, but a script or notebook that imports torch
    before tinymnist keeps OpenMP's default. Measured on a 2-core AMD EPYC (AVX-512), a step of Model_15 at batch
    32 and 2 threads, in one process taking turns (a scratch script): with torch imported first, 15.6-16.2 ms with
    the kernels on PyTorch's threads against 8.3-8.7 ms in this block; with runtime's wait in force, 9.9-10.4
    against 9.7-10.3 ms, the same within noise (`tinymnist bench --small-batches` measured that pair, with
    runtime's wait in force, in processes of their own: results/bench-small-batches.json as of 6397654). Neither count changes a result: the kernels are
    thread-invariant, and PyTorch's ops in such a step are elementwise or reduce fewer elements than its grain.
    Only a model that trains wholly on the kernels (trains_on_kernels) gets this; a network with convolutions on
    PyTorch's ops keeps their threads. Evaluation (large batches, PyTorch's ops) runs outside this block, with
    every thread."""
    if getattr(_local, "threads", None) or not trains_on_kernels(model):  # inside the block already: nothing to walk
        yield
        return
    _local.threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this thread's count (OpenMP's is per thread), so another thread keeps its own
    try:
        yield
    finally:
        torch.set_num_threads(_local.threads)
        _local.threads = None


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _check(code: int, what: str = "fused batch norm kernel") -> None:
    if code != 0:
        raise RuntimeError(f"{what}: " + ("too many channels" if code == 1 else "out of memory"))


# the activations batch norm fuses with, by the C library's codes (csrc/kernels.c: ACT_RELU ...); a module of one of
# these types after a BatchNorm2d is fused, whatever network it is in
ACTIVATIONS = {"relu": 0, "gelu": 1, "silu": 2, "leaky_relu": 3}


def activation_of(module: nn.Module) -> Optional[tuple[str, float]]:
    """(name, negative slope) of an activation module the kernels fuse with batch norm, else None: nn.ReLU, the
    exact nn.GELU (not its tanh approximation), nn.SiLU and nn.LeakyReLU."""
    if type(module) is nn.ReLU:
        return "relu", 0.0
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu", 0.0
    if type(module) is nn.SiLU:
        return "silu", 0.0
    if type(module) is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    return None


def _activate(x: torch.Tensor, act: str, slope: float) -> torch.Tensor:
    """PyTorch's own activation: what a fused module computes where the kernels do not run (evaluation)."""
    if act == "relu":
        return F.relu(x)
    if act == "gelu":
        return F.gelu(x)
    if act == "silu":
        return F.silu(x)
    return F.leaky_relu(x, slope)


class _BatchNormAct(torch.autograd.Function):
    """act(batch_norm(x)) in training mode, on the C kernels; also returns the batch mean and biased variance."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act: int, slope: float):
        lib = library()[0]
        x = x.contiguous(memory_format=torch.channels_last)  # (N,C,H,W) whose memory is (N*H*W) x C
        n, c, h, w = x.shape
        out = torch.empty_like(x)
        stats = x.new_empty((2, c), dtype=torch.float64)  # batch mean, biased variance
        coef = x.new_empty((3, c))  # 1/std, weight/std and the shift, for backward
        weight, bias = weight.detach().contiguous(), bias.detach().contiguous()  # alive through the call
        _check(lib.tm_bn_act_forward(_ptr(x), n * h * w, c, _ptr(weight), _ptr(bias), eps, act, slope, _ptr(out),
                                     _ptr(stats[0]), _ptr(stats[1]), _ptr(coef), threads()))
        ctx.save_for_backward(x, out, stats, coef)
        ctx.act, ctx.slope = act, slope
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad, _):
        lib = library()[0]
        x, out, stats, coef = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        n, c, h, w = x.shape
        dx, dweight, dbias = torch.empty_like(x), x.new_empty(c), x.new_empty(c)
        _check(lib.tm_bn_act_backward(_ptr(grad), _ptr(out), _ptr(x), n * h * w, c, _ptr(stats[0]), _ptr(coef),
                                      ctx.act, ctx.slope, _ptr(dx), _ptr(dweight), _ptr(dbias),
                                      threads()))
        return dx, dweight, dbias, None, None, None


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm2d then an activation (ReLU, GELU, SiLU or leaky ReLU) as one module: the fused kernels when
    training on float32 CPU tensors, PyTorch's ops otherwise (evaluation, other devices and dtypes). Parameters and
    buffers are BatchNorm2d's, by the same names, so checkpoints load either way."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, act: str = "relu",
                 slope: float = 0.0, affine: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine=affine, device=device, dtype=dtype)
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r} (choose from {', '.join(ACTIVATIONS)})")
        self.act, self.slope = act, float(slope)
        if not affine:  # the kernels take a scale and a shift: a BN without them is scale 1 and shift 0 (not saved)
            self.register_buffer("_unit", torch.ones(num_features, device=device, dtype=dtype), persistent=False)
            self.register_buffer("_zero", torch.zeros(num_features, device=device, dtype=dtype), persistent=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act}" + (f", slope={self.slope}" if self.act == "leaky_relu"
                                                             else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = (self.weight, self.bias) if self.affine else (self._unit, self._zero)
        if not (self.training and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
                and weight.dtype == torch.float32):
            return _activate(super().forward(x), self.act, self.slope)
        out, stats = _BatchNormAct.apply(x, weight, bias, self.eps, ACTIVATIONS[self.act], self.slope)
        self.track(stats, x)
        return out

    @torch.no_grad()
    def track(self, stats: torch.Tensor, x: torch.Tensor) -> None:
        """Move the running statistics toward a training batch's (x's) mean and biased variance (`stats`, as the
        forward kernel returns them), exactly as nn.BatchNorm2d keeps them."""
        self.num_batches_tracked.add_(1)
        f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        m = x.numel() // x.shape[1]
        self.running_mean.lerp_(stats[0].float(), f)
        self.running_var.lerp_((stats[1] * (m / max(m - 1, 1))).float(), f)


def fuse_bn_act(model: nn.Module) -> int:
    """Replace each BatchNorm2d that an activation of `activation_of` follows in an nn.Sequential by one
    BatchNormAct and an Identity, in place; returns how many. Do it before building the optimizer: the fused modules
    hold new parameter tensors (with the same values and names)."""
    count = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            bn, act = seq[i], activation_of(seq[i + 1])
            if (type(bn) is nn.BatchNorm2d and act is not None and bn.track_running_stats
                    and supports(bn.num_features)):
                fused = BatchNormAct(bn.num_features, bn.eps, bn.momentum, act[0], act[1], bn.affine,
                                     device=bn.running_mean.device, dtype=bn.running_mean.dtype)
                fused.load_state_dict(bn.state_dict())
                fused.train(bn.training)
                seq[i], seq[i + 1] = fused, nn.Identity()
                count += 1
    return count


class _MaxPool2x2(torch.autograd.Function):
    """max_pool2d(x, 2) on the C kernels: the same maxima and the same winners (the first maximum, NaN
    propagating), so the same output and gradient bit for bit, with a 1-byte index instead of an 8-byte one and a
    backward pass that writes the input gradient once instead of zero-filling it and then scattering."""

    @staticmethod
    def forward(ctx, x):
        lib = library()[0]
        x = x.contiguous(memory_format=torch.channels_last)
        n, c, h, w = x.shape
        out = torch.empty((n, c, h // 2, w // 2), memory_format=torch.channels_last)
        idx = torch.empty((n, c, h // 2, w // 2), dtype=torch.uint8, memory_format=torch.channels_last)
        lib.tm_maxpool2_forward(_ptr(x), n, h, w, c, _ptr(out), _ptr(idx), threads())
        ctx.save_for_backward(idx)
        ctx.shape = (n, c, h, w)
        return out

    @staticmethod
    def backward(ctx, grad):
        lib = library()[0]
        (idx,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        grad = grad.contiguous(memory_format=torch.channels_last)
        dx = torch.empty((n, c, h, w), memory_format=torch.channels_last)
        lib.tm_maxpool2_backward(_ptr(grad), _ptr(idx), n, h, w, c, _ptr(dx), threads())
        return dx


class MaxPool2x2(nn.MaxPool2d):
    """nn.MaxPool2d(2) that trains on the C kernels for float32 CPU tensors, and is PyTorch's otherwise."""

    def __init__(self):
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4:
            return _MaxPool2x2.apply(x)
        return super().forward(x)


def _is_plain_2x2(m: nn.Module) -> bool:
    return (type(m) is nn.MaxPool2d and m.kernel_size in (2, (2, 2)) and m.stride in (2, (2, 2))
            and m.padding in (0, (0, 0)) and m.dilation in (1, (1, 1)) and not m.ceil_mode and not m.return_indices)


def _swap(model: nn.Module, match: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace each submodule for which `match` holds by `make(it)`, in place; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, make(child))
                count += 1
    return count


def swap_max_pools(model: nn.Module) -> int:
    """Replace each plain 2x2 nn.MaxPool2d (stride 2, no padding) by a MaxPool2x2, in place; returns how many."""
    return _swap(model, _is_plain_2x2, lambda _: MaxPool2x2())


class _Conv2d(torch.autograd.Function):
    """conv2d(x, weight) with stride 1, no padding, no dilation and no bias, with one group or, `depthwise`, one
    filter per channel, on the C kernels: one operation of their thread pool per call in each direction, no layout
    reorders. Its results are the same at any thread count; they differ from oneDNN's in the last bits (another
    summation order)."""

    @staticmethod
    def forward(ctx, x, weight, depthwise: bool):
        lib = library()[0]
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.detach().contiguous()
        n, ci, h, w = x.shape
        co, k = weight.shape[0], weight.shape[-1]
        out = torch.empty((n, co, h - k + 1, w - k + 1), memory_format=torch.channels_last)
        kernel = lib.tm_dwconv_forward if depthwise else lib.tm_conv_forward
        _check(kernel(_ptr(x), n, h, w, ci, _ptr(weight), co, k, _ptr(out), threads()),
               "convolution kernel")
        ctx.save_for_backward(x, weight)
        ctx.depthwise = depthwise
        return out

    @staticmethod
    def backward(ctx, grad):
        lib = library()[0]
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        n, ci, h, w = x.shape
        co, k = weight.shape[0], weight.shape[-1]
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dweight = torch.empty_like(weight)
        kernel = lib.tm_dwconv_backward if ctx.depthwise else lib.tm_conv_backward
        _check(kernel(_ptr(x), n, h, w, ci, _ptr(weight), co, k, _ptr(grad), None if dx is None else _ptr(dx),
                      _ptr(dweight), threads()), "convolution kernel")
        return dx, dweight, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d (stride 1, no padding, no bias; one group, or one filter per channel) that trains on the C kernels
    for float32 CPU tensors large enough to hold its kernel, and is PyTorch's otherwise. Same parameter name, so
    checkpoints load either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
                and self.weight.dtype == torch.float32 and min(x.shape[-2:]) >= self.weight.shape[-1]):
            return _Conv2d.apply(x, self.weight, self.groups > 1)
        return super().forward(x)


def _is_plain_conv(m: nn.Module) -> bool:
    depthwise = m.groups == m.in_channels == m.out_channels if isinstance(m, nn.Conv2d) else False
    return (type(m) is nn.Conv2d and m.bias is None and (m.groups == 1 or depthwise) and m.stride == (1, 1)
            and m.dilation == (1, 1) and m.padding in ((0, 0), "valid") and m.kernel_size[0] == m.kernel_size[1])


def _kernel_conv(old: nn.Conv2d) -> Conv2d:
    conv = Conv2d(old.in_channels, old.out_channels, old.kernel_size, groups=old.groups, bias=False,
                  device=old.weight.device, dtype=old.weight.dtype)
    conv.weight = old.weight  # the same tensor: an optimizer may already hold it
    return conv.train(old.training)


def swap_convs(model: nn.Module) -> int:
    """Replace each stride-1, unpadded, bias-free square nn.Conv2d with one group or one filter per channel
    (depthwise) by a Conv2d, in place, keeping its weight tensor; returns how many."""
    return _swap(model, _is_plain_conv, _kernel_conv)


def use_kernels(model: nn.Module) -> int:
    """Train `model` on the C kernels: swap its plain convolutions and 2x2 max pools and fuse its batch norm +
    activation pairs, in place and before its optimizer is built; returns how many modules changed."""
    return swap_convs(model) + fuse_bn_act(model) + swap_max_pools(model)


def coverage(model: nn.Module) -> dict:
    """What of a model trains on the C kernels, after use_kernels: for convolutions, batch norm (+ activation) and 2x2 max
    pools, how many were swapped of how many there are. A network's other modules, and those the kernels do not
    support (padded or strided convolutions, grouped ones other than depthwise, batch norm not followed by an activation module of activation_of), stay PyTorch's."""
    mods = list(model.modules())
    kinds = {"convolutions": (Conv2d, nn.Conv2d), "batch norm + activation": (BatchNormAct, nn.BatchNorm2d),
             "2x2 max pools": (MaxPool2x2, nn.MaxPool2d)}
    return {name: {"fused": sum(isinstance(m, ours) for m in mods), "of": sum(isinstance(m, theirs) for m in mods)}
            for name, (ours, theirs) in kinds.items()}
