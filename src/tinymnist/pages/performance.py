"""docs/performance.md and the README's speed lines: the benchmark, the first command's time, the timed checks, and the
code map."""

from __future__ import annotations

from pathlib import Path

from ..fileio import read_json
from .common import NOTE, RESULTS, _kernels_text, _wait, hardware_text, markers
from .records import Records
from .render import render_template, section


BENCH_FILE = "bench.json"


def render_performance(results: Path = RESULTS) -> str:
    """The performance section, from results/bench.json (and the timed checks, when committed)."""
    start, end = markers("performance")
    out = [start, NOTE, "", "## Measured", ""]
    bench = results / BENCH_FILE
    if not bench.is_file():
        return "\n".join(out + ["No benchmark has been committed yet: run `tinymnist bench --json results/bench.json`.",
                                "", end])
    b = read_json(bench)
    env = b["env"]
    r = b["ratios"]
    out += [f"`tinymnist bench --model {env['model']} --json results/{bench.name}` trained `{env['model']}` at batch {env['batch_size']} with "
            f"the same augmentation (rotate ±{env['aug']['rotate']:g}°, shift ±{env['aug']['translate']:g}, zoom "
            f"±{env['aug']['scale']:g}) on {env['device']}: {hardware_text(env)}, {env['threads']} threads, "
            f"{env['precision']}, {env['memory_format']} memory format, "
            f"{_kernels_text(env.get('kernels'), env.get('kernel_ops'))}, "
            f"wait policy "
            f"{_wait(env['hardware'])}, heap policy {env['hardware'].get('heap', 'system')}"
            f"; {env['platform']}, torch {env['torch']}. "
            f"Each step figure is the median of {len(b['ours']['runs'])} runs of {b['ours']['steps']} training "
            f"steps, ours and classic taking turns ({len(b['plain']['runs'])} for the model-only rows and plain, "
            "which take turns in processes of their own). "
            "Absolute numbers differ between hosts and on a shared machine are noisy; compare ratios within one run.", "",
            "| pipeline | what it does per batch | images/s |", "| --- | --- | ---: |",
            f"| ours | index a uint8 tensor, one `affine_grid`/`grid_sample` for the batch, train step | "
            f"{b['ours']['images_per_s']:,.0f} |",
            f"| classic | `Dataset.__getitem__` augments one PIL image at a time, `DataLoader` with "
            f"{env['classic_workers']} workers, train step | {b['classic']['images_per_s']:,.0f} |",
            f"| model only | the same pre-made batch every step, as the recipe now trains it: the ceiling | "
            f"{b['model_only']['images_per_s']:,.0f} |",
            f"| plain | the same, as the code trained before (contiguous NCHW, fp32, "
            f"{_kernels_text(b['plain'].get('kernels'))}, the C library's own heap "
            f"policy{'; a process of its own' if 'heap' in b['plain'] else ''}) | "
            f"{b['plain']['images_per_s']:,.0f} |"]
    if "native_kernels" in b:
        out.append(f"| model only, kernels off | the same as model only, on {_kernels_text('native')} | "
                   f"{b['native_kernels']['images_per_s']:,.0f} |")
    out += ["", f"**ours/classic = {r['ours/classic']:.2f}×**, ours/model-only = {r['ours/model-only']:.2f}, "
                f"**lean/plain = {r['lean/plain']:.2f}×**"
                + (f", fused/native = {r['fused/native']:.2f}× (what the C kernels add)." if "fused/native" in r
                   else ".")]
    out += _peak_lines(b) + _concurrency_lines(b)
    out += _small_batch_lines(results)
    out += _timed_checks(results)
    return "\n".join(out + ["", end])


def _peak_lines(b: dict) -> list[str]:
    """The model step against the machine's own matrix-multiply peak, from a bench."""
    r = b["ratios"]
    step = b["model_step"]
    runs, pairs = b.get("gemm_peak_runs"), step.get("fraction_of_peak_runs")
    if pairs:  # the peak measured in the model-only process, right after each of its timings
        peak_text = (f"The machine's own fp32 matrix multiply, measured in the model-only process right after each "
                     f"of its {len(runs)} timings, ran at {min(runs):,.0f}–{max(runs):,.0f} GFLOP/s")
        ratio_text = (f"each timing against the peak measured after it gives "
                      f"{', '.join(f'{f:.2f}' for f in pairs)}: **model-step/peak = {r['model-step/peak']:.2f}** "
                      "(the median)")
    else:
        peak_text = f"The machine's own fp32 matrix multiply ran at {b['gemm_peak_gflops']:,.0f} GFLOP/s in the same process"
        ratio_text = f"**model-step/peak = {r['model-step/peak']:.2f}**"
    return ["", f"{peak_text}. At {step['macs_per_image']:,} multiply-accumulates per image forward, a training "
                f"image costs {step['flops_per_image']:,} FLOPs (forward and two backward passes), so the model step "
                f"ran at {step['gflops']:.1f} GFLOP/s (the median timing); {ratio_text}. A tiny network's small "
                "convolutions, batch norm and pooling are bound by memory and per-operation overhead, not by "
                "arithmetic; hosts with AVX-512 have about twice the peak of AVX2-only hosts, so this ratio compares "
                "only hosts of one class."]


