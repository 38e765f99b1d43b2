"""Throughput of our tensor pipeline against the classic per-sample Dataset + DataLoader pipeline."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from dataclasses import replace
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..accel import runtime
from ..accel.kernels import training_threads
from ..accel.program import layer_by_layer, programs
from ..core.config import AugConfig, TrainConfig
from ..errors import TinyMnistError
from ..core.data import MEAN, MNIST, STD, Loader, load_mnist
from ..accel.device import (autocast, available_cores, configure_threads, hardware, seed_everything, sync,
                     torch_memory_format)
from ..core.engine import evaluate, train_epoch
from ..core.optim import make_optimizer
from ..core.plan import build_for, resolve_for
from ..models.summary import summarize


class ClassicDataset(torch.utils.data.Dataset):
    """The usual pipeline: one PIL image per __getitem__, randomly rotated and shifted, then ToTensor + Normalize."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, aug: AugConfig):
        self.images = images.cpu().numpy()
        self.labels = labels.cpu().numpy()
        self.aug = aug

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i], mode="L")
        a, t, s = self.aug.rotate, self.aug.translate, self.aug.scale
        angle = math.radians(np.random.uniform(-a, a))
        zoom = 1 + np.random.uniform(-s, s)
        dx, dy = (np.random.uniform(-t, t, size=2) * 28)
        # inverse map output -> input about the image centre, as PIL's AFFINE transform expects
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        cx = cy = 14.0
        matrix = (cos, sin, cx - cos * (cx + dx) - sin * (cy + dy), -sin, cos, cy + sin * (cx + dx) - cos * (cy + dy))
        img = img.transform((28, 28), Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=0)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)
        return (x - MEAN) / STD, int(self.labels[i])


def _worker_init(worker_id: int) -> None:
    np.random.seed(torch.initial_seed() % 2**32)


def _timed_steps(batches, step: Callable, steps: int, device: torch.device) -> float:
    """Images per second over `steps` training steps drawn from the iterator `batches`."""
    n = 0
    sync(device)
    # a training step's threads are set once around the steps, as train_epoch sets them once an epoch
    with getattr(step, "threads", contextlib.nullcontext)():
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = next(batches)
            step(x, y)
            n += y.shape[0]
        sync(device)
        return n / (time.perf_counter() - t0)


FLOPS_PER_MAC = 6  # a training image costs forward + 2 backward passes, each 2 FLOPs per multiply-accumulate


