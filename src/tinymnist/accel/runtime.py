"""Process-wide settings that must be in place before any work: how OpenMP threads wait, and the heap's policy.

Imported (and applied) by the package's __init__, before torch loads. It never imports torch itself. A user's own
setting of either always wins, and `state()` says what is in force, for config.json and bench.json.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# OpenMP threads that spin while they wait turn a second training (or a test suite, or a sweep worker) beside a
# run into a collapse: measured on a 2-core host, two runs together did 10-55% of the work of one run alone.
# Waiting passively (OMP_WAIT_POLICY=PASSIVE) prevents that, but then every thread sleeps between the many small
# operations of a tiny network's step and pays a futex wake-up for each: a run alone lost about a third of its
# speed. libgomp (the OpenMP runtime of PyTorch's Linux wheels) can spin briefly and then sleep: GOMP_SPINCOUNT=1000,
# the count libgomp itself uses when threads outnumber cores. Measured on the same 2-core AMD host, 5 interleaved
# repeats of Model_7 on our pipeline (images/s; results/wait-policy-study.json): one run alone with 2 threads,
# passive 1,624-2,083, spin 1,000 2,066-3,231 (median +50%); two such runs together, passive 4,009-4,333, spin 1,000
# 3,786-3,966 (no collapse: 1.2-1.8x one run alone). Spin counts of 10,000 and more collapsed two runs again
# (0.4-0.8x). Both variables are set: GOMP_SPINCOUNT rules libgomp, and the passive policy holds for any other
# OpenMP runtime. They take effect only before torch is first imported.
_SPINCOUNT = "1000"
_OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_OURS = "TINYMNIST_OMP_DEFAULTS"  # what apply() set, so that child processes, which inherit it, know it is ours

# The C kernels (kernels.py) run on a thread pool of their own, whose helpers wait between operations by spinning
# with sched_yield() (a process beside them gets the core at once), and sleep after SPIN_US without work. The
# window spans the gaps inside a training step (Python, autograd, small PyTorch ops: tens to hundreds of
# microseconds), so a helper is awake when the next operation comes. A user's OMP_WAIT_POLICY rules it too: ACTIVE
# never sleeps, PASSIVE sleeps at once. TINYMNIST_SPIN_US sets the window in microseconds.
SPIN_US = 2000
SPIN_ENV = "TINYMNIST_SPIN_US"

# glibc hands every allocation over 128 KiB to mmap and returns it to the kernel on free (and trims the heap's top
# once 128 KiB of it is free). A training step allocates and frees megabytes of activations and gradients, so the
# kernel maps and zero-fills the same pages again every step: about 3,000 page faults per step of Model_7 at
# batch 128, 15-25% of a single-thread step. Keeping freed memory in the heap (allocations up to 32 MiB served
# from it, and its top never trimmed below 1 GiB of free space) makes a warmed-up step fault almost never. The
# process then holds its peak heap until it exits, which for these models is a few hundred MB at most.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for this setting on 64-bit hosts
_TRIM_THRESHOLD = 1024 * 1024 * 1024
_MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
HEAP_ENV = "TINYMNIST_HEAP"  # "system" leaves the C library's heap policy as it is

_heap = "system"


def _user_heap_setting() -> bool:
    """The user (or the launcher) already chose a heap policy or a different allocator."""
    if any(v in os.environ for v in _MALLOC_VARS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return True
    preload = os.environ.get("LD_PRELOAD", "")
    return any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc"))


def _retain_heap() -> str:
    """Apply the retained-heap policy through mallopt; return the policy now in force."""
    if os.environ.get(HEAP_ENV, "retain") == "system" or _user_heap_setting():
        return "system"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "system"  # other C libraries have other allocators; leave them alone
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    except (OSError, AttributeError):
        return "system"
    return "retain" if ok else "system"


def apply() -> None:
    """Set both policies for this process, unless the user set them. Idempotent."""
    global _heap
    if not any(v in os.environ for v in _OMP_VARS):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["GOMP_SPINCOUNT"] = _SPINCOUNT
        os.environ[_OURS] = f"PASSIVE:{_SPINCOUNT}"
    if _heap == "system":
        _heap = _retain_heap()


def pool_spin_us() -> int:
    """How long the kernels' idle helper threads spin before they sleep, in microseconds (-1: never sleep)."""
    if os.environ.get(SPIN_ENV, "").strip():
        try:
            return max(-1, int(os.environ[SPIN_ENV]))
        except ValueError:
            pass  # not a number: the policy below
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().upper()
    ours = os.environ.get(_OURS) == f"{policy}:{os.environ.get('GOMP_SPINCOUNT')}"
    if policy == "ACTIVE":
        return -1
    if policy == "PASSIVE" and not ours:
        return 0
    return SPIN_US


def state() -> dict:
    """What is in force: the OpenMP wait policy and libgomp's spin count (None = the runtime's default), the
    kernels' helper spin window, and the heap policy."""
    return {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "pool_spin_us": pool_spin_us(), "heap": _heap}
