"""A chain of layers trained as one program: the whole forward pass on the C kernels in one autograd node, and the
whole backward pass in one, with the activations in buffers kept from step to step.

Why: at batch 32 a training step of the answer (Model_15) is about 40 kernel calls of tens to hundreds of
microseconds each, and around each PyTorch added an autograd node, a ctypes call with its argument checks, new
output tensors, layout checks on every input and gradient, and the batch-norm running statistics as separate small
ops. A profile of that step (torch.profiler, 1 thread, AMD EPYC AVX-512) put the forward pass at twice the time of
its kernels. A program runs each run of kernel leaves in one call of the C library (tm_chain_forward,
tm_chain_backward: the same kernels, called from C in the same order) on buffers it allocated for this batch shape
the first time it met it, and moves all its batch norms' running statistics in a few calls. Measured against
the walk over leaves in Python that it replaced (scripts/ab_steps.py, the two versions taking turns on one AMD EPYC
AVX-512 host, results/bench-chains/): a step of Model_15 at batch 32 gained 2.5% at 1 thread and 5% at 2 (9% and
5% per GFLOP/s of the machine's matrix multiply at that moment). The Python between the kernels was a small part of
the step; the kernels themselves, the 3x3 convolutions first, are most of it (`tinymnist bench --layers`).

Results: the same kernels run on the same inputs in the same order, and the few layers that are not kernels (the
global average pool, a flatten, a dropout) run on PyTorch's own ops and their own autograd, as before. So a step
here gives bit for bit the outputs, gradients and running statistics of the layer-by-layer step
(tests/test_program.py holds it to that, for every layout of the series and a tied one); a run's history does not
change when it moves onto a program.

What a program takes (compile_chain): an nn.Sequential whose leaves, in order, are the kernels' modules
(kernels.Conv2d, BatchNormAct, MaxPool2x2) and modules without parameters (identity, pooling, flatten, dropout).
Anything else, a leaf with parameters of its own or with hooks, leaves the chain on PyTorch's layer-by-layer
path. A shape the kernels do not take (a map smaller than a kernel) runs layer by layer too.

Buffers: a program keeps one set of buffers per input shape, lent to a forward pass and given back when its
backward pass ends, so two forward passes before one backward (sharpness-aware minimisation takes two) each get
their own. The logits it returns, and every gradient, are new tensors: nothing the caller holds is overwritten by
the next step.
"""

from __future__ import annotations

import ctypes
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .kernels import ACTIVATIONS, CHAIN_KINDS, BatchNormAct, ChainOp, Conv2d, MaxPool2x2, _check, library, threads

_CL = torch.channels_last
_KERNEL_KINDS = ("conv", "bn", "pool")  # what a chain of the C library runs


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=_CL)