def gemm_peak_gflops(device: torch.device, n: int = 1024, seconds: float = 1.5) -> float:
    """The machine's own fp32 matrix-multiply rate at the current thread count: the ceiling a step is measured on."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


class _Step:
    """One training step of a fresh model: forward, loss, backward, SGD step; the recipe's format and precision."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        self.fmt = torch_memory_format(cfg.memory_format)
        self.optimizer = make_optimizer(model, cfg)

    def threads(self):
        """The block a run of steps takes as train_epoch's epoch does (kernels.training_threads)."""
        return training_threads(self.model)

    def __call__(self, x, y):
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.fmt)
        y = y.to(self.device, non_blocking=True)
        with self.threads():  # inside _timed_steps' block already: returns at once
            with autocast(self.device, self.cfg.precision):
                loss = F.cross_entropy(self.model(x).float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


def _train_step(model_name: str, cfg: TrainConfig, device: torch.device, as_programs: bool = True):
    """A fresh model's training step; as_programs=False: its kernels run layer by layer, as every step did before
    accel.program (for a before/after)."""
    seed_everything(0)
    model = build_for(replace(cfg, model=model_name), device).train()
    if not as_programs:
        layer_by_layer(model)
    return model, _Step(model, cfg, device)


@contextlib.contextmanager
def _child_env(values: dict):
    """Set (or, for None, remove) environment variables while child processes start: a spawned child reads them
    before it imports torch. The parent's own values come back afterwards."""
    def put(env: dict) -> None:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    saved = {k: os.environ.get(k) for k in values}
    try:
        put(values)
        yield
    finally:
        put(saved)


def _faults_per_step(step: Callable, batch, steps: int) -> Optional[float]:
    """Minor page faults per training step (the kernel mapping and zero-filling a page): what the heap policy
    changes. Linux and macOS count them; elsewhere None."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step(*batch)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps


def _layer_times(model: torch.nn.Module, step: Callable, batch, steps: int) -> dict:
    """Seconds per step of each leaf of the model's programs (accel.program), forward and backward, and of the
    whole step, over `steps` steps on one fixed batch."""
    progs = programs(model)
    if not progs:
        raise TinyMnistError("bench --layers times a network whose layers train as a program on the C kernels; "
                             "this one has none (kernels native, or layers the kernels do not take)")
    for p in progs:
        p.clock = []
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(*batch)
        total = time.perf_counter() - t0
        rows = []
        for p in progs:
            times = {}
            for i, direction, seconds in p.clock:
                times[(i, direction)] = times.get((i, direction), 0.0) + seconds
            for i, row in enumerate(p.describe(batch[0].shape)):
                rows.append({**row, "forward_s": times.get((i, "forward"), 0.0) / steps,
                             "backward_s": times.get((i, "backward"), 0.0) / steps})
    finally:
        for p in progs:
            p.clock = None
    return {"step_s": total / steps, "leaves": rows}


def _step_server(model_name: str, config: dict, device: str, threads: int, batch, conn, as_programs: bool = True,
                 ) -> None:
    """In a fresh process (with its own heap and thread settings): build a training step, then answer each request
    of `steps` (an int) with the images/s of that many steps on one fixed batch, each ("gemm", seconds) with
    the fp32 matrix-multiply GFLOP/s at the same thread count, each ("faults", steps) with the minor page faults
    per step, and each ("layers", steps) with _layer_times; None ends it."""
    configure_threads(threads)
    dev = torch.device(device)
    model, step = _train_step(model_name, TrainConfig.from_dict(config), dev, as_programs)
    batches = iter(lambda: batch, None)  # the same batch forever
    while (request := conn.recv()) is not None:
        if isinstance(request, tuple) and request[0] == "faults":
            conn.send(_faults_per_step(step, batch, request[1]))
        elif isinstance(request, tuple) and request[0] == "layers":
            try:
                conn.send(_layer_times(model, step, batch, request[1]))
            except TinyMnistError as e:
                conn.send(e)
        elif isinstance(request, tuple):
            conn.send(gemm_peak_gflops(dev, seconds=request[1]))
        else:
            conn.send(_timed_steps(batches, step, request, dev))


def steps_interleaved(configs: dict, model_name: str, device: torch.device, batch, steps: int, repeats: int,
                      heaps: Optional[dict] = None, gemm_in: Optional[str | tuple] = None,
                      threads: Optional[dict] = None, layered: frozenset = frozenset(), gemm_seconds: float = 1.0,
                      ) -> dict:
    """Images/s of each named recipe's step, each in its own process, taking turns repeat by repeat so that a host
    whose speed drifts biases none. `heaps` names the heap policy (runtime.HEAP_ENV) a process starts with. With
    `gemm_in`, that recipe's process also measures the matrix-multiply rate right after each of its timings,
    returned under "gemm": a peak and a step measured seconds apart, in one process, on a host whose speed drifts.
    With a tuple of names, each of those processes does, returned under "gemm:<name>".
    After the timings, each process counts its minor page faults per step over `steps` more steps, returned under
    "faults" by name. `threads` gives a process its thread count (default: this process's); a process named in
    `layered` runs its kernels layer by layer, as every step did before accel.program."""
    specs = {name: ((model_name, cfg.to_dict(), str(device), (threads or {}).get(name, torch.get_num_threads()),
                     batch), name not in layered, (heaps or {}).get(name, "retain")) for name, cfg in configs.items()}
    rates: dict = {name: [] for name in configs} | ({"gemm": []} if isinstance(gemm_in, str) else
                                                    {f"gemm:{n}": [] for n in gemm_in or ()})
    with _step_servers(specs) as servers:
        for _ in range(repeats):
            for name, conn in servers.items():
                conn.send(steps)
                rates[name].append(conn.recv())
                if name == gemm_in or (isinstance(gemm_in, tuple) and name in gemm_in):
                    conn.send(("gemm", gemm_seconds))
                    rates["gemm" if name == gemm_in else f"gemm:{name}"].append(conn.recv())
        rates["faults"] = {}
        for name, conn in servers.items():
            conn.send(("faults", steps))
            rates["faults"][name] = conn.recv()
    return rates


@contextlib.contextmanager
def _step_servers(specs: dict):
    """Start one _step_server process per name (specs: name -> ((model name, config dict, device, threads, batch),
    as_programs, heap policy)), warm each up (the kernels loaded, the heap grown to its working size), and yield
    name -> its connection; a process that dies is one RuntimeError, and every process is stopped at the end."""
    import multiprocessing as mp

    from ..accel.runtime import HEAP_ENV

    ctx = mp.get_context("spawn")
    servers = {}
    try:
        for name, (args, as_programs, heap) in specs.items():
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_step_server, args=(*args, there, as_programs), daemon=True)
            with _child_env({HEAP_ENV: heap}):
                proc.start()
            servers[name] = (proc, here)
        for _, conn in servers.values():
            conn.send(10)
            conn.recv()
        yield {name: conn for name, (_, conn) in servers.items()}
    except EOFError:
        raise RuntimeError("a bench process died (see its output above)") from None
    finally:
        for proc, conn in servers.values():
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()


def _pipeline_rate(data_dir: Optional[str], model_name: str, config: dict, threads: int, seconds: float,
                   barrier, results) -> None:
    """In a fresh process: train on our pipeline for `seconds` once every process is ready; report images/s."""
    configure_threads(threads)
    cfg = TrainConfig.from_dict(config)
    data = load_mnist(data_dir, progress=False)
    _, step = _train_step(model_name, cfg, torch.device("cpu"))
    loader = Loader(data.train_images, data.train_labels, cfg.batch_size, shuffle=True, seed=0, aug=cfg.aug)
    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    for _ in range(5):
        step(*next_batch())
    barrier.wait()
    n, t0 = 0, time.perf_counter()
    with step.threads():  # once, as an epoch of train_epoch
        while time.perf_counter() - t0 < seconds:
            x, y = next_batch()
            step(x, y)
            n += y.shape[0]
    results.put(n / (time.perf_counter() - t0))


def _wait_vars(wait_policy: Optional[str]) -> dict:
    """The environment a child starts with for a wait policy (None: the parent's own): without GOMP_SPINCOUNT,
    which would otherwise set libgomp's spinning whatever the policy."""
    return {"OMP_WAIT_POLICY": wait_policy, "GOMP_SPINCOUNT": None} if wait_policy else {}


def _together(count: int, threads: int, data_dir, model_name, cfg: TrainConfig, seconds: float,
              wait_policy: Optional[str] = None) -> list[float]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=_pipeline_rate, args=(data_dir, model_name, cfg.to_dict(), threads, seconds,
                                                      barrier, results)) for _ in range(count)]
    with _child_env(_wait_vars(wait_policy)):
        for p in procs:
            p.start()
    try:
        rates = [results.get(timeout=300) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return rates


def concurrent_runs(data_dir: Optional[str], model_name: str, cfg: TrainConfig, seconds: float = 6.0,
                    log: Optional[Callable[[str], None]] = print) -> dict:
    """Separate training processes on our pipeline, each timed over the same window: one alone with every core,
    one single-thread process per core, and two default (all-core) runs side by side; then one alone again with
    OpenMP threads that spin (ACTIVE), to show what that policy does to a run that is alone."""

    cores = available_cores()
    policy, spin = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")
    out = {}
    for key, count, threads, wait in (("single_run", 1, cores, None), ("multi_run", cores, 1, None),
                                      ("two_runs", 2, cores, None), ("single_run_spinning", 1, cores, "ACTIVE")):
        rates = _together(count, threads, data_dir, model_name, cfg, seconds, wait)
        with _child_env(_wait_vars(wait)):
            pool_spin = runtime.pool_spin_us()  # what the children's kernel helpers did: the same environment
        out[key] = {"images_per_s": round(sum(rates), 1), "processes": count, "threads_each": threads,
                    "omp_wait_policy": wait or policy, "gomp_spincount": None if wait else spin,
                    "pool_spin_us": pool_spin,
                    "per_process": [round(r, 1) for r in rates],
                    "seconds": seconds}
        if log:
            log(f"{key:<19} {sum(rates):>9,.0f} images/s  ({count} process(es) x {threads} thread(s), together; "
                f"OMP_WAIT_POLICY={wait or policy}, GOMP_SPINCOUNT={None if wait else spin}, kernel helpers' spin "
                f"{pool_spin} us)")
    return out


def run_bench(data: MNIST, model_name: str, cfg: TrainConfig, steps: int = 60, repeats: int = 3,
              epoch: bool = True, workers: int = 2, log: Optional[Callable[[str], None]] = print,
              data_dir: Optional[str] = None, concurrency: float = 6.0) -> dict:
    """Measure ours, classic, model-only (as configured) and plain (contiguous fp32) throughput on the same model,
    batch size and augmentation, the machine's matrix-multiply peak, and concurrent training processes."""
    device = data.train_images.device
    facts = hardware(device)
    cfg = resolve_for(cfg, device, facts)
    model, step = _train_step(model_name, cfg, device)
    ours_loader = Loader(data.train_images, data.train_labels, cfg.batch_size, shuffle=True, seed=0, aug=cfg.aug)
    results: dict = {}

    def record(name: str, rates: list[float]) -> None:
        results[name] = {"images_per_s": round(statistics.median(rates), 1), "runs": [round(r, 1) for r in rates],
                         "steps": steps, "batch_size": cfg.batch_size}
        if log:
            log(f"{name:<11} {statistics.median(rates):>9,.0f} images/s  (median of {len(rates)} x {steps} steps)")

    peaks = _lean_rows(cfg, model_name, device, next(iter(ours_loader)), steps, repeats, results, record)
    _pipeline_rows(data, cfg, ours_loader, step, device, steps, repeats, workers, record)
    if epoch:
        _epoch_row(data, cfg, model, step, device, results["ours"], log)
    _ratios(results, summarize(model).macs, peaks, log)
    if concurrency and device.type == "cpu":
        results.update(concurrent_runs(data_dir, model_name, cfg, seconds=concurrency, log=log))
        single, multi = results["single_run"]["images_per_s"], results["multi_run"]["images_per_s"]
        results["ratios"]["multi-run/single"] = round(multi / single, 3)
        results["ratios"]["two-runs/one"] = round(results["two_runs"]["images_per_s"] / single, 3)
    from ..core.runs import environment  # versions, git commit, hardware: as every run records them

    results["env"] = {**environment(device), "hardware": facts,
                      "precision": cfg.precision, "memory_format": cfg.memory_format, "kernels": cfg.kernels,
                      "classic_workers": workers, "model": model_name, "batch_size": cfg.batch_size,
                      "aug": {"rotate": cfg.aug.rotate, "translate": cfg.aug.translate, "scale": cfg.aug.scale},
                      "processor": platform.processor() or platform.machine(), "cpu_count": available_cores()}
    if log:
        log("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in results["ratios"].items()))
    return results


def _lean_rows(cfg: TrainConfig, model_name: str, device: torch.device, fixed, steps: int, repeats: int,
               results: dict, record: Callable) -> list[float]:
    """The step as configured against the step as the code first ran it (contiguous NCHW, fp32, and the C library's
    own heap policy), each in its own process, alternating repeat by repeat; the same step under the C library's
    heap policy alone (system_heap: what the retained heap adds, in speed and in page faults per step); and, when
    the recipe trains on the fused kernels, the same step on PyTorch's ops: what the kernels add. Returns the
    machine's peak, measured in the model-only process right after each of its step timings."""
    configs = {"model_only": cfg, "plain": replace(cfg, precision="fp32", memory_format="contiguous",
                                                   kernels="native"), "system_heap": cfg}
    if cfg.kernels == "fused":
        configs["native_kernels"] = replace(cfg, kernels="native")
    heaps = {name: runtime.state()["heap"] for name in configs} | {"plain": "system", "system_heap": "system"}
    lean = steps_interleaved(configs, model_name, device, tuple(t.cpu() for t in fixed), steps, max(repeats, 5),
                             heaps=heaps, gemm_in="model_only")
    peaks, faults = lean.pop("gemm"), lean.pop("faults")
    for name, r in lean.items():
        record(name, r)
        results[name].update(heap=heaps[name], memory_format=configs[name].memory_format,
                             kernels=configs[name].kernels, page_faults_per_step=faults[name])
    return peaks


def _pipeline_rows(data: MNIST, cfg: TrainConfig, ours_loader, step, device: torch.device, steps: int,
                   repeats: int, workers: int, record: Callable) -> None:
    """Ours against the classic per-image Dataset + DataLoader pipeline, on the same step. They take turns repeat by
    repeat, so a host whose speed drifts biases neither (a one-sided slow spell once put ours at 2,492 images/s
    while the same bench's full epoch ran at 3,390). The classic workers prefetch a few batches while ours runs,
    which if anything favours classic."""
    def endless(make_iter):
        while True:
            yield from make_iter()

    classic = torch.utils.data.DataLoader(
        ClassicDataset(data.train_images, data.train_labels, cfg.aug), batch_size=cfg.batch_size, shuffle=True,
        num_workers=workers, worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(0))
    pipelines = {"ours": endless(lambda: iter(ours_loader)), "classic": endless(lambda: iter(classic))}
    for batches in pipelines.values():
        _timed_steps(batches, step, 5, device)  # warm-up: allocator, kernels, worker start-up
    rates: dict = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, batches in pipelines.items():
            rates[name].append(_timed_steps(batches, step, steps, device))
    for name in pipelines:
        record(name, rates[name])
    pipelines["classic"].close()  # drops the DataLoader iterator, which stops its workers before the epoch timing


def _epoch_row(data: MNIST, cfg: TrainConfig, model, step, device: torch.device, ours: dict,
               log: Optional[Callable[[str], None]]) -> None:
    """One full epoch of ours and a test pass, timed; added to the `ours` row."""
    fmt = torch_memory_format(cfg.memory_format)
    full = Loader(data.train_images, data.train_labels, cfg.batch_size, shuffle=True, seed=0, aug=cfg.aug)
    test = Loader(data.test_images, data.test_labels, cfg.eval_batch_size)
    sync(device)
    t0 = time.perf_counter()
    train_epoch(model, full, step.optimizer, progress=False, precision=cfg.precision, memory_format=fmt)
    t1 = time.perf_counter()
    evaluate(model, test, verbose=False, precision=cfg.precision, memory_format=fmt)
    sync(device)
    t2 = time.perf_counter()
    ours.update(epoch_s=round(t1 - t0, 2), test_pass_s=round(t2 - t1, 2), epoch_plus_test_s=round(t2 - t0, 2))
    if log:
        log(f"ours: one full epoch {t1 - t0:.1f} s + test pass {t2 - t1:.1f} s = {t2 - t0:.1f} s")


def _ratios(results: dict, macs: int, peaks: list[float], log: Optional[Callable[[str], None]]) -> None:
    """The model step against the machine's peak (each timing against the peak measured seconds after it, in the
    same process; the median of those), and the pipelines' ratios; added to `results`."""
    ours, classic_r, ceiling = (results[k]["images_per_s"] for k in ("ours", "classic", "model_only"))
    step_gflops = ceiling * FLOPS_PER_MAC * macs / 1e9
    fractions = [r * FLOPS_PER_MAC * macs / 1e9 / p for r, p in zip(results["model_only"]["runs"], peaks)]
    if log:
        log(f"fp32 matrix multiply: {', '.join(f'{p:,.0f}' for p in peaks)} GFLOP/s, each after a model-only "
            f"timing ({torch.get_num_threads()} threads); model step / peak per pair: "
            + ", ".join(f"{f:.2f}" for f in fractions))
    results["gemm_peak_gflops"] = round(max(peaks), 1)
    results["gemm_peak_runs"] = [round(p, 1) for p in peaks]  # paired with model_only's runs, in order
    results["model_step"] = {"macs_per_image": macs, "flops_per_image": FLOPS_PER_MAC * macs,
                             "gflops": round(step_gflops, 2),
                             "fraction_of_peak_runs": [round(f, 3) for f in fractions]}
    results["ratios"] = {"ours/classic": round(ours / classic_r, 3), "ours/model-only": round(ours / ceiling, 3),
                         "lean/plain": round(ceiling / results["plain"]["images_per_s"], 3),
                         "heap/system": round(ceiling / results["system_heap"]["images_per_s"], 3),
                         **({"fused/native": round(ceiling / results["native_kernels"]["images_per_s"], 3)}
                            if "native_kernels" in results else {}),
                         "model-step/peak": round(statistics.median(fractions), 3)}


SMALL_BATCHES = (32, 64, 128)


def small_batch_rows(data: MNIST, recipes: dict, batches=SMALL_BATCHES, threads: int = 2, steps: int = 60,
                     repeats: int = 3, log: Optional[Callable[[str], None]] = print, gemm_seconds: float = 1.0,
                     ) -> dict:
    """The model step of each named recipe (name -> (model name, TrainConfig)) at each batch size, in images/s,
    each setting in its own process, taking turns repeat by repeat: at 1 thread and at `threads` threads, each
    with its kernels layer by layer ("before": how every step ran until accel.program) and as train_epoch runs it
    now ("after": each chain of kernel layers as one program). Each against the fp32 matrix-multiply peak that its
    own process measured at its own thread count right after each timing. Ratios are within one run on one host:
    after/before at each thread count, and after at `threads` threads against 1, the second core's worth to one
    run."""
    device = data.train_images.device
    facts = hardware(device)
    rows = []
    names = ("one_thread_before", "one_thread", "before", "after")
    counts = {"one_thread_before": 1, "one_thread": 1, "before": threads, "after": threads}
    for label, (model_name, recipe) in recipes.items():
        for batch_size in batches:
            cfg = resolve_for(replace(recipe, batch_size=batch_size), device, facts, warn=False)
            loader = Loader(data.train_images, data.train_labels, batch_size, shuffle=True, seed=0, aug=cfg.aug)
            fixed = tuple(t.cpu() for t in next(iter(loader)))
            rates = steps_interleaved(dict.fromkeys(names, cfg), model_name, device, fixed, steps, repeats,
                                      gemm_in=names, threads=counts, layered=frozenset({"one_thread_before", "before"}),
                                      gemm_seconds=gemm_seconds)
            macs = summarize(build_for(replace(cfg, model=model_name), device)).macs
            row = {"recipe": label, "model": model_name, "batch_size": batch_size, "kernels": cfg.kernels,
                   "threads": threads, "macs_per_image": macs}
            for name in names:
                fractions = [r * FLOPS_PER_MAC * macs / 1e9 / p for r, p in zip(rates[name], rates[f"gemm:{name}"])]
                row[name] = {"images_per_s": round(statistics.median(rates[name]), 1),
                             "runs": [round(r, 1) for r in rates[name]],
                             "gemm_peak_gflops": [round(p, 1) for p in rates[f"gemm:{name}"]],
                             "fraction_of_peak": round(statistics.median(fractions), 3)}
            row["one/before"] = round(row["one_thread"]["images_per_s"] / row["one_thread_before"]["images_per_s"], 3)
            row["after/before"] = round(row["after"]["images_per_s"] / row["before"]["images_per_s"], 3)
            row["threads/one"] = round(row["after"]["images_per_s"] / row["one_thread"]["images_per_s"], 3)
            rows.append(row)
            if log:
                log(f"{label} ({model_name}) batch {batch_size}: 1 thread before "
                    f"{row['one_thread_before']['images_per_s']:,.0f} images/s, after "
                    f"{row['one_thread']['images_per_s']:,.0f} ({row['one_thread']['fraction_of_peak']:.2f} of peak); "
                    f"{threads} threads before {row['before']['images_per_s']:,.0f}, after "
                    f"{row['after']['images_per_s']:,.0f} ({row['after']['fraction_of_peak']:.2f} of peak); "
                    f"after/before {row['one/before']:.2f} at 1 thread, {row['after/before']:.2f} at {threads}; "
                    f"{threads} threads/1 {row['threads/one']:.2f}")
    from ..core.runs import environment

    return {"rows": rows, "steps": steps, "repeats": repeats,
            "env": {**environment(device), "hardware": facts, "cpu_count": available_cores()}}


def layer_rows(data: MNIST, model_name: str, recipe: TrainConfig, label: str, batch_size: int = 32,
               thread_counts=(1, 2), steps: int = 60, repeats: int = 3,
               log: Optional[Callable[[str], None]] = print, gemm_seconds: float = 1.0) -> dict:
    """Where a training step's time goes: each leaf of the network's program (accel.program), forward and backward,
    at each thread count, each count in a process of its own, taking turns repeat by repeat (the median over the
    repeats). Each convolution's multiply-adds per second against the fp32 matrix-multiply peak its own process
    measured right after each timing. What is not a leaf (the loss, the SGD step, Python between the calls) is the
    step's time less the leaves'."""
    from ..core.runs import environment

    device = data.train_images.device
    facts = hardware(device)
    cfg = resolve_for(replace(recipe, batch_size=batch_size), device, facts, warn=False)
    loader = Loader(data.train_images, data.train_labels, batch_size, shuffle=True, seed=0, aug=cfg.aug)
    batch = tuple(t.cpu() for t in next(iter(loader)))
    seen: dict = {count: [] for count in thread_counts}
    peaks: dict = {count: [] for count in thread_counts}
    specs = {count: ((model_name, cfg.to_dict(), str(device), count, batch), True, "retain")
             for count in thread_counts}
    with _step_servers(specs) as servers:
        for _ in range(repeats):
            for count, conn in servers.items():
                conn.send(("layers", steps))
                got = conn.recv()
                if isinstance(got, Exception):
                    raise got
                seen[count].append(got)
                conn.send(("gemm", gemm_seconds))
                peaks[count].append(conn.recv())
    rows = []
    for count in thread_counts:
        peak = statistics.median(peaks[count])
        step_s = statistics.median(r["step_s"] for r in seen[count])
        leaves = []
        for i, leaf in enumerate(seen[count][0]["leaves"]):
            fwd = statistics.median(r["leaves"][i]["forward_s"] for r in seen[count])
            bwd = statistics.median(r["leaves"][i]["backward_s"] for r in seen[count])
            macs = (leaf["forward_macs"] + leaf["backward_macs"]) * batch_size
            gflops = 2 * macs / (fwd + bwd) / 1e9 if macs and fwd + bwd > 0 else None
            leaves.append({"layer": leaf["layer"], "forward_ms": round(fwd * 1e3, 4), "backward_ms": round(bwd * 1e3, 4),
                           "macs": macs, "gflops": None if gflops is None else round(gflops, 2),
                           "of_peak": None if gflops is None else round(gflops / peak, 3)})
        in_leaves = sum(l["forward_ms"] + l["backward_ms"] for l in leaves)
        row = {"threads": count, "step_ms": round(step_s * 1e3, 3), "leaves_ms": round(in_leaves, 3),
               "rest_ms": round(step_s * 1e3 - in_leaves, 3), "gemm_peak_gflops": round(peak, 1),
               "gemm_runs": [round(p, 1) for p in peaks[count]], "leaves": leaves}
        rows.append(row)
        if log:
            top = sorted(leaves, key=lambda l: -(l["forward_ms"] + l["backward_ms"]))[:3]
            log(f"{label} ({model_name}) batch {batch_size}, {count} thread(s): step {row['step_ms']:.2f} ms, its "
                f"layers {in_leaves:.2f} ms, the rest {row['rest_ms']:.2f} ms; the largest: "
                + "; ".join(f"{l['layer']} {l['forward_ms'] + l['backward_ms']:.2f} ms" for l in top))
    return {"recipe": label, "model": model_name, "batch_size": batch_size, "steps": steps, "repeats": repeats,
            "rows": rows, "env": {**environment(device), "hardware": facts, "cpu_count": available_cores()}}


def time_training(runs: int, data_dir: Optional[str], device: str, precision: str = "fp32",
                  log: Optional[Callable[[str], None]] = print) -> dict:
    """Wall time of the full default `tinymnist train`, as `time` would measure it, `runs` times."""
    import subprocess
    import sys
    import tempfile

    seconds = []
    cmd = [sys.executable, "-m", "tinymnist.cli", "train", "--no-progress", "--device", device, "--precision", precision]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    for i in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            p = subprocess.run(cmd + ["--out", os.path.join(tmp, "run")], capture_output=True, text=True)
            dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"training run failed: {p.stderr.strip().splitlines()[-1:]}")
        seconds.append(round(dt, 1))
        if log:
            log(f"tinymnist train (full default recipe), run {i + 1}/{runs}: {dt:.1f} s")
    shown = "tinymnist train" + (f" --precision {precision}" if precision != "fp32" else "")
    return {"command": shown, "seconds": seconds, "median_s": statistics.median(seconds)}
