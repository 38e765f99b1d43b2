"""Per-layer model summary: output shape, parameters, receptive field, jump and MACs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Layer:
    """One leaf module as it ran on a sample input."""

    name: str  # dotted module path, e.g. net.0.0
    kind: str  # class name, e.g. Conv2d
    shape: tuple  # output shape without the batch dimension
    params: int
    rf: int  # receptive field on the input, in pixels (one side)
    jump: int  # input pixels between adjacent output positions
    macs: int  # multiply-accumulates for one image


@dataclass(frozen=True)
class Summary:
    layers: list[Layer]
    total_params: int
    trainable_params: int

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def rf(self) -> int:
        return self.layers[-1].rf if self.layers else 1


def _pair(v) -> int:
    """Square kernels only: the first element of an int-or-tuple attribute."""
    return v[0] if isinstance(v, tuple) else int(v)


def summarize(model: nn.Module, input_shape: tuple = (1, 28, 28)) -> Summary:
    """Run one zero image through `model` and record every leaf module in execution order."""
    layers: list[Layer] = []
    state = {"rf": 1, "jump": 1, "size": input_shape[-1]}

    def hook(name: str):
        def fn(module: nn.Module, inputs, output):
            rf, jump, size = state["rf"], state["jump"], state["size"]
            macs = 0
            if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                k, s = _pair(module.kernel_size), _pair(module.stride)
                d = _pair(getattr(module, "dilation", 1))
                rf, jump = rf + (k - 1) * d * jump, jump * s
                if isinstance(module, nn.Conv2d):
                    macs = output[0].numel() * (module.in_channels // module.groups) * k * k
            elif isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Linear)):
                rf += (size - 1) * jump  # pools (or a dense layer reads) the whole remaining map
                if isinstance(module, nn.Linear):
                    macs = module.in_features * module.out_features
            if output.dim() == 4:
                size = output.shape[-1]
            elif isinstance(module, nn.Linear):
                size = 1
            state.update(rf=rf, jump=jump, size=size)
            params = sum(p.numel() for p in module.parameters(recurse=False))
            layers.append(Layer(name, module.__class__.__name__, tuple(output.shape[1:]), params, rf, jump, macs))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if not list(m.children())]
    was_training = model.training
    device = next(model.parameters()).device
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
    return Summary(layers, total, trainable)


def format_summary(s: Summary, title: str = "") -> str:
    """The summary as a fixed-width text table."""
    head = f"{'Layer (type)':<24}{'Output shape':>18}{'Param #':>10}{'RF':>6}{'Jump':>6}{'MACs':>12}"
    rule = "=" * len(head)
    lines = [title] if title else []
    lines += [rule, head, rule]
    for i, layer in enumerate(s.layers, 1):
        shape = "[" + ", ".join(str(d) for d in layer.shape) + "]"
        lines.append(f"{f'{layer.kind}-{i}':<24}{shape:>18}{layer.params:>10,}{layer.rf:>6}{layer.jump:>6}"
                     f"{layer.macs:>12,}")
    lines += [rule,
              f"Total params: {s.total_params:,}",
              f"Trainable params: {s.trainable_params:,}",
              f"Non-trainable params: {s.total_params - s.trainable_params:,}",
              f"MACs per image: {s.macs:,}",
              f"Receptive field at the output: {s.rf}x{s.rf}",
              rule]
    return "\n".join(lines)
