"""Hardware facts from the machine, and the choices made from them: precision, memory format, OpenMP waiting."""

import os
import platform
import subprocess
import sys

import pytest
import torch

from tinymnist.accel.device import cpu_info, native_bf16, resolve_memory_format, resolve_precision
from tinymnist.errors import TinyMnistError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def cpu(**flags):
    isa = {f: False for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")}
    isa.update(flags)
    return {"cpu_model": "Test CPU", "cores": 2, "isa": isa}


@pytest.mark.parametrize("facts, device, expected", [
    (cpu(avx2=True), CPU, "fp32"),  # AVX2 only: bf16 would be emulated
    (cpu(avx2=True, avx512f=True), CPU, "fp32"),  # AVX-512 without its BF16 extension
    (cpu(avx2=True, avx512f=True, avx512_bf16=True), CPU, "bf16"),
    (cpu(avx2=True, amx_tile=True, amx_bf16=True), CPU, "bf16"),
    ({"cpu_model": "?", "isa": None}, CPU, "fp32"),  # flags unknown: never guess bf16
    ({**cpu(), "gpu": "T4", "compute_capability": "7.5"}, CUDA, "fp32"),
    ({**cpu(), "gpu": "A100", "compute_capability": "8.0"}, CUDA, "bf16"),
    ({**cpu(), "gpu": "H100", "compute_capability": "9.0"}, CUDA, "bf16"),
])
def test_auto_precision_picks_bf16_only_where_it_is_native(facts, device, expected):
    assert resolve_precision("auto", device, facts) == expected
    assert native_bf16(device, facts) == (expected == "bf16")


def test_explicit_bf16_without_native_support_warns_in_one_line_and_fp32_never_does():
    lines = []
    assert resolve_precision("bf16", CPU, cpu(avx2=True), warn=lines.append) == "bf16"
    assert len(lines) == 1 and "\n" not in lines[0] and "Test CPU" in lines[0] and "emulated" in lines[0]
    assert resolve_precision("bf16", CPU, cpu(amx_bf16=True), warn=lines.append) == "bf16"
    assert resolve_precision("fp32", CPU, cpu(), warn=lines.append) == "fp32"
    assert len(lines) == 1
    with pytest.raises(TinyMnistError, match="unknown precision"):
        resolve_precision("fp8", CPU, cpu())


def test_bf16_warning_reaches_the_cli_as_one_line(tmp_path, monkeypatch, capsys):
    import tinymnist.accel.device as device
    from tinymnist.cli import main

    from conftest import synthetic_mnist

    synthetic_mnist(tmp_path / "d", n_train=64, n_test=32)
    monkeypatch.setattr(device, "cpu_info", lambda: cpu(avx2=True))
    assert main(["train", "--epochs", "1", "--batch-size", "32", "--precision", "bf16", "--data-dir",
                 str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "no native bf16" in warnings[0]


def test_memory_format_rule_and_record(tmp_path):
    assert resolve_memory_format("auto", CPU, cpu(avx2=True)) == "channels_last"
    assert resolve_memory_format("auto", CPU, cpu()) == "contiguous"
    assert resolve_memory_format("auto", CUDA, cpu(avx2=True)) == "contiguous"
    assert resolve_memory_format("contiguous", CPU, cpu(avx2=True)) == "contiguous"
    with pytest.raises(TinyMnistError):
        resolve_memory_format("nhwc", CPU, cpu())


def test_both_memory_formats_compute_the_same_training_step():
    from tinymnist.core.engine import make_optimizer
    from tinymnist.lab.series import last_step
    import torch.nn.functional as F

    cfg = last_step().config
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64) % 10
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = cfg.build_model().to(memory_format=fmt)
        opt = make_optimizer(model, cfg)
        out = model(x.contiguous(memory_format=fmt))
        F.cross_entropy(out, y).backward()
        opt.step()
        results.append((out.detach(), [p.detach().clone() for p in model.parameters()]))
    (out_a, params_a), (out_b, params_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-5)
    # one SGD step at the recipe's LR (0.2) turns the formats' different summation order into up to ~1e-4 in a
    # few weights of magnitude ~0.1: equal to 0.1% of the weights, not bit-equal
    assert all(torch.allclose(a, b, atol=5e-4) for a, b in zip(params_a, params_b))


def test_cpu_info_reads_the_flags_the_machine_reports(tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu avx2 fma avx512f amx_bf16\n\n")
    info = cpu_info(str(fake))
    assert info["cpu_model"] == "Some CPU 9000"
    assert info["isa"] == {"avx2": True, "fma": True, "avx512f": True, "avx512_bf16": False, "amx_tile": False,
                           "amx_bf16": True}


def test_run_records_hardware_precision_and_memory_format(tmp_path):
    import json

    from tinymnist.cli import main

    from conftest import synthetic_mnist

    synthetic_mnist(tmp_path / "d", n_train=64, n_test=32)
    assert main(["train", "--epochs", "1", "--batch-size", "32", "--precision", "auto", "--data-dir",
                 str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    hw = meta["env"]["hardware"]
    assert meta["config"]["precision"] in ("fp32", "bf16")  # resolved, never "auto"
    assert meta["config"]["memory_format"] in ("contiguous", "channels_last")
    assert hw["cores"] >= 1 and hw["cpu_model"]


@pytest.mark.parametrize("env, expected", [({}, "PASSIVE 1000"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),
                                           ({"GOMP_SPINCOUNT": "5"}, "None 5")])
def test_brief_spinning_is_the_default_and_the_users_setting_wins(env, expected):
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import os, tinymnist; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == expected


def test_configs_saved_before_memory_format_existed_mean_contiguous():
    import json
    from pathlib import Path

    from tinymnist.core.config import TrainConfig

    saved = json.loads((Path(__file__).resolve().parent / "data" / "legacy" / "config-before-memory-format.json").read_text())
    assert "memory_format" not in saved["config"]
    assert TrainConfig.from_dict(saved["config"]).memory_format == "contiguous"


# The mechanism, not a host's page-fault count (bench measures those, per step, with its host): under the retained
# heap a 24 MiB block comes from the heap, not from a fresh mmap, and once freed it stays in the process; under the C
# library's own policy the same block is mapped and handed back. glibc's mallinfo2 counts both.
_HEAP = """
import ctypes, tinymnist
from tinymnist.accel import runtime
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]
size, before = 24 << 20, libc.mallinfo2()
block = libc.malloc(size)
mapped = libc.mallinfo2().hblks - before.hblks
libc.free(block)
kept = libc.mallinfo2().arena - before.arena >= size
print(runtime.state()["heap"], mapped, kept)
"""


def _has_mallinfo2() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc 2.33 and later
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or not _has_mallinfo2(),
                    reason="the policy is glibc's, and its counts need mallinfo2 (glibc 2.33+)")
def test_the_retained_heap_keeps_freed_memory_and_the_users_setting_wins():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "TINYMNIST_HEAP"}

    def heap(extra: dict) -> list[str]:
        return subprocess.run([sys.executable, "-c", _HEAP], env={**clean, **extra}, capture_output=True, text=True,
                              check=True).stdout.split()

    assert heap({}) == ["retain", "0", "True"]  # served from the heap, and kept there once freed
    assert heap({"TINYMNIST_HEAP": "system"}) == ["system", "1", "False"]  # glibc's own: mapped, then returned
    assert heap({"MALLOC_TOP_PAD_": "0"}) == ["system", "1", "False"]  # the user's own setting: left alone
