"""Per-layer model summary: output shape, parameters, receptive field, jump and MACs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class Layer:
    """One leaf module as it ran on a sample input."""

    name: str  # dotted module path, e.g. net.0.0
    kind: str  # class name, e.g. Conv2d
    shape: tuple  # output shape without the batch dimension
    params: int
    rf: Optional[int]  # receptive field on the input, in pixels (one side); None where it cannot be followed
    jump: Optional[int]  # input pixels between adjacent output positions; None where it cannot be followed
    macs: int  # multiply-accumulates for one image
    dense: bool = False  # every output sees the whole input (a Linear layer, or anything after one)


@dataclass(frozen=True)
class Summary:
    layers: list[Layer]
    total_params: int
    trainable_params: int
    input_size: int = 28
    lost_at: Optional[str] = None  # the first layer whose input map changed size outside any module

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def rf(self) -> Optional[int]:
        return self.layers[-1].rf if self.layers else 1

    @property
    def rf_cell(self) -> str:
        """The receptive field in a table cell, saying what rf_text says: "20×20", "all 28×28" after a Linear layer
        (it sees every pixel), or "not followed" where the map changed size outside a module."""
        if not self.layers:
            return "1×1"
        last = self.layers[-1]
        if last.dense:
            return f"all {self.input_size}×{self.input_size} (Linear)"
        return "not followed" if last.rf is None else f"{last.rf}×{last.rf}"

    @property
    def rf_text(self) -> str:
        """The receptive field at the output, in words where a number would mislead."""
        if not self.layers:
            return "1x1"
        last = self.layers[-1]
        if last.dense:
            return f"the whole {self.input_size}x{self.input_size} input (a Linear layer sees every pixel)"
        if last.rf is None:
            return (f"not followed past {self.lost_at} (the map changed size outside a module, e.g. a functional "
                    "pool in forward)")
        return f"{last.rf}x{last.rf}"


def _pair(v) -> int:
    """Square kernels only: the first element of an int-or-tuple attribute."""
    return v[0] if isinstance(v, tuple) else int(v)


def summarize(model: nn.Module, input_shape: tuple = (1, 28, 28)) -> Summary:
    """Run one zero image through `model` and record every leaf module in the order it runs (forward hooks), with
    the receptive field followed through convolutions and pools. Where a layer's input map has a size that no
    module made (a functional op in forward), the receptive field is no longer followed; after a Linear layer every
    output sees the whole input."""
    layers: list[Layer] = []
    seen: set[int] = set()
    state: dict = {"rf": 1, "jump": 1, "size": input_shape[-1], "dense": False, "lost": None}

    def pre(name: str):
        def fn(module: nn.Module, inputs) -> None:
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            if (x is not None and x.dim() == 4 and state["rf"] is not None and not state["dense"]
                    and x.shape[-1] != state["size"]):
                state.update(rf=None, jump=None, lost=state["lost"] or f"{module.__class__.__name__} ({name})")
        return fn

    def hook(name: str):
        def fn(module: nn.Module, inputs, output):
            rf, jump, size = state["rf"], state["jump"], state["size"]
            macs = 0
            if isinstance(module, nn.Conv2d):
                macs = output[0].numel() * (module.in_channels // module.groups) * _pair(module.kernel_size) ** 2
            elif isinstance(module, nn.Linear):
                macs = module.in_features * module.out_features
                state["dense"] = True
            if rf is not None and not state["dense"]:
                if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                    k, s = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
                    d = _pair(getattr(module, "dilation", 1))
                    rf, jump = rf + (k - 1) * d * jump, jump * s
                elif isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                    rf += (size - 1) * jump  # pools the whole remaining map
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                size = output.shape[-1]
            state.update(rf=rf, jump=jump, size=size)
            own = [p for p in module.parameters(recurse=False) if id(p) not in seen]  # a tied weight counts once
            seen.update(id(p) for p in own)
            params = sum(p.numel() for p in own)
            shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else ()
            dense = state["dense"]
            layers.append(Layer(name, module.__class__.__name__, shape, params, None if dense else rf,
                                None if dense else jump, macs, dense))
        return fn

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    handles = [m.register_forward_pre_hook(pre(n)) for n, m in leaves]
    handles += [m.register_forward_hook(hook(n)) for n, m in leaves]
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Summary(layers, total, trainable, input_shape[-1], state["lost"])


def format_summary(s: Summary, title: str = "") -> str:
    """The summary as a fixed-width text table."""
    head = f"{'Layer (type)':<24}{'Output shape':>18}{'Param #':>10}{'RF':>6}{'Jump':>6}{'MACs':>12}"
    rule = "=" * len(head)
    lines = [title] if title else []
    lines += [rule, head, rule]
    for i, layer in enumerate(s.layers, 1):
        shape = "[" + ", ".join(str(d) for d in layer.shape) + "]"
        rf = "all" if layer.dense else ("?" if layer.rf is None else str(layer.rf))
        jump = "-" if layer.dense else ("?" if layer.jump is None else str(layer.jump))
        lines.append(f"{f'{layer.kind}-{i}':<24}{shape:>18}{layer.params:>10,}{rf:>6}{jump:>6}{layer.macs:>12,}")
    lines += [rule,
              f"Total params: {s.total_params:,}",
              f"Trainable params: {s.trainable_params:,}",
              f"Non-trainable params: {s.total_params - s.trainable_params:,}",
              f"MACs per image: {s.macs:,}",
              f"Receptive field at the output: {s.rf_text}",
              rule]
    return "\n".join(lines)
