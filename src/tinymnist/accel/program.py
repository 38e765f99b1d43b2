"""A chain of layers trained as one program: the whole forward pass on the C kernels in one autograd node, and the
whole backward pass in one, with the activations in buffers kept from step to step.

Why: at batch 32 a training step of the answer (Model_15) is about 40 kernel calls of tens to hundreds of
microseconds each, and around each PyTorch added an autograd node, a ctypes call with its argument checks, new
output tensors, layout checks on every input and gradient, and the batch-norm running statistics as separate small
ops. A profile of that step (torch.profiler, 1 thread, AMD EPYC AVX-512) put the forward pass at twice the time of
its kernels. A program walks the chain once per step with plain Python calls into the same kernels, on buffers it
allocated for this batch shape the first time it met it.

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

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .kernels import ACTIVATIONS, BatchNormAct, Conv2d, MaxPool2x2, _check, library, threads

_CL = torch.channels_last


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
    each op's input gradient in the backward pass."""

    out: list = field(default_factory=list)
    extra: list = field(default_factory=list)  # a pool's winners; a batch norm's [mean; var] and coefficients
    grad: list = field(default_factory=list)


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
    """The training step of one chain of leaves (compile_chain), forward and backward, on the C kernels."""

    def __init__(self, leaves: list[nn.Module]):
        self.leaves = leaves
        self.params: list[nn.Parameter] = []
        for m in leaves:
            for p in m.parameters(recurse=False):
                if all(p is not q for q in self.params):  # a tied weight is one input, its gradients summed
                    self.params.append(p)
        self.kinds = [_kind(m) for m in leaves]
        self._plans: dict[tuple, _Plan] = {}
        self._free: dict[tuple, list[_Buffers]] = {}
        # a list to time each leaf into ((leaf index, "forward" or "backward", seconds) per call), else None: what
        # `tinymnist bench --layers` reads; off, it costs one test per leaf
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
                c = shape_in[1]
                b.extra.append((torch.empty((2, c), dtype=torch.float64), torch.empty((3, c))))
            else:
                b.extra.append(None)
        return b

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        lib, n_threads = library()[0], threads()
        key = tuple(x.shape)
        bufs = self._take(key)
        inputs: list = []  # each leaf's input, as the backward pass needs it
        islands: list = []  # a parameterless leaf's (input that requires grad, output) for its own backward
        cur = x
        clock = self.clock
        for i, (m, kind) in enumerate(zip(self.leaves, self.kinds)):
            if clock is not None:
                t0 = time.perf_counter()
            if kind in ("conv", "bn", "pool"):  # a C kernel, from a channels-last input into this leaf's buffer
                cur = _cl(cur)
                n, c, h, w = cur.shape
                out = bufs.out[i]
                if kind == "conv":
                    weight = m.weight.detach().contiguous()  # as kernels._Conv2d: a channels-last weight is copied
                    fn = lib.tm_dwconv_forward if m.groups > 1 else lib.tm_conv_forward
                    _check(fn(cur.data_ptr(), n, h, w, c, weight.data_ptr(), weight.shape[0], weight.shape[-1],
                              out.data_ptr(), n_threads), "convolution kernel")
                elif kind == "bn":
                    weight, bias = (m.weight, m.bias) if m.affine else (m._unit, m._zero)
                    stats, coef = bufs.extra[i]
                    _check(lib.tm_bn_act_forward(cur.data_ptr(), n * h * w, c, weight.data_ptr(), bias.data_ptr(),
                                                 m.eps, ACTIVATIONS[m.act], m.slope, out.data_ptr(),
                                                 stats[0].data_ptr(), stats[1].data_ptr(), coef.data_ptr(),
                                                 n_threads))
                    m.track(stats, cur)
                else:
                    lib.tm_maxpool2_forward(cur.data_ptr(), n, h, w, c, out.data_ptr(), bufs.extra[i].data_ptr(),
                                            n_threads)
                inputs.append(None if kind == "pool" else cur)  # a pool's backward needs only its indices
                islands.append(None)
                cur = out
            elif kind == "island":
                with torch.enable_grad():
                    src = cur.detach().requires_grad_(True)
                    res = m(src)
                inputs.append(None)
                islands.append((src, res))
                cur = res.detach()
            else:  # a flatten or a global average pool: PyTorch's op, outside autograd
                inputs.append(None)
                islands.append(None)
                cur = m(cur)
            if clock is not None:
                clock.append((i, "forward", time.perf_counter() - t0))
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
        for i in range(len(self.leaves) - 1, -1, -1):
            m, kind = self.leaves[i], self.kinds[i]
            want_dx = i > 0 or needs_x
            if clock is not None:
                t0 = time.perf_counter()
            if kind == "conv":
                g = _cl(g)
                x = inputs[i]
                n, ci, h, w = x.shape
                weight = m.weight.detach().contiguous()
                co, k = weight.shape[0], weight.shape[-1]
                dx = bufs.grad[i] if want_dx else None
                dweight = torch.empty_like(weight)
                fn = lib.tm_dwconv_backward if m.groups > 1 else lib.tm_conv_backward
                _check(fn(x.data_ptr(), n, h, w, ci, weight.data_ptr(), co, k, g.data_ptr(),
                          None if dx is None else dx.data_ptr(), dweight.data_ptr(), n_threads),
                       "convolution kernel")
                grads.setdefault(id(m.weight), []).append(dweight)
                g = dx
            elif kind == "bn":
                g = _cl(g)
                x = inputs[i]
                n, c, h, w = x.shape
                stats, coef = bufs.extra[i]
                dx, dweight, dbias = bufs.grad[i], x.new_empty(c), x.new_empty(c)
                _check(lib.tm_bn_act_backward(g.data_ptr(), bufs.out[i].data_ptr(), x.data_ptr(), n * h * w, c,
                                              stats[0].data_ptr(), coef.data_ptr(), ACTIVATIONS[m.act], m.slope,
                                              dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(), n_threads))
                if m.affine:
                    grads.setdefault(id(m.weight), []).append(dweight)
                    grads.setdefault(id(m.bias), []).append(dbias)
                g = dx
            elif kind == "pool":
                g = _cl(g)
                dx = bufs.grad[i]
                n, c, h, w = dx.shape
                lib.tm_maxpool2_backward(g.data_ptr(), bufs.extra[i].data_ptr(), n, h, w, c, dx.data_ptr(),
                                         n_threads)
                g = dx
            elif kind == "island":
                src, res = islands[i]
                (g,) = torch.autograd.grad(res, src, g)
            elif kind == "flatten":
                g = g.reshape(shapes[i])
            elif kind == "gap":  # the mean's gradient, as autograd writes it: g spread over the map, over its size
                g = (g / (shapes[i][2] * shapes[i][3])).expand(shapes[i])
            if clock is not None:
                clock.append((i, "backward", time.perf_counter() - t0))
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
    kernels take its input: float32 CPU tensors in training mode. Otherwise, layer by layer, as nn.Sequential."""

    def __init__(self, *args):
        super().__init__(*args)
        leaves = compile_chain(self)
        self._program = Program(leaves) if leaves is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prog = self._program
        if (prog is None or not self.training or x.device.type != "cpu" or x.dtype != torch.float32
                or not prog.plan(x.shape).ok):
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
