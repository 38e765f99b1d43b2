"""The fused batch norm + activation kernels: PyTorch's results, thread-count independence, checkpoints, and the rules
that choose them (and refuse them) on a machine."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinymnist.accel import kernels
from tinymnist.errors import TinyMnistError
from tinymnist.accel.kernels import BatchNormAct, fuse_bn_act, resolve_kernels, use_kernels

CPU = torch.device("cpu")
CL = torch.channels_last


def _pair(channels: int, momentum=0.1):
    torch.manual_seed(channels)
    ref = nn.BatchNorm2d(channels, momentum=momentum)
    with torch.no_grad():  # not the identity init, so the affine part is tested too
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    fused = BatchNormAct(channels, momentum=momentum)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


# C: 1 and 16 (unit 32), 10 (40), 3 and 12 (48), 14 (56), 33 (a runtime unit of 264); the shapes with an odd number
# of rows (3 * 5 * 7) leave a tail after the last whole unit
@pytest.mark.parametrize("shape", [(8, 16, 6, 6), (4, 10, 12, 12), (3, 12, 5, 7), (3, 1, 5, 7), (2, 3, 9, 9),
                                   (2, 14, 4, 4), (3, 33, 5, 7)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_matches_pytorch_outputs_gradients_and_running_statistics(built, shape, momentum):
    ref, fused = _pair(shape[1], momentum)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # two steps: the running statistics compound
        x = (torch.randn(shape, generator=gen) * 2 + 0.7).contiguous(memory_format=CL)
        g = torch.randn(shape, generator=gen)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref, out = F.relu(ref(xa)), fused(xb)
        out_ref.backward(g)
        out.backward(g)
        assert out.is_contiguous(memory_format=CL)
        assert torch.allclose(out, out_ref, atol=1e-5)
        assert torch.allclose(xb.grad, xa.grad, atol=1e-5)
        assert torch.allclose(fused.weight.grad, ref.weight.grad, atol=1e-4)
        assert torch.allclose(fused.bias.grad, ref.bias.grad, atol=1e-4)
    assert torch.allclose(fused.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(fused.running_var, ref.running_var, atol=1e-5)
    assert int(fused.num_batches_tracked) == int(ref.num_batches_tracked) == 2


def test_fused_results_do_not_depend_on_the_thread_count(built):
    # 128 x 16 x 24 x 24 is above the kernels' serial threshold, so 2 and 3 threads really split the work
    x = torch.randn(128, 16, 24, 24, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=CL)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            _, fused = _pair(16)
            xg = x.clone().requires_grad_()
            out = fused(xg)
            out.backward(g)
            results.append((out.detach(), xg.grad, fused.weight.grad, fused.running_var.clone()))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_fusing_keeps_checkpoint_names_values_and_evaluation(built):
    from tinymnist.models.model import create_model

    plain = create_model("Model_7").to(memory_format=CL)
    fused = copy.deepcopy(plain)
    assert use_kernels(fused) == 14  # its 7 convolutions, the 6 batch norms of its conv blocks, its max pool
    assert not any(type(m) is nn.ReLU for m in fused.modules())
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), plain.state_dict().values()))
    x = torch.randn(16, 1, 28, 28).contiguous(memory_format=CL)
    assert torch.equal(fused.eval()(x), plain.eval()(x))  # evaluation is PyTorch's batch norm either way
    fresh = create_model("Model_7")
    fresh.load_state_dict(fused.state_dict())  # a fused run's checkpoint loads into the plain model


def test_a_fused_training_step_equals_the_native_one(built):
    from tinymnist.core.engine import make_optimizer
    from tinymnist.lab.series import get_step

    cfg = get_step("final").config
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=CL)
    y = torch.arange(64) % 10
    params = []
    for fuse in (False, True):
        torch.manual_seed(0)
        model = cfg.build_model().to(memory_format=CL)
        if fuse:
            use_kernels(model)
        opt = make_optimizer(model, cfg)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        params.append([t.detach().clone() for t in model.state_dict().values() if t.is_floating_point()])
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*params))


def test_auto_picks_fused_only_where_it_applies(built):
    assert resolve_kernels("auto", CPU, "fp32", "channels_last") == "fused"
    assert resolve_kernels("auto", CPU, "bf16", "channels_last") == "native"
    assert resolve_kernels("auto", CPU, "fp32", "contiguous") == "native"
    assert resolve_kernels("auto", torch.device("cuda"), "fp32", "channels_last") == "native"
    assert resolve_kernels("native", CPU, "fp32", "channels_last") == "native"
    with pytest.raises(TinyMnistError, match="need a CPU, fp32 and channels_last"):
        resolve_kernels("fused", CPU, "fp32", "contiguous")
    with pytest.raises(TinyMnistError, match="unknown kernels"):
        resolve_kernels("cuda", CPU, "fp32", "channels_last")


def test_unbuildable_kernels_fall_back_with_one_line_or_refuse(monkeypatch):
    monkeypatch.setattr(kernels, "library", lambda: (None, "no C compiler found (set CC, or install gcc)"))
    notes = []
    assert resolve_kernels("auto", CPU, "fp32", "channels_last", note=notes.append) == "native"
    assert len(notes) == 1 and "no C compiler" in notes[0] and "\n" not in notes[0]
    with pytest.raises(TinyMnistError, match="fused kernels unavailable: no C compiler"):
        resolve_kernels("fused", CPU, "fp32", "channels_last")


def test_a_failing_compiler_is_a_reason_and_leaves_no_file(tmp_path):
    # in a fresh process, so this process's cached library stays as it is
    code = "from tinymnist.accel import kernels; print(kernels.library()[1])"
    env = {**os.environ, "CC": "false", "TINYMNIST_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "could not build kernels.c" in out.stdout
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # the atomic build leaves nothing behind


def test_cc_may_carry_a_wrapper_and_flags(built, tmp_path):
    # CC is a command line ("ccache gcc", "gcc -m64"): the whole of it compiles, not just its first word
    code = "from tinymnist.accel import kernels; lib, why = kernels.library(); print(lib is not None, why)"
    env = {**os.environ, "CC": "env LC_ALL=C cc", "TINYMNIST_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("True"), out.stdout
    assert len(list(tmp_path.rglob("kernels-*.so"))) == 1


def test_configs_saved_before_kernels_existed_mean_native():
    import json
    from pathlib import Path

    from tinymnist.core.config import TrainConfig

    saved = json.loads((Path(__file__).resolve().parent / "data" / "legacy" / "config-before-kernels.json").read_text())
    assert "kernels" not in saved["config"] and saved["config"]["memory_format"] == "channels_last"
    assert TrainConfig.from_dict(saved["config"]).kernels == "native"
    assert TrainConfig().kernels == "auto"
    with pytest.raises(TinyMnistError, match="unknown kernels"):
        TrainConfig(kernels="fast").validate()


@pytest.mark.parametrize("shape", [(4, 16, 24, 24), (3, 10, 7, 9), (2, 3, 5, 5), (2, 12, 22, 22), (2, 8, 6, 6),
                                   (1, 20, 4, 6)])  # odd sizes drop a row/column; 10, 12, 20: groups of 8 overlap
def test_the_max_pool_kernel_is_bit_identical_to_pytorchs_with_ties_and_nan(built, shape):
    from tinymnist.accel.kernels import MaxPool2x2

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x[:, :, ::3, ::2] = 0.5  # ties inside windows: the first maximum wins in both
    x[0, 0, 0, 0] = float("nan")  # NaN propagates in both, first in its window or not
    x[0, -1, 1, 1] = float("nan")
    x[-1, shape[1] // 2, 0, 1] = float("nan")
    x = x.contiguous(memory_format=CL)
    g = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, generator=torch.Generator().manual_seed(1))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = F.max_pool2d(a, 2), MaxPool2x2().train()(b)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya.nan_to_num(), yb.nan_to_num()) and torch.equal(ya.isnan(), yb.isnan())
    assert yb[0, 0, 0, 0].isnan() and yb[0, -1, 0, 0].isnan()
    assert torch.equal(a.grad, b.grad) and b.grad.is_contiguous(memory_format=CL)


def test_use_kernels_swaps_only_what_it_can_run():
    from tinymnist.accel.kernels import MaxPool2x2, use_kernels

    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.1), nn.ReLU(),  # not adjacent
                          nn.MaxPool2d(3), nn.MaxPool2d(2, ceil_mode=True),
                          nn.Conv2d(8, 8, 3, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                          nn.Conv2d(8, 8, 3, stride=2, bias=False), nn.Conv2d(8, 8, 3, groups=8, bias=False),
                          nn.Conv2d(8, 16, 3, groups=8, bias=False), nn.Conv2d(8, 8, 3, groups=2, bias=False))
    before, depthwise = model[10].weight, model[13].weight
    assert use_kernels(model) == 4
    kinds = [type(m).__module__.split(".")[0] + "." + type(m).__name__ for m in model]
    assert kinds == ["torch.Conv2d", "tinymnist.BatchNormAct", "torch.Identity", "tinymnist.MaxPool2x2",
                     "torch.Conv2d", "torch.BatchNorm2d", "torch.Dropout", "torch.ReLU", "torch.MaxPool2d",
                     "torch.MaxPool2d", "tinymnist.Conv2d", "torch.Conv2d", "torch.Conv2d", "tinymnist.Conv2d",
                     "torch.Conv2d", "torch.Conv2d"]  # a depthwise conv is swapped; a multiplier of 2, or 2 groups, not
    assert isinstance(model[3], MaxPool2x2)
    assert model[10].weight is before and model[13].weight is depthwise  # the optimizer may already hold them
    assert model[13].groups == 8


def _conv_case(n, ci, h, w, co, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=gen).contiguous(memory_format=CL)
    weight = torch.randn(co, ci, k, k, generator=gen) / (ci * k * k) ** 0.5
    g = torch.randn(n, co, h - k + 1, w - k + 1, generator=gen).contiguous(memory_format=CL)
    return x, weight, g


# Model_7's shapes, channel counts that are not multiples of 8, a 1x1 and a 5x5 kernel, a non-square map, and
# outputs of one pixel and of fewer pixels than a register tile
@pytest.mark.parametrize("case", [(4, 8, 26, 26, 16, 3), (3, 1, 28, 28, 8, 3), (5, 16, 12, 12, 10, 1),
                                  (2, 10, 12, 12, 16, 3), (2, 3, 9, 7, 26, 3), (2, 5, 11, 11, 20, 5),
                                  (3, 16, 3, 3, 16, 3), (2, 7, 4, 6, 3, 2), (4, 8, 26, 26, 12, 3),
                                  (3, 12, 24, 24, 12, 3), (2, 13, 20, 25, 13, 3)])
def test_the_convolution_kernel_matches_pytorch_in_both_directions(built, case):
    from tinymnist.accel.kernels import Conv2d

    x, weight, g = _conv_case(*case)
    conv = Conv2d(case[1], case[4], case[5], bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight)
    xa = x.clone().requires_grad_()
    out = conv(xa)
    out.backward(g)
    xd, wd = x.double().requires_grad_(), weight.double().requires_grad_()
    ref = F.conv2d(xd, wd)
    ref.backward(g.double())
    assert out.shape == ref.shape and out.is_contiguous(memory_format=CL)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(xa.grad.double(), xd.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(conv.weight.grad.double(), wd.grad, atol=1e-4, rtol=1e-5)


# Model_11's depthwise shapes (10 and 32 channels), channel counts under and between multiples of 8, a 5x5 and a
# 1x1 filter, a non-square map, one output pixel, and a batch below the serial threshold and one above it
@pytest.mark.parametrize("case", [(4, 10, 12, 12, 3), (3, 32, 10, 10, 3), (2, 3, 9, 7, 3), (2, 13, 11, 11, 5),
                                  (3, 16, 3, 3, 3), (2, 7, 4, 6, 1), (64, 32, 8, 8, 3)])
def test_the_depthwise_kernel_matches_pytorch_in_both_directions(built, case):
    from tinymnist.accel.kernels import Conv2d, use_kernels

    n, c, h, w, k = case
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=CL)
    weight = torch.randn(c, 1, k, k, generator=gen) / k
    g = torch.randn(n, c, h - k + 1, w - k + 1, generator=gen).contiguous(memory_format=CL)
    model = nn.Sequential(nn.Conv2d(c, c, k, groups=c, bias=False))
    assert use_kernels(model) == 1 and isinstance(model[0], Conv2d)
    with torch.no_grad():
        model[0].weight.copy_(weight)
    xa = x.clone().requires_grad_()
    out = model(xa)
    out.backward(g)
    xd, wd = x.double().requires_grad_(), weight.double().requires_grad_()
    ref = F.conv2d(xd, wd, groups=c)
    ref.backward(g.double())
    assert out.shape == ref.shape and out.is_contiguous(memory_format=CL)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(xa.grad.double(), xd.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(model[0].weight.grad.double(), wd.grad, atol=1e-4, rtol=1e-5)
    model.eval()
    assert torch.equal(model(x), F.conv2d(x, model[0].weight, groups=c))  # evaluation is PyTorch's op


def test_depthwise_results_do_not_depend_on_the_thread_count(built):
    from tinymnist.accel.kernels import use_kernels

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(128, 32, 10, 10, generator=gen).contiguous(memory_format=CL)  # above the serial threshold
    g = torch.randn(128, 32, 8, 8, generator=gen).contiguous(memory_format=CL)
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(32, 32, 3, groups=32, bias=False))
            use_kernels(model)
            xg = x.clone().requires_grad_()
            out = model(xg)
            out.backward(g)
            results.append((out.detach(), xg.grad, model[0].weight.grad))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# the answer's front (12 channels on 26x26 and 24x24 maps: 16 pixels and a tail of 8, and of 6), each count of 9 to
# 15 channels (a last channel group of one to six, halves of the tail above 12), rows of 8 to 17 pixels, a 1x1 and a
# 5x5 kernel, into 3 to 13 input channels
@pytest.mark.parametrize("ci, co, hw, k", [(8, 12, 26, 3), (12, 12, 24, 3)] + [
    (ci, co, hw, 3) for co in range(9, 16) for ci, hw in ((3, 10), (12, 13), (5, 19))] + [
    (12, 10, 9, 1), (13, 11, 20, 5)])
def test_pixel_tiles_give_the_channel_tiles_bits(built, ci, co, hw, k):
    # a row of 9 to 15 channels runs with 8 pixels in a vector; its sums are the same operations in the same
    # order as the channel tiles', so each output, input gradient and weight gradient is the same bit for bit
    from tinymnist.accel.kernels import _ptr, library

    lib = library()[0]
    x, weight, g = _conv_case(3, ci, hw, hw, co, k, seed=co)
    x[0, 0, 0, :3] = 0.0  # zero products: the sign of a zero sum too
    w = weight.contiguous()
    got = []
    try:
        for pixels in (1, 0):
            lib.tm_set_pixel_tiles(pixels)
            for threads in (1, 2, 3):
                y = torch.empty_like(g)
                dx, dw = torch.empty_like(x), torch.empty_like(w)
                assert lib.tm_conv_forward(_ptr(x), 3, hw, hw, ci, _ptr(w), co, k, _ptr(y), threads) == 0
                assert lib.tm_conv_backward(_ptr(x), 3, hw, hw, ci, _ptr(w), co, k, _ptr(g), _ptr(dx), _ptr(dw),
                                            threads) == 0
                got.append((y, dx, dw))
    finally:
        lib.tm_set_pixel_tiles(1)
    for other in got[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got[0], other))
    assert torch.allclose(got[0][0].double(), F.conv2d(x.double(), w.double()), atol=1e-5)


def test_the_convolution_kernel_skips_dx_when_the_input_needs_no_gradient(built):
    from tinymnist.accel.kernels import Conv2d

    x, weight, g = _conv_case(3, 1, 10, 10, 8, 3)
    conv = Conv2d(1, 8, 3, bias=False)
    conv(x).backward(g)  # x does not require a gradient: only dw
    assert x.grad is None
    assert torch.allclose(conv.weight.grad, torch.nn.grad.conv2d_weight(x, conv.weight.shape, g), atol=1e-4)


def test_convolution_results_do_not_depend_on_the_thread_count(built):
    from tinymnist.accel.kernels import Conv2d

    x, weight, g = _conv_case(128, 8, 26, 26, 16, 3)  # Model_7's widest layer: above the serial threshold
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            conv = Conv2d(8, 16, 3, bias=False)
            with torch.no_grad():
                conv.weight.copy_(weight)
            xg = x.clone().requires_grad_()
            out = conv(xg)
            out.backward(g)
            results.append((out.detach(), xg.grad, conv.weight.grad))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_the_convolution_evaluates_with_pytorchs_op(built):
    from tinymnist.accel.kernels import Conv2d

    conv = Conv2d(8, 16, 3, bias=False).eval()
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=CL)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight))


def _conv_step(threads: int):
    from tinymnist.accel.kernels import Conv2d

    torch.set_num_threads(threads)
    x, weight, g = _conv_case(128, 8, 26, 26, 16, 3, seed=3)
    conv = Conv2d(8, 16, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight)
    conv(x).backward(g)
    return conv.weight.grad


def _in_forked_child(queue):
    # PyTorch's own OpenMP threads do not survive a fork (GNU libgomp hangs in a forked child whose parent used
    # them), so the child keeps PyTorch to one thread and calls the kernel library with two directly
    import ctypes

    torch.set_num_threads(1)
    x, weight, g = _conv_case(128, 8, 26, 26, 16, 3, seed=3)
    dw = torch.empty_like(weight)
    p = lambda t: ctypes.c_void_p(t.data_ptr())
    lib = kernels.library()[0]
    code = lib.tm_conv_backward(p(x), 128, 26, 26, 8, p(weight), 16, 3, p(g), None, p(dw), 2)
    queue.put((code, dw.sum().item()))


def test_the_kernel_threads_survive_fewer_threads_more_threads_and_a_fork(built):
    import multiprocessing

    before = torch.get_num_threads()
    try:
        grads = [_conv_step(t) for t in (3, 2, 1, 3)]  # helpers are made on demand and idle when not needed
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    ctx = multiprocessing.get_context("fork")  # the child has none of the parent's helper threads
    queue = ctx.Queue()
    child = ctx.Process(target=_in_forked_child, args=(queue,))
    child.start()
    child.join(120)
    assert child.exitcode == 0, "the forked child hung or failed"
    assert queue.get(timeout=5) == (0, grads[0].sum().item())  # the same result, bit for bit


@pytest.mark.parametrize("env, expected", [
    ({}, "default"),  # apply() did not run here: nothing set
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000", "TINYMNIST_OMP_DEFAULTS": "PASSIVE:1000"}, "default"),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),  # the user's own passive policy: sleep at once
    ({"OMP_WAIT_POLICY": "active", "TINYMNIST_OMP_DEFAULTS": "PASSIVE:1000"}, -1),  # the user's: never sleep
    ({"TINYMNIST_SPIN_US": "350", "OMP_WAIT_POLICY": "ACTIVE"}, 350),  # the explicit window wins
])
def test_the_helpers_wait_as_the_user_asked(monkeypatch, env, expected):
    from tinymnist.accel import runtime

    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TINYMNIST_OMP_DEFAULTS", "TINYMNIST_SPIN_US"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert runtime.pool_spin_us() == (runtime.SPIN_US if expected == "default" else expected)


def test_two_python_threads_may_train_on_the_kernels_at_once(built):
    import threading

    from tinymnist.accel.kernels import Conv2d

    cases = [_conv_case(64, 8, 26, 26, 16, 3, seed=s) for s in (5, 6)]

    def grad(case):
        x, weight, g = case
        conv = Conv2d(8, 16, 3, bias=False)
        with torch.no_grad():
            conv.weight.copy_(weight)
        for _ in range(5):  # ctypes lets go of the GIL: the two threads' calls overlap
            conv.weight.grad = None
            conv(x).backward(g)
        return conv.weight.grad

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        alone = [grad(c) for c in cases]
        together = [None, None]
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, grad(cases[i]))) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        torch.set_num_threads(before)
    assert not any(t.is_alive() for t in threads), "the kernels deadlocked"
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_the_declared_argtypes_are_the_c_prototypes():
    """kernels.PROTOTYPES (what ctypes passes) against every exported function of csrc/kernels.c, parameter by
    parameter: a pointer is a void pointer, long a c_long, int a c_int, double a c_double, float a c_float."""
    import ctypes
    import re

    from tinymnist.accel.kernels import PROTOTYPES, SOURCE

    text = re.sub(r"/\*.*?\*/", "", SOURCE.read_text(), flags=re.S)
    found = {}
    for m in re.finditer(r"^(?:int|void) (tm_\w+)\(([^)]*)\)\s*\{", text, re.M):
        params = [p.strip() for p in m.group(2).split(",") if p.strip() and p.strip() != "void"]
        found[m.group(1)] = tuple(
            ctypes.c_void_p if "*" in p else
            {"long": ctypes.c_long, "int": ctypes.c_int, "double": ctypes.c_double, "float": ctypes.c_float}[p.rsplit(" ", 1)[0].split()[-1]]
            for p in params)
    assert found == PROTOTYPES


def test_a_chain_op_is_laid_out_as_the_c_struct(built):
    """kernels.ChainOp (what program.py fills in) against csrc/kernels.c's tm_op: its size and every field's offset,
    as the C compiler placed them (tm_op_layout)."""
    import ctypes

    from tinymnist.accel.kernels import ChainOp

    names = [name for name, _ in ChainOp._fields_]
    out = (ctypes.c_long * (len(names) + 1))()
    built.tm_op_layout(out)
    assert list(out) == [ctypes.sizeof(ChainOp)] + [getattr(ChainOp, name).offset for name in names]


def test_the_support_rule_is_the_c_librarys():
    from tinymnist.accel.kernels import library, supports

    if library()[0] is None:
        pytest.skip("no C compiler here")
    assert supports(8) and supports(16) and supports(128) and not supports(0)
    assert not supports(1021)  # a prime: its unit (lcm with 8, rounded up to 32) is far over MAXU


@pytest.mark.parametrize("act,slope", [("relu", 0.0), ("gelu", 0.0), ("silu", 0.0), ("leaky_relu", 0.1)])
@pytest.mark.parametrize("shape", [(8, 16, 6, 6), (3, 12, 5, 7), (3, 33, 5, 7), (32, 8, 26, 26)])
def test_each_fused_activation_matches_pytorch_in_float64(built, act, slope, shape):
    from tinymnist.accel.kernels import _activate

    torch.manual_seed(shape[1])
    ref = nn.BatchNorm2d(shape[1]).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    fused = BatchNormAct(shape[1], act=act, slope=slope)
    fused.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 2 + 0.7).contiguous(memory_format=CL)
    g = torch.randn(shape, generator=gen)
    xa, xb = x.double().requires_grad_(), x.clone().requires_grad_()
    out_ref, out = _activate(ref(xa), act, slope), fused(xb)
    out_ref.backward(g.double())
    out.backward(g)
    rows = shape[0] * shape[2] * shape[3]
    assert (out.double() - out_ref).abs().max() < 2e-6
    assert (xb.grad.double() - xa.grad).abs().max() < 2e-6
    assert (fused.weight.grad.double() - ref.weight.grad).abs().max() < 4e-9 * rows + 1e-5
    assert (fused.bias.grad.double() - ref.bias.grad).abs().max() < 4e-9 * rows + 1e-5
    assert torch.allclose(fused.running_var.double(), ref.running_var, atol=1e-5)


@pytest.mark.parametrize("act", ["gelu", "silu", "leaky_relu"])
def test_each_fused_activation_is_the_same_at_1_2_and_3_threads(built, act):
    x = torch.randn(128, 16, 24, 24, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=CL)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            fused = BatchNormAct(16, act=act, slope=0.1)
            xg = x.clone().requires_grad_()
            out = fused(xg)
            out.backward(g)
            results.append((out.detach(), xg.grad, fused.weight.grad, fused.bias.grad, fused.running_var.clone()))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_a_model_wholly_on_the_kernels_trains_its_steps_on_the_kernels_threads_and_pytorchs_on_one(built):
    """training_threads: inside, the kernels keep the run's thread count and PyTorch's ops take one thread; outside
    (evaluation) PyTorch has them all back. The counts are each Python thread's own, as PyTorch's (OpenMP's) are:
    another thread's block changes nothing in this one. A network with a convolution on PyTorch's ops (here a padded one) keeps PyTorch's threads."""
    import threading

    from tinymnist.accel.kernels import threads, trains_on_kernels, training_threads

    ours = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.GELU(), nn.MaxPool2d(2))
    mixed = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    use_kernels(ours), use_kernels(mixed)
    assert trains_on_kernels(ours) and not trains_on_kernels(mixed) and not trains_on_kernels(nn.Linear(2, 2))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with training_threads(mixed):
            assert torch.get_num_threads() == 3 and threads() == 3
        inside, entered, leave = [], threading.Event(), threading.Event()

        def other():
            torch.set_num_threads(3)  # a new thread has OpenMP's default count until it sets its own
            with training_threads(ours):
                entered.set()
                leave.wait(30)
                inside.append((torch.get_num_threads(), threads()))

        t = threading.Thread(target=other)
        t.start()
        entered.wait(30)
        assert torch.get_num_threads() == 3 and threads() == 3
        with training_threads(ours):
            assert torch.get_num_threads() == 1 and threads() == 3
            x = torch.randn(4, 1, 12, 12).contiguous(memory_format=CL)
            ours(x).sum().backward()  # the kernels run at the run's count
        leave.set()
        t.join(30)
        assert inside == [(1, 3)]  # the other thread's block was still open when this one closed
        assert torch.get_num_threads() == 3 and threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_a_batch_norm_without_scale_and_shift_fuses_and_matches_pytorch(built, act):
    """bn_affine=False: the BN only normalises; fused, it trains on the kernels with scale 1 and shift 0, and its
    output, input gradient and running statistics are PyTorch's."""
    torch.manual_seed(3)
    ref = nn.Sequential(nn.BatchNorm2d(12, affine=False), nn.GELU() if act == "gelu" else nn.ReLU())
    ours = copy.deepcopy(ref)
    assert fuse_bn_act(ours) == 1 and isinstance(ours[0], BatchNormAct) and not ours[0].affine
    assert sum(p.numel() for p in ours.parameters()) == 0 and set(ours.state_dict()) == set(ref.state_dict())
    for _ in range(2):
        x = (torch.randn(4, 12, 7, 7) * 2 + 0.3).contiguous(memory_format=CL)
        g = torch.randn(4, 12, 7, 7)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref, out = ref(xa), ours(xb)
        out_ref.backward(g)
        out.backward(g)
        assert torch.allclose(out, out_ref, atol=1e-5)
        assert torch.allclose(xb.grad, xa.grad, atol=1e-5)
    assert torch.allclose(ours[0].running_mean, ref[0].running_mean, atol=1e-6)
    assert torch.allclose(ours[0].running_var, ref[0].running_var, atol=1e-5)
    ours.eval(), ref.eval()
    x = torch.randn(2, 12, 7, 7)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
