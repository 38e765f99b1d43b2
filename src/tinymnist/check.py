"""Proof of the target over many seeds: train a step once per seed and judge every rule."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from .errors import TinyMnistError

MAX_PARAMS = 8000  # strictly fewer than this
MAX_EPOCHS = 15
THRESHOLD = 99.40  # percent, in every one of the last K epochs


@dataclass(frozen=True)
class Rule:
    text: str
    passed: bool


def verdict(params: int, epochs: int, histories: Sequence[Sequence[dict]], last: int = 5,
            threshold: float = THRESHOLD) -> list[Rule]:
    """Judge the three rules on per-seed histories (history.json lists)."""
    if last < 1:
        raise TinyMnistError(f"--last must be >= 1, got {last}")
    mins = [min(r["test_acc"] for r in h[-last:]) if len(h) >= last else float("nan") for h in histories]
    complete = all(len(h) >= last for h in histories) and len(histories) > 0
    worst = min(mins) if complete else float("nan")
    return [
        Rule(f"parameters {params:,} < {MAX_PARAMS:,}", params < MAX_PARAMS),
        Rule(f"epochs {epochs} <= {MAX_EPOCHS}", epochs <= MAX_EPOCHS),
        Rule(f"every seed's last {last} test accuracies >= {threshold:.2f}% (worst {worst:.2f}%, "
             f"{len(histories)} seeds)", complete and worst >= threshold),
    ]


def final_accuracy_stats(histories: Sequence[Sequence[dict]]) -> tuple[float, float]:
    """Mean and sample standard deviation of the last epoch's test accuracy over seeds."""
    finals = [h[-1]["test_acc"] for h in histories]
    return statistics.mean(finals), (statistics.stdev(finals) if len(finals) > 1 else 0.0)


def run_check(step_name: str, seeds: int, last: int = 5, data_dir: Optional[str] = None, device: str = "auto",
              out_root: str = "runs", progress: Optional[bool] = None, threads: int = 0) -> dict:
    """Train `step_name` with seeds 0..seeds-1; return the evidence object that --json writes."""
    from .experiments import get_step
    from .model import create_model
    from .runs import new_run_dir, train_run

    step = get_step(step_name)
    if last > step.config.epochs:
        raise TinyMnistError(f"--last {last} is more than the step's {step.config.epochs} epochs")
    params = create_model(step.config.model, dropout=step.config.dropout).num_params()
    results = []
    for seed in range(seeds):
        cfg = replace(step.config, seed=seed)
        run_dir = new_run_dir(f"check-{step.name}-seed{seed}", out_root)
        _, history = train_run(cfg, out=run_dir, data_dir=data_dir, device=device, name=f"{step.name}-seed{seed}",
                               progress=progress, verbose=False, threads=threads)
        tail = [r["test_acc"] for r in history[-last:]]
        print(f"seed {seed}: last {last} test accuracies {', '.join(f'{a:.2f}' for a in tail)}; min {min(tail):.2f}%"
              f"  ({run_dir})", flush=True)
        results.append({"seed": seed, "history": history, "run_dir": str(run_dir)})
    from .fileio import read_json

    env = read_json(Path(results[0]["run_dir"]) / "config.json")["env"]
    rules = verdict(params, step.config.epochs, [r["history"] for r in results], last)
    mean, std = final_accuracy_stats([r["history"] for r in results])
    for rule in rules:
        print(f"{'PASS' if rule.passed else 'FAIL'}  {rule.text}")
    print(f"final-epoch test accuracy over {seeds} seeds: {mean:.2f} +- {std:.2f}%")
    return {"step": step.name, "model": step.config.model, "params": params, "epochs": step.config.epochs,
            "last": last, "threshold": THRESHOLD, "passed": all(r.passed for r in rules),
            "rules": [{"rule": r.text, "passed": r.passed} for r in rules],
            "final_acc_mean": round(mean, 4), "final_acc_std": round(std, 4),
            "config": step.config.to_dict(), "env": env, "seeds": results}

