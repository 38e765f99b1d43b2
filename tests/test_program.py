"""A chain of layers trained as one program (accel/program.py): bit for bit the layer-by-layer step of the same
kernels, for every kind of chain the series builds, and layer by layer wherever a program cannot run."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinymnist.accel.kernels import BatchNormAct, Conv2d, use_kernels
from tinymnist.accel.program import KernelSequential, compile_chain, swap_sequentials
from tinymnist.models.model import create_model

CL = torch.channels_last


def _pair(model: nn.Module):
    """(layer by layer, program): the same network with the same weights, both on the kernels."""
    model = model.to(memory_format=CL).train()
    use_kernels(model)
    prog = copy.deepcopy(model)
    assert swap_sequentials(prog) == 1
    return model, prog


def _steps(model: nn.Module, batches, lr=0.05):
    """SGD steps; each step's logits and gradients, and the state after the last."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    seen = []
    for i, (x, y) in enumerate(batches):
        torch.manual_seed(i)  # a dropout draws the same masks in both
        out = model(x)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(out, y).backward()
        seen.append((out.detach().clone(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return seen, model.state_dict()


def _batches(n=3, size=8, hw=28, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, hw, hw, generator=gen).contiguous(memory_format=CL),
             torch.randint(0, 10, (size,), generator=gen)) for _ in range(n)]


def _assert_same(a, b):
    (seen_a, state_a), (seen_b, state_b) = a, b
    for (out_a, grads_a), (out_b, grads_b) in zip(seen_a, seen_b):
        assert torch.equal(out_a, out_b)
        assert len(grads_a) == len(grads_b) and all(torch.equal(p, q) for p, q in zip(grads_a, grads_b))
    assert state_a.keys() == state_b.keys()  # the same checkpoint names
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)  # weights, running statistics, counters


@pytest.mark.parametrize("name, kwargs", [
    ("Model_15", {}),  # the answer: GELU, depthwise blocks, a max pool, GAP and a 1x1 output
    ("Model_7", {"dropout": 0.1}),  # ReLU, with a dropout after every block (PyTorch's op inside the program)
    ("Model_15", {"layout": "c8 c8r3 P dw c16/1 dw c16/1 G o"}),  # a tied weight: three gradients summed
    ("Model_15", {"layout": "c8 c12 P dw c20/1 G o", "activation": "silu", "bn_affine": False}),
])
def test_a_program_step_is_bit_identical_to_the_layer_by_layer_step(built, name, kwargs):
    torch.manual_seed(0)
    layers, prog = _pair(create_model(name, **kwargs))
    assert isinstance(prog.net, KernelSequential)
    batches = _batches()
    _assert_same(_steps(layers, batches), _steps(prog, batches))


@pytest.mark.parametrize("momenta", ["cumulative", "mixed"])
def test_running_statistics_move_as_layer_by_layer_whatever_the_momenta(built, momenta):
    """A program moves its batch norms' running statistics in a few calls when they share one momentum; a cumulative
    average (momentum None) or mixed momenta take the one-by-one path, with the same bits."""
    torch.manual_seed(0)
    model = create_model("Model_15")
    for j, m in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        m.momentum = None if momenta == "cumulative" else (0.1, 0.3)[j % 2]
    layers, prog = _pair(model)
    batches = _batches()
    _assert_same(_steps(layers, batches), _steps(prog, batches))


def test_two_forward_passes_before_one_backward_keep_their_own_buffers(built):
    """Sharpness-aware minimisation runs a second forward pass while the first one's graph may live; and logits a
    caller keeps are not overwritten by the next step."""
    torch.manual_seed(0)
    layers, prog = _pair(create_model("Model_15"))
    (x1, y1), (x2, y2) = _batches(2)
    grads = []
    for model in (layers, prog):
        out1, out2 = model(x1), model(x2)
        kept = out1.detach().clone()
        (F.cross_entropy(out1, y1) + F.cross_entropy(out2, y2)).backward()
        model(x2).sum().backward()  # one more step on a buffer set given back
        assert torch.equal(out1.detach(), kept)
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_a_program_is_the_same_at_1_2_and_3_threads(built):
    saved = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            _, prog = _pair(create_model("Model_15"))
            runs.append(_steps(prog, _batches(size=32)))
    finally:
        torch.set_num_threads(saved)
    _assert_same(runs[0], runs[1])
    _assert_same(runs[0], runs[2])