def _concurrency_lines(b: dict) -> list[str]:
    """One full epoch, and separate training processes side by side, from a bench."""
    r = b["ratios"]
    out: list[str] = []
    if "epoch_plus_test_s" in b["ours"]:
        out += ["", f"One full epoch of ours took {b['ours']['epoch_s']:.1f} s and the test pass "
                    f"{b['ours']['test_pass_s']:.1f} s."]
    if "multi_run" in b:
        rows = [("one run alone, every core", "single_run"), ("one single-thread run per core", "multi_run"),
                ("two default runs side by side", "two_runs"),
                ("one run alone, OpenMP threads spinning (ACTIVE)", "single_run_spinning")]
        out += ["", f"Separate training processes on our pipeline, timed over the same {b['multi_run']['seconds']:g} s "
                    "window (images/s summed over the processes):", "",
                "| processes | threads each | how threads wait | images/s |", "| --- | ---: | --- | ---: |"]
        for label, key in rows:
            if key in b:
                m = b[key]
                out.append(f"| {label} ({m['processes']}) | {m['threads_each']} | {_wait(m)} | "
                           f"{m['images_per_s']:,.0f} |")
        out += ["", f"**multi-run/single = {r['multi-run/single']:.2f}×** (what `--jobs` gains), **two-runs/one = "
                    f"{r['two-runs/one']:.2f}** (a second training beside a run does not collapse it)."]
        if "single_run_spinning" in b:
            gain = b["single_run_spinning"]["images_per_s"] / b["single_run"]["images_per_s"] - 1
            if gain > 0:  # the default wait costs a lone run something
                out += ["", f"The default wait is not free: with threads that spin without limit a run alone went "
                            f"{gain:.0%} faster. It is the default because threads of two processes that spin on the "
                            "same cores starve each other: then two runs together do a fraction of the work of one. "
                            "Set `OMP_WAIT_POLICY=ACTIVE` before starting tinymnist on a machine that trains one run "
                            "at a time and does nothing else."]
            else:
                out += ["", f"With `OMP_WAIT_POLICY=ACTIVE` a run alone ran at {1 + gain:.2f}× the speed it had with "
                            "the default: PyTorch's OpenMP threads then spin without yielding and take the cores from "
                            "the C kernels' own helper threads, which wait by spinning and yielding (see kernels.py). "
                            "Leave the policy unset."]
    return out


def render_setup_time(results: Path = RESULTS) -> str:
    """How long the README's first command took from a fresh clone, install included, and where."""
    return section("setup-time", "setup_time.md.j2", fc=Records(results).first_command())


def render_codemap(results: Path = RESULTS) -> str:
    """The map of the code: every layer of the package, lowest first, with every module in it and the first sentence
    of its own docstring, so that the map changes when the code does."""
    import ast

    from ..layers import LAYERS, layer_of

    def first_sentence(path: Path) -> str:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        text = " ".join(doc.split())
        return (text.split(". ")[0].rstrip(".") + "." if text else "(no docstring)").replace("|", "/")

    root = Path(__file__).resolve().parents[1]
    start, end = markers("codemap")
    out = [start, NOTE, "", "| layer | module | what it is |", "| --- | --- | --- |"]
    for layer, role in LAYERS:
        where = root / layer
        modules = (sorted(p for p in where.glob("*.py") if p.name != "__init__.py") if where.is_dir() else
                   sorted(p for p in root.glob("*.py") if layer_of(p.stem) == layer))
        head = f"**{layer}/**: {first_sentence(where / '__init__.py')}" if where.is_dir() else f"**{layer}**: {role}"
        out.append(f"| {head} | | |")
        out.extend(f"| | `{p.relative_to(root).as_posix()}` | {first_sentence(p)} |" for p in modules)
    return "\n".join(out + ["", end])


def render_performance_first(results: Path = RESULTS) -> str:
    """What a user needs before the evidence: how long a run and a check take, what --jobs gains, and the one setting
    to leave alone; every number from the timed checks and results/bench.json."""
    r = Records(results)
    by_jobs = {t.jobs: t for t in r.timed_checks()}  # the last file of each job count, as the table reads them
    first = by_jobs[min(by_jobs)] if by_jobs else None
    most = by_jobs[max(by_jobs)] if len(by_jobs) > 1 else None
    b, spinning = r.json(BENCH_FILE), None
    if b is not None and "single_run_spinning" in b:
        spinning = {"ratio": b["single_run_spinning"]["images_per_s"] / b["single_run"]["images_per_s"],
                    "file": BENCH_FILE, "host": hardware_text(b["env"])}
    return section("performance-first", "performance_first.md.j2", first=first, most=most, spinning=spinning)


def _small_batch_lines(results: Path) -> list[str]:
    """The model step at small batches, before and after the kernels kept their own threads, from one bench run."""
    sb = Records(results).small_batches()
    return [] if sb is None else render_template("small_batches.md.j2", sb=sb).split("\n")


def _timed_checks(results: Path) -> list[str]:
    """The wall time of the same check with one job and with one per core, when both were committed."""
    timed = Records(results).timed_checks()
    if not timed:
        return []
    by_jobs = {t.jobs: t for t in timed}
    one, most = (by_jobs.get(1), by_jobs[max(by_jobs)]) if len(by_jobs) > 1 else (None, None)
    return render_template("timed_checks.md.j2", timed=timed, one=one, most=most).rstrip("\n").split("\n")
