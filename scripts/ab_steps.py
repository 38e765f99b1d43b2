"""A before/after of the training step across two versions of the code, in one run on one host.

    python scripts/ab_steps.py --tree before=/path/to/worktree-A --tree after=/path/to/worktree-B \
        [--step dw-gelu-8000] [--model NAME] [--batch-size 32] [--threads 1 2] [--rounds 7] [--steps 200] \
        [--epoch --data-dir DIR] --out results/NAME.json

Why: `tinymnist bench` compares pipelines of one version in one run; across commits, two bench runs minutes apart on
these virtual hosts differed by more than the change measured (results/bench-small-batches.json as of 3c17c52 says
so). Here each measurement is a fresh process of one tree (its own src/ on PYTHONPATH) timing `--steps` training
steps of the step's recipe on one fixed batch, after 30 warm-up steps, with that tree's own bench helpers; the
trees take turns within every round, thread count by thread count, so a host whose speed drifts biases neither.
Right after its steps, each process measures the fp32 matrix-multiply rate at the same thread count (bench's
gemm_peak_gflops): on a host whose speed drifts by a third within the hour, images/s per GFLOP/s of that moment is
the steadier figure. The report is, per (tree, threads), the median images/s and images/s per peak GFLOP/s, and
each tree's ratio of both to the first tree's, round by round paired. Each process imports tinymnist before torch,
as the CLI does. The hardware and versions are read, not typed; each tree's commit and whether it was dirty are recorded.

With --epoch, each measurement is instead one whole epoch of the recipe on real MNIST (--data-dir), through that
tree's own train_run: the loader, its augmentation, the step, the schedule, the average and the test pass, as a
run trains them. Its images/s are the training images over the epoch's seconds (the history's, test pass included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# run in a child, from one tree: the images/s of STEPS steps of the recipe on a fixed batch (bench's own helpers;
# their modules moved when the package took its layers, hence the fallbacks)
CHILD = r"""
import tinymnist  # first, as the CLI: its OpenMP and heap policy apply before torch loads
import json, sys, time, torch
from dataclasses import replace
step_name, model, batch, threads, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
try:
    from tinymnist.apps.bench import _train_step, _timed_steps, gemm_peak_gflops
    from tinymnist.lab.series import get_step
    from tinymnist.core.plan import resolve_for
    from tinymnist.accel.device import configure_threads, hardware
except ImportError:
    from tinymnist.bench import _train_step, _timed_steps, gemm_peak_gflops
    from tinymnist.experiments import get_step
    from tinymnist.engine import resolve_for
    from tinymnist.device import configure_threads, hardware
configure_threads(threads)
dev = torch.device("cpu")
cfg = get_step(step_name).config
cfg = replace(cfg, model=model or cfg.model, batch_size=batch)
cfg = resolve_for(cfg, dev, hardware(dev), warn=False)
_, step = _train_step(cfg.model, cfg, dev)
g = torch.Generator().manual_seed(0)
fixed = (torch.rand(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g))
batches = iter(lambda: fixed, None)
_timed_steps(batches, step, 30, dev)
rate = _timed_steps(batches, step, steps, dev)
print(json.dumps({"images_per_s": rate, "gemm_gflops": gemm_peak_gflops(dev, seconds=1.0), "model": cfg.model,
                  "threads": torch.get_num_threads()}))
"""


# the same, one whole epoch through the tree's train_run (its modules moved too)
EPOCH_CHILD = r"""
import tinymnist
import json, sys, tempfile, torch
from dataclasses import replace
step_name, model, batch, threads, data_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
try:
    from tinymnist.core.runs import train_run
    from tinymnist.lab.series import get_step
    from tinymnist.apps.bench import gemm_peak_gflops
except ImportError:
    from tinymnist.runs import train_run
    from tinymnist.experiments import get_step
    from tinymnist.bench import gemm_peak_gflops
cfg = get_step(step_name).config
cfg = replace(cfg, model=model or cfg.model, batch_size=batch)
with tempfile.TemporaryDirectory() as d:
    _, history = train_run(cfg, out=d + "/run", data_dir=data_dir, device="cpu", threads=threads, until=1,
                           progress=False, verbose=False)
seconds = history[0]["seconds"]
print(json.dumps({"images_per_s": 60000 / seconds, "epoch_seconds": seconds,
                  "gemm_gflops": gemm_peak_gflops(torch.device("cpu"), seconds=1.0), "model": cfg.model,
                  "threads": torch.get_num_threads()}))