def _leaves(module: nn.Module) -> list[nn.Module]:
    """The modules a Sequential runs, in order, with nested Sequentials opened."""
    if type(module) in (nn.Sequential, KernelSequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def _island_ok(m: nn.Module) -> bool:
    """A leaf the program runs on PyTorch's ops with an autograd graph of its own: no parameters (their gradients
    would have to leave the program) and no hooks (a hook on a leaf would not see the program's calls)."""
    return next(m.parameters(recurse=True), None) is None and not (m._forward_hooks or m._forward_pre_hooks
                                                                   or m._backward_hooks)


def compile_chain(seq: nn.Sequential) -> Optional[list[nn.Module]]:
    """The leaves of `seq` if a program can train it (at least one kernel module, every leaf either a kernels
    module or a parameterless one), else None."""
    leaves = _leaves(seq)
    kernel = (Conv2d, BatchNormAct, MaxPool2x2)
    if not any(isinstance(m, kernel) for m in leaves):
        return None
    if not all(isinstance(m, kernel) and not (m._forward_hooks or m._forward_pre_hooks) or _island_ok(m)
               for m in leaves):
        return None
    return [m for m in leaves if type(m) is not nn.Identity]  # an activation fused into its batch norm left one


@dataclass
class _Buffers:
    """One forward pass's activations, for one input shape: each op's output (and a max pool's winners), and
    each op's input gradient in the backward pass; and each chain's ops for the C library, pointing at them."""

    out: list = field(default_factory=list)
    extra: list = field(default_factory=list)  # a pool's winners; a batch norm's [mean; var] and coefficients
    grad: list = field(default_factory=list)
    chains: dict = field(default_factory=dict)  # a chain's first leaf -> its ChainOp array
    stats: Optional[torch.Tensor] = None  # every batch norm's [mean; var] (their extra[i][0] are views of it)
    unbias: Optional[torch.Tensor] = None  # per element of stats: 1 for a mean, m / (m - 1) for a variance


class _Plan:
    """What a program runs for one input shape: each leaf's input shape, and whether every kernel takes it."""

    def __init__(self, leaves: list[nn.Module], shape: torch.Size):
        self.shapes: list[tuple] = []
        self.ok = True
        probe = torch.empty(shape, device="meta")
        for m in leaves:
            self.shapes.append(tuple(probe.shape))
            if isinstance(m, Conv2d):
                k = m.weight.shape[-1]
                if probe.dim() != 4 or min(probe.shape[-2:]) < k or m.weight.dtype != torch.float32:
                    self.ok = False
                    return
                probe = torch.empty(probe.shape[0], m.weight.shape[0], probe.shape[2] - k + 1,
                                    probe.shape[3] - k + 1, device="meta")
            elif isinstance(m, MaxPool2x2):
                n, c, h, w = probe.shape
                probe = torch.empty(n, c, h // 2, w // 2, device="meta")
            elif isinstance(m, BatchNormAct):
                if probe.dim() != 4:
                    self.ok = False
                    return
            else:
                try:
                    probe = _meta_out(m, probe)
                except Exception:  # a leaf that needs real data to run (a user's): the layers take this shape
                    self.ok = False
                    return
        self.out_shape = tuple(probe.shape)


def _meta_out(m: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    """The output shape of a parameterless leaf, from a meta tensor (no data, no RNG drawn)."""
    if isinstance(m, nn.Dropout) or type(m) is nn.Identity:
        return probe
    return m(probe)


def _kind(m: nn.Module) -> str:
    """How a program runs a leaf: on a kernel; as a flatten or a global average pool, whose
    backward passes it writes as PyTorch's autograd does (a graph of their own cost more than their arithmetic);
    or as an island, on PyTorch's op with an autograd graph of its own."""
    if isinstance(m, Conv2d):
        return "conv"
    if isinstance(m, BatchNormAct):
        return "bn"
    if isinstance(m, MaxPool2x2):
        return "pool"
    if type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
        return "flatten"
    if type(m) is nn.AdaptiveAvgPool2d and m.output_size in (1, (1, 1)):
        return "gap"
    return "island"


class Program:
    """The training step of one chain of leaves (compile_chain), forward and backward, on the C kernels: each run
    of kernel leaves (a convolution, a batch norm with its activation, a max pool) in one call of the C library
    (tm_chain_forward, tm_chain_backward), the other leaves between them on PyTorch's ops."""

    def __init__(self, leaves: list[nn.Module]):
        self.leaves = leaves
        self.params: list[nn.Parameter] = []
        for m in leaves:
            for p in m.parameters(recurse=False):
                if all(p is not q for q in self.params):  # a tied weight is one input, its gradients summed
                    self.params.append(p)
        self.kinds = [_kind(m) for m in leaves]
        # the order a pass walks: ("chain", first, end) for a run of kernel leaves [first, end), ("leaf", i, i + 1)
        self.parts: list[tuple[str, int, int]] = []
        for i, kind in enumerate(self.kinds):
            if kind in _KERNEL_KINDS and self.parts and self.parts[-1][0] == "chain" and self.parts[-1][2] == i:
                self.parts[-1] = ("chain", self.parts[-1][1], i + 1)
            else:
                self.parts.append(("chain" if kind in _KERNEL_KINDS else "leaf", i, i + 1))
        self._plans: dict[tuple, _Plan] = {}
        self._free: dict[tuple, list[_Buffers]] = {}
        self._bns = [m for m in leaves if isinstance(m, BatchNormAct)]
        self._grad_layouts: dict[int, tuple] = {}  # a chain's first leaf -> where its gradients go (_grad_block)
        # a list to time each leaf into ((leaf index, "forward" or "backward", seconds) per call), else None: what
        # `tinymnist bench --layers` reads (a chain's leaves as the C library timed them)
        self.clock: Optional[list] = None

    def plan(self, shape: torch.Size) -> _Plan:
        key = tuple(shape)
        if key not in self._plans:
            self._plans[key] = _Plan(self.leaves, shape)
        return self._plans[key]

    def describe(self, shape: torch.Size) -> list[dict]:
        """Each leaf for an input of `shape`: what it is ("conv 8→12 3×3 on 26×26"), and the multiply-adds per image
        of its forward and backward passes (a convolution's backward pass is its input gradient and its weight
        gradient, each as many as the forward pass; the first one's input needs none)."""
        rows = []
        for i, (m, s) in enumerate(zip(self.leaves, self.plan(shape).shapes)):
            where = f" on {s[2]}×{s[3]}" if len(s) == 4 else ""
            fwd = bwd = 0
            if isinstance(m, Conv2d):
                co, k = m.weight.shape[0], m.weight.shape[-1]
                what = f"depthwise {s[1]} {k}×{k}" if m.groups > 1 else f"conv {s[1]}→{co} {k}×{k}"
                fwd = (s[2] - k + 1) * (s[3] - k + 1) * co * (s[1] // m.groups) * k * k
                bwd = fwd * (2 if i > 0 else 1)
            elif isinstance(m, BatchNormAct):
                what = f"batch norm + {m.act}, {s[1]} channels"
            elif isinstance(m, MaxPool2x2):
                what = f"max pool 2×2, {s[1]} channels"
            else:
                what = type(m).__name__
            rows.append({"layer": what + where, "forward_macs": fwd, "backward_macs": bwd})
        return rows

    def _take(self, key: tuple) -> _Buffers:
        free = self._free.setdefault(key, [])
        return free.pop() if free else self._new_buffers(key)

    def _give(self, key: tuple, bufs: _Buffers) -> None:
        self._free.setdefault(key, []).append(bufs)

    def _new_buffers(self, key: tuple) -> _Buffers:
        plan, b = self._plans[key], _Buffers()
        shapes = plan.shapes[1:] + [plan.out_shape]
        for m, shape_in, shape_out in zip(self.leaves, plan.shapes, shapes):
            kernel = isinstance(m, (Conv2d, BatchNormAct, MaxPool2x2))
            b.out.append(torch.empty(shape_out, memory_format=_CL) if kernel else None)
            b.grad.append(torch.empty(shape_in, memory_format=_CL) if kernel else None)
            if isinstance(m, MaxPool2x2):
                b.extra.append(torch.empty(shape_out, dtype=torch.uint8, memory_format=_CL))
            elif isinstance(m, BatchNormAct):
                b.extra.append([None, torch.empty((3, shape_in[1]))])
            else:
                b.extra.append(None)
        # the batch norms' statistics in one tensor, so that their running statistics move in a few calls (_track)
        bns = [i for i, m in enumerate(self.leaves) if isinstance(m, BatchNormAct)]
        b.stats = torch.empty(sum(2 * plan.shapes[i][1] for i in bns), dtype=torch.float64)
        b.unbias = torch.ones_like(b.stats)
        at = 0
        for i in bns:
            n, c, h, w = plan.shapes[i]
            m = n * h * w
            b.extra[i][0] = b.stats[at:at + 2 * c].view(2, c)
            b.unbias[at + c:at + 2 * c] = m / max(m - 1, 1)  # BatchNormAct.track's factor, as a double
            at += 2 * c
        for part, first, end in self.parts:
            if part == "chain":
                b.chains[first] = self._chain_ops(b, plan, first, end)
        return b

    def _chain_ops(self, b: _Buffers, plan: _Plan, first: int, end: int) -> ctypes.Array:
        """The ops of leaves [first, end) over the buffers `b`: all but what a step sets (the chain's input, its
        output's gradient, the weights and their gradients)."""
        ops = (ChainOp * (end - first))()
        for op, i in zip(ops, range(first, end)):
            m, kind = self.leaves[i], self.kinds[i]
            op.n, op.c, op.h, op.w = plan.shapes[i]
            op.out, op.dx = b.out[i].data_ptr(), b.grad[i].data_ptr()
            if i > first:
                op.x = b.out[i - 1].data_ptr()
            if kind == "conv":
                op.kind = CHAIN_KINDS["dwconv" if m.groups > 1 else "conv"]
                op.co, op.k = m.weight.shape[0], m.weight.shape[-1]
            elif kind == "bn":
                stats, coef = b.extra[i]
                op.kind, op.eps, op.act, op.slope = CHAIN_KINDS["bn"], m.eps, ACTIVATIONS[m.act], m.slope
                op.mean, op.var, op.coef = stats[0].data_ptr(), stats[1].data_ptr(), coef.data_ptr()
            else:
                op.kind, op.idx = CHAIN_KINDS["pool"], b.extra[i].data_ptr()
        return ops

    def _point_weights(self, ops: ctypes.Array, first: int) -> list[torch.Tensor]:
        """Point a chain's ops at the weights as they are now; returns the tensors the pointers need kept alive."""
        keep = []
        for op, m in zip(ops, self.leaves[first:]):
            if isinstance(m, Conv2d):
                weight = m.weight.detach().contiguous()  # as kernels._Conv2d: a channels-last weight is copied
                op.weight = weight.data_ptr()
                keep.append(weight)
            elif isinstance(m, BatchNormAct):
                weight, bias = (m.weight, m.bias) if m.affine else (m._unit, m._zero)
                op.weight, op.bias = weight.data_ptr(), bias.data_ptr()
        return keep

    def _chain_check(self, code: int, first: int) -> None:
        if code:
            kind = self.kinds[first + code // 16 - 1]
            _check(code % 16, "convolution kernel" if kind == "conv" else "fused batch norm kernel" if kind == "bn"
                   else "max pool kernel")

    def _track(self, key: tuple, bufs: _Buffers) -> None:
        """Move every batch norm's running statistics toward this batch's, as BatchNormAct.track does one by one
        (the same operations on the same numbers, so the same bits), in a few calls for all of them: the variances
        unbiased in double and every statistic rounded to float in one call each, then one lerp_ per momentum."""
        bns = self._bns
        if not bns:
            return
        momenta = {m.momentum for m in bns}  # read each step: sharpness-aware minimisation sets 0 for its second pass
        if None in momenta or len(momenta) > 1:  # a cumulative average, or mixed momenta: one by one
            for i, m in enumerate(self.leaves):
                if isinstance(m, BatchNormAct):
                    m.track(bufs.extra[i][0], torch.empty(self._plans[key].shapes[i], device="meta"))
            return
        with torch.no_grad():
            torch._foreach_add_([m.num_batches_tracked for m in bns], 1)
            ends = (bufs.stats * bufs.unbias).float().split([m.num_features for m in bns for _ in (0, 1)])
            torch._foreach_lerp_([t for m in bns for t in (m.running_mean, m.running_var)], list(ends),
                                 momenta.pop())

    def _clock(self, ops: ctypes.Array, first: int, direction: str) -> None:
        field_name = "ns_" + direction
        for i, op in enumerate(ops, first):
            self.clock.append((i, direction, getattr(op, field_name) * 1e-9))

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        lib, n_threads = library()[0], threads()
        key = tuple(x.shape)
        bufs = self._take(key)
        inputs: dict = {}  # each chain's input, as the backward pass reads it
        islands: list = [None] * len(self.leaves)  # a parameterless leaf's (input, output) for its own backward
        cur = x
        clock = self.clock
        for part, first, end in self.parts:
            if part == "chain":  # one call of the C library, from a channels-last input into the leaves' buffers
                cur = _cl(cur)
                ops = bufs.chains[first]
                ops[0].x = cur.data_ptr()
                keep = self._point_weights(ops, first)
                self._chain_check(lib.tm_chain_forward(ctypes.addressof(ops), end - first, n_threads), first)
                del keep
                if clock is not None:
                    self._clock(ops, first, "forward")
                inputs[first] = cur
                cur = bufs.out[end - 1]
                continue
            m, kind = self.leaves[first], self.kinds[first]
            if clock is not None:
                t0 = time.perf_counter()
            if kind == "island":
                with torch.enable_grad():
                    src = cur.detach().requires_grad_(True)
                    res = m(src)
                islands[first] = (src, res)
                cur = res.detach()
            else:  # a flatten or a global average pool: PyTorch's op, outside autograd
                cur = m(cur)
            if clock is not None:
                clock.append((first, "forward", time.perf_counter() - t0))
        self._track(key, bufs)
        ctx.program_state = (key, bufs, inputs, islands)
        return cur.clone()  # the caller's own: the next step does not overwrite it

    def backward(self, ctx, grad: torch.Tensor, needs_x: bool) -> tuple:
        lib, n_threads = library()[0], threads()
        key, bufs, inputs, islands = ctx.program_state
        ctx.program_state = None
        grads: dict[int, list[torch.Tensor]] = {}  # id(param) -> its gradients, in the order the pass makes them
        g = grad
        clock = self.clock
        shapes = self._plans[key].shapes
        for part, first, end in reversed(self.parts):
            if part == "chain":
                g = _cl(g)
                ops = bufs.chains[first]
                ops[end - first - 1].g = g.data_ptr()
                keep = self._point_weights(ops, first)
                if first == 0 and self.kinds[0] == "conv":  # the network's input: its gradient only if asked for
                    ops[0].dx = bufs.grad[0].data_ptr() if needs_x else None
                views = self._grad_block(first, end)
                for op, (dweight, dbias) in zip(ops, views):
                    op.dweight = None if dweight is None else dweight.data_ptr()
                    op.dbias = None if dbias is None else dbias.data_ptr()
                self._chain_check(lib.tm_chain_backward(ctypes.addressof(ops), end - first, n_threads), first)
                del keep
                if clock is not None:
                    self._clock(ops, first, "backward")
                for i in range(end - 1, first - 1, -1):  # the order the pass made them: the last leaf's first
                    m, (dweight, dbias) = self.leaves[i], views[i - first]
                    if self.kinds[i] == "conv":
                        grads.setdefault(id(m.weight), []).append(dweight)
                    elif self.kinds[i] == "bn" and m.affine:
                        grads.setdefault(id(m.weight), []).append(dweight)
                        grads.setdefault(id(m.bias), []).append(dbias)
                g = None if ops[0].dx is None else bufs.grad[first]
            else:
                kind = self.kinds[first]
                if clock is not None:
                    t0 = time.perf_counter()
                if kind == "island":
                    src, res = islands[first]
                    (g,) = torch.autograd.grad(res, src, g)
                elif kind == "flatten":
                    g = g.reshape(shapes[first])
                elif kind == "gap":  # the mean's gradient, as autograd writes it: g spread over the map, over its size
                    g = (g / (shapes[first][2] * shapes[first][3])).expand(shapes[first])
                if clock is not None:
                    clock.append((first, "backward", time.perf_counter() - t0))
            if g is None:
                break
        self._give(key, bufs)
        out = []
        for p in self.params:
            parts = grads.get(id(p))
            if not parts:
                out.append(None)
                continue
            total = parts[0]
            for more in parts[1:]:  # as autograd adds a shared leaf's gradients: in the order they arrive
                total = total + more
            out.append(total)
        return (g if needs_x else None, *out)

    def _grad_block(self, first: int, end: int) -> list[tuple]:
        """New memory for the gradients a chain's backward pass writes, in one allocation: per leaf (dweight, dbias),
        views of it shaped as the parameters (None where the leaf has none; a batch norm without affine weights
        still gets the two it writes)."""
        layout = self._grad_layouts.get(first)
        if layout is None:
            shapes = []
            for m in self.leaves[first:end]:
                if isinstance(m, Conv2d):
                    shapes.append((tuple(m.weight.shape), None))
                elif isinstance(m, BatchNormAct):
                    shapes.append(((m.num_features,), (m.num_features,)))
                else:
                    shapes.append((None, None))
            flat_shapes = [s for pair in shapes for s in pair if s is not None]
            layout = self._grad_layouts[first] = (shapes, flat_shapes, [math.prod(s) for s in flat_shapes])
        shapes, flat_shapes, sizes = layout
        flat = torch.empty(sum(sizes))
        parts = iter([v.view(s) for v, s in zip(flat.split(sizes), flat_shapes)])
        return [tuple(None if s is None else next(parts) for s in pair) for pair in shapes]


class _Run(torch.autograd.Function):
    @staticmethod
    def forward(ctx, program: Program, x: torch.Tensor, *params):
        ctx.program = program
        return program.forward(x, ctx)

    @staticmethod
    def backward(ctx, grad):
        return (None, *ctx.program.backward(ctx, grad, ctx.needs_input_grad[1]))


class KernelSequential(nn.Sequential):
    """nn.Sequential (the same children, so the same state_dict keys) that trains as one Program where the
    kernels take its input: float32 CPU tensors in training mode, with autograd on. Otherwise, layer by layer, as
    nn.Sequential."""

    def __init__(self, *args):
        super().__init__(*args)
        leaves = compile_chain(self)
        self._program = Program(leaves) if leaves is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prog = self._program
        if (prog is None or not self.training or not torch.is_grad_enabled() or x.device.type != "cpu"
                or x.dtype != torch.float32 or not prog.plan(x.shape).ok):
            # a training-mode pass without autograd (no backward pass would give its buffers back) runs layer by
            # layer too: the same results
            return super().forward(x)
        return _Run.apply(prog, x, *prog.params)


def swap_sequentials(model: nn.Module) -> int:
    """Replace each outermost nn.Sequential that a Program can train (compile_chain) by a KernelSequential with
    the same children, in place; returns how many. Call it after the kernels' modules are in (use_kernels)."""
    count = 0

    def visit(parent: nn.Module) -> None:
        nonlocal count
        for name, child in list(parent.named_children()):
            if type(child) is nn.Sequential and compile_chain(child) is not None:
                swapped = KernelSequential(*child)
                swapped.train(child.training)
                setattr(parent, name, swapped)
                count += 1
            else:
                visit(child)

    visit(model)
    return count


def programs(model: nn.Module) -> list[Program]:
    """The programs `model` trains on, in module order."""
    return [m._program for m in model.modules() if isinstance(m, KernelSequential) and m._program is not None]


def layer_by_layer(model: nn.Module) -> int:
    """Turn `model`'s programs off, in place: each KernelSequential then runs its kernels layer by layer, as every
    step ran before programs (the same results; for a before/after). Returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, KernelSequential) and m._program is not None:
            m._program = None
            count += 1
    return count