def test_a_training_pass_without_autograd_runs_layer_by_layer(built):
    """No backward pass would give a program's buffers back: such a pass runs the layers, with the same logits and
    running statistics, and takes no buffers."""
    from tinymnist.accel.program import programs

    torch.manual_seed(0)
    layers, prog = _pair(create_model("Model_15"))
    x, _ = _batches(1)[0]
    with torch.no_grad():
        assert torch.equal(layers(x), prog(x))
    assert all(torch.equal(a, b) for a, b in zip(layers.state_dict().values(), prog.state_dict().values()))
    assert programs(prog) and all(not p._free for p in programs(prog))


def test_evaluation_and_other_dtypes_run_layer_by_layer(built):
    torch.manual_seed(0)
    layers, prog = _pair(create_model("Model_15"))
    x, _ = _batches(1)[0]
    layers.eval(), prog.eval()
    with torch.no_grad():
        assert torch.equal(layers(x), prog(x))
        assert torch.equal(layers.double()(x.double()), prog.double()(x.double()))


def test_only_chains_a_program_can_run_are_swapped(built):
    # a padded conv stays PyTorch's (the kernels take unpadded ones), and a leaf with parameters of its own cannot
    # hand its gradients out of a program: neither chain is swapped, and nothing inside it changes
    padded = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                           nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Flatten())
    linear = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                           nn.Linear(4 * 26 * 26, 10))
    for chain in (padded, linear):
        use_kernels(chain)
        assert compile_chain(chain) is None
        holder = nn.Module()
        holder.net = chain
        assert swap_sequentials(holder) == 0 and holder.net is chain
    # no kernel module at all: nothing to gain
    assert compile_chain(nn.Sequential(nn.Flatten(), nn.Identity())) is None


def test_a_map_smaller_than_a_kernel_runs_layer_by_layer(built):
    """A shape the kernels do not take goes to PyTorch's layers, as without a program: here their error."""
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    use_kernels(chain)
    prog = KernelSequential(*copy.deepcopy(chain))
    assert isinstance(prog[0], Conv2d) and isinstance(prog[1], BatchNormAct)
    x = torch.randn(2, 1, 8, 8).contiguous(memory_format=CL)
    assert prog._program.plan(x.shape).ok and torch.equal(chain(x), prog(x))
    small = torch.randn(2, 1, 4, 4).contiguous(memory_format=CL)  # the second conv would meet a 2x2 map
    assert not prog._program.plan(small.shape).ok
    for model in (chain, prog):
        with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
            model(small)


def test_a_leaf_that_cannot_run_without_data_sends_the_chain_layer_by_layer(built):
    """The program works out each leaf's output shape on a meta tensor; a parameterless leaf of a user's that reads
    its input's values cannot run there, and the chain then runs layer by layer, as it would without a program."""

    class Clip(nn.Module):
        def forward(self, x):
            return x.clamp(max=float(x.detach().max()))  # reads a value

    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), Clip(), nn.Flatten())
    use_kernels(chain)
    prog = KernelSequential(*copy.deepcopy(chain))
    x = torch.randn(2, 1, 6, 6).contiguous(memory_format=CL)
    assert not prog._program.plan(x.shape).ok
    assert torch.equal(chain(x), prog(x))


SKIPS = "c8 dw c12/1 dw c12/1 +2 P dw c28/1 dw c28/1 +2 dw c28/1 +2 G o"  # the layout token +N (model.Skip)


def test_a_network_with_skip_connections_trains_on_programs_bit_for_bit(built):
    """A skip connection is not a kernel: the chains around it and inside it each become a program, and the step is
    bit for bit the layer-by-layer step; each skip's body is one of the programs."""
    from tinymnist.models.model import Skip

    torch.manual_seed(0)
    model = create_model("Model_15", layout=SKIPS, activation="gelu").to(memory_format=CL).train()
    use_kernels(model)
    prog = copy.deepcopy(model)
    assert swap_sequentials(prog) > 1
    skips = [m for m in prog.modules() if isinstance(m, Skip)]
    assert len(skips) == 3 and all(isinstance(s.body, KernelSequential) for s in skips)
    batches = _batches()
    _assert_same(_steps(model, batches), _steps(prog, batches))


def test_a_network_with_skip_connections_steps_the_same_at_any_thread_count(built):
    """The crop and the add are elementwise, so with them on PyTorch's ops and the rest on the kernels a step does
    not depend on the thread count."""
    from tinymnist.core.plan import build_for
    from tinymnist.core.config import TrainConfig

    cfg = TrainConfig(model="Model_15", layout=SKIPS, activation="gelu", memory_format="channels_last",
                      kernels="fused")
    results, was = [], torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            results.append(_steps(build_for(cfg, torch.device("cpu")).train(), _batches()))
    finally:
        torch.set_num_threads(was)
    _assert_same(results[0], results[1])
    _assert_same(results[0], results[2])