"""


def _git(tree: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def measure(tree: Path, step: str, model: str, batch: int, threads: int, steps: int, data_dir: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    child = [EPOCH_CHILD, step, model, str(batch), str(threads), data_dir] if data_dir else \
        [CHILD, step, model, str(batch), str(threads), str(steps)]
    out = subprocess.run([sys.executable, "-c", *child], cwd=tree, env=env, capture_output=True, text=True,
                         timeout=900)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or [f"exit status {out.returncode}"]
        raise SystemExit(f"ab_steps: {tree}: {lines[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=DIR: a checkout of tinymnist (twice or more)")
    p.add_argument("--step", default="dw-gelu-8000", help="the series step whose recipe trains")
    p.add_argument("--model", default="", help="another network with that recipe (default: the step's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--epoch", action="store_true", help="time one whole epoch on real MNIST instead of --steps")
    p.add_argument("--data-dir", default=os.environ.get("TINYMNIST_DATA", ""), help="the MNIST files (--epoch)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.epoch and not args.data_dir:
        raise SystemExit("ab_steps: --epoch trains on real MNIST: name its directory (--data-dir or TINYMNIST_DATA)")
    trees = {}
    for spec in args.tree:
        name, _, path = spec.partition("=")
        if not name or not path or not (Path(path) / "src" / "tinymnist").is_dir():
            raise SystemExit(f"ab_steps: --tree {spec}: want NAME=DIR, DIR a checkout of tinymnist")
        trees[name] = Path(path).resolve()
    if len(trees) < 2:
        raise SystemExit("ab_steps: name two trees or more")
    runs: dict = {f"{name}@{t}": [] for t in args.threads for name in trees}
    peaks: dict = {key: [] for key in runs}
    models: dict = {}
    for r in range(args.rounds):
        for t in args.threads:
            order = list(trees) if r % 2 == 0 else list(reversed(trees))  # who goes first alternates too
            for name in order:
                got = measure(trees[name], args.step, args.model, args.batch_size, t, args.steps,
                              args.data_dir if args.epoch else "")
                runs[f"{name}@{t}"].append(got["images_per_s"])
                peaks[f"{name}@{t}"].append(got["gemm_gflops"])
                models[name] = got["model"]
                epoch = f" (an epoch in {got['epoch_seconds']:.1f} s)" if args.epoch else ""
                print(f"round {r + 1} {name} {t} thread(s): {got['images_per_s']:,.0f} images/s{epoch}, matrix "
                      f"multiply {got['gemm_gflops']:.0f} GFLOP/s", flush=True)
    first = next(iter(trees))
    summary = {}
    for t in args.threads:
        for name in trees:
            mine, base = runs[f"{name}@{t}"], runs[f"{first}@{t}"]
            norm = [a / p for a, p in zip(mine, peaks[f"{name}@{t}"])]
            norm_base = [a / p for a, p in zip(base, peaks[f"{first}@{t}"])]
            summary[f"{name}@{t}"] = {"median_images_per_s": round(statistics.median(mine), 1),
                                      f"paired_ratio_to_{first}": round(statistics.median(
                                          a / b for a, b in zip(mine, base)), 3),
                                      "median_images_per_s_per_gflops": round(statistics.median(norm), 2),
                                      f"paired_ratio_per_gflops_to_{first}": round(statistics.median(
                                          a / b for a, b in zip(norm, norm_base)), 3)}
    for name in trees:
        if len(args.threads) > 1:
            lo, hi = min(args.threads), max(args.threads)
            summary[f"{name}:{hi}/{lo} threads"] = round(statistics.median(
                a / b for a, b in zip(runs[f"{name}@{hi}"], runs[f"{name}@{lo}"])), 3)
    sys.path.insert(0, str(ROOT / "src"))
    import platform

    import torch

    from tinymnist.accel.device import hardware

    result = {"step": args.step, "model": args.model or None, "batch_size": args.batch_size,
              "unit": "one epoch on real MNIST, test pass included" if args.epoch else f"{args.steps} steps on one fixed batch",
              "steps": None if args.epoch else args.steps,
              "rounds": args.rounds, "trees": {name: {"commit": _git(path, "rev-parse", "HEAD"),
                                                      "dirty": bool(_git(path, "status", "--porcelain",
                                                                         "--untracked-files=no"))}
                                               for name, path in trees.items()},
              "models": models, "runs": runs, "gemm_gflops": peaks, "summary": summary,
              "env": {"hardware": hardware(torch.device("cpu")), "torch": torch.__version__,
                      "python": platform.python_version(), "cpu_count": os.cpu_count(),
                      "command": "python scripts/ab_steps.py " + " ".join(argv if argv is not None else sys.argv[1:])}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=1)
    os.replace(f.name, out)
    for key, value in summary.items():
        print(key, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
