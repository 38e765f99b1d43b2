import copy

import pytest
import torch

from tinymnist.core.config import TrainConfig
from tinymnist.core.optim import LeanSGD, make_optimizer
from tinymnist.models.model import create_model


def _params(seed=0):
    torch.manual_seed(seed)
    return [p.detach().clone().requires_grad_() for p in create_model("Model_15").parameters()]


def _grads(params, step, skip=()):
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=gen).to(p.dtype)


@pytest.mark.parametrize("kw", [
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
    {"momentum": 0.8, "dampening": 0.1},
    {"momentum": 0.0, "weight_decay": 5e-4},
])
def test_lean_sgd_is_pytorchs_sgd_bit_for_bit(kw):
    ours, theirs = _params(), _params()
    a, b = LeanSGD(ours, lr=0.1, **kw), torch.optim.SGD(theirs, lr=0.1, foreach=True, **kw)
    sched = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20, cycle_momentum=False) for o in (a, b)]
    for step in range(6):
        # a parameter without a gradient skips a step (and starts its momentum late), as in PyTorch
        skip = (3,) if step < 2 else ()
        _grads(ours, step, skip)
        _grads(theirs, step, skip)
        a.step()
        b.step()
        for s in sched:
            s.step()
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, theirs))  # nesterov's in-place gradient too
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == [{**g, "foreach": True} for g in sb["param_groups"]]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        if "momentum_buffer" in sa["state"][k]:
            assert torch.equal(sa["state"][k]["momentum_buffer"], sb["state"][k]["momentum_buffer"])


def test_a_run_moves_between_lean_and_pytorchs_sgd():
    # PyTorch's state continues on ours and ours on PyTorch's: resumed runs from either give the same weights
    ours, theirs = _params(), _params()
    b = torch.optim.SGD(theirs, lr=0.05, momentum=0.9, nesterov=True, foreach=True)
    for step in range(3):
        _grads(theirs, step)
        b.step()
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    a = LeanSGD(ours, lr=0.05, momentum=0.9, nesterov=True)
    a.load_state_dict(copy.deepcopy(b.state_dict()))  # load_state_dict would share the buffers
    for step in range(3, 6):
        _grads(ours, step)
        _grads(theirs, step)
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def test_a_group_the_lean_step_does_not_take_is_pytorchs():
    # maximize is not on the lean path: the group takes PyTorch's own step, with the same result
    ours, theirs = _params(), _params()
    a = LeanSGD(ours, lr=0.1, momentum=0.9, maximize=True)
    b = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, maximize=True, foreach=True)
    for step in range(3):
        _grads(ours, step)
        _grads(theirs, step)
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert all(torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"]) for p, q in zip(ours, theirs))


def test_the_recipes_sgd_is_the_lean_one():
    model = create_model("Model_7")
    opt = make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True))
    assert isinstance(opt, LeanSGD) and opt.param_groups[0]["nesterov"] and opt.param_groups[0]["foreach"]
    assert isinstance(make_optimizer(model, TrainConfig(optimizer="adam", lr=1e-3)), torch.optim.Adam)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_lean_sgd_in_other_dtypes_is_pytorchs(dtype):
    # the momentum multiplies as a number of the parameters' own dtype, as PyTorch's does
    ours, theirs = ([p.to(dtype).detach().requires_grad_() for p in _params()] for _ in range(2))
    a = LeanSGD(ours, lr=0.1, momentum=0.9, nesterov=True)
    b = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, nesterov=True, foreach=True)
    for step in range(4):
        for params in (ours, theirs):
            _grads(params, step)
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
