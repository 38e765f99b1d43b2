"""results/ read once, as typed records: what the templates of pages/templates/ are written over.

A Records reads each file at most once (its cache lives as long as the Records, one `tinymnist report`), and turns
the raw JSON into frozen records that carry numbers and words the pages share (a Proof, the host's phrase), so a
template formats and never computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..fileio import read_json
from ..lab.check import CHECK_FILE, RATE_FILE, Proof, proof
from ..lab.series import STEPS, Step
from .common import RESULTS, _anchor, _kernels_text, hardware_text, seconds_per_epoch

FIRST_COMMAND = "first-command-time.json"  # scripts/time_first_command.py
SMALL_BATCHES_FILE = "bench-small-batches.json"  # tinymnist bench --small-batches
LAYERS_FILE = "bench-layers.json"  # tinymnist bench --layers
VERSIONS_DIR = "bench-chains"  # scripts/ab_steps.py: versions of the code taking turns on one host
WRITEUPS_FILE = "writeups.json"  # published networks of this assignment, rebuilt and checked: the claim beside ours


@dataclass(frozen=True)
class FirstCommand:
    """The README's first command, timed from a fresh clone by scripts/time_first_command.py."""

    file: str
    minutes: int
    seconds: int
    host: str
    python: str
    data_from_dir: bool  # MNIST read from TINYMNIST_DATA, not downloaded


@dataclass(frozen=True)
class Speed:
    """One setting of a small-batch row: images per second, and the fraction of the measured peak."""

    images_per_s: float
    fraction_of_peak: float


@dataclass(frozen=True)
class SmallBatchRow:
    recipe: str
    model: str
    batch_size: int
    one_thread_before: Speed
    one_thread: Speed
    before: Speed
    after: Speed
    one_before: float  # after / before at 1 thread
    after_before: float  # at the row's thread count
    threads_one: float


@dataclass(frozen=True)
class SmallBatches:
    """tinymnist bench --small-batches: each recipe's model step at each batch size, at 1 and n threads, its kernels
    layer by layer (before) and as one program (after)."""

    file: str
    host: str
    threads: int
    steps: int
    repeats: int
    rows: tuple[SmallBatchRow, ...]


@dataclass(frozen=True)
class LayerTime:
    layer: str
    forward_ms: float
    backward_ms: float
    gflops: Optional[float]  # a convolution's; None for a layer without multiply-adds
    of_peak: Optional[float]


@dataclass(frozen=True)
class LayerRow:
    """One thread count of tinymnist bench --layers: the step, its layers, the rest, and the measured peak."""

    threads: int
    step_ms: float
    leaves_ms: float
    rest_ms: float
    gemm_peak_gflops: float
    leaves: tuple[LayerTime, ...]

    def heaviest(self, n: int) -> tuple[LayerTime, ...]:
        return tuple(sorted(self.leaves, key=lambda l: -(l.forward_ms + l.backward_ms))[:n])


@dataclass(frozen=True)
class LayerTimes:
    """tinymnist bench --layers: where a step of one recipe at one batch size goes, at each thread count."""

    file: str
    host: str
    recipe: str
    model: str
    batch_size: int
    steps: int
    repeats: int
    rows: tuple[LayerRow, ...]


@dataclass(frozen=True)
class VersionCell:
    """One version at one thread count in an A/B: its median images/s, and the median of its round-by-round ratios to
    the first version's (also per GFLOP/s of the matrix multiply measured right after each timing)."""

    tree: str
    threads: int
    images_per_s: float
    ratio: float
    ratio_per_gflops: float


@dataclass(frozen=True)
class VersionAB:
    """scripts/ab_steps.py: versions of the code, each a checkout at a commit, taking turns on one host."""

    file: str
    host: str
    unit: str  # what one measurement timed
    step: str
    model: str
    batch_size: int
    rounds: int
    trees: tuple[tuple[str, str], ...]  # (name, short commit), the first the baseline
    cells: tuple[VersionCell, ...]
    two_over_one: tuple[tuple[str, float], ...]  # (name, its images/s at the most threads over the fewest)
    thread_range: tuple[int, int]  # the fewest and the most threads measured

    @property
    def base(self) -> str:
        return self.trees[0][0]


def rate_cell(pr: Proof, wide: Optional[Proof] = None) -> str:
    """A step's pass rate as the tables show it: k of n seeds and the rate's 95% lower bound, from its widest check."""
    best = wide or pr
    text = f"{best.passes} of {best.seeds} (≥ {best.rate_bound:.2f})"
    if wide is not None:
        text += ": **reliable**" if wide.reliable else ": not reliable"
    return text


@dataclass(frozen=True)
class StepCheck:
    """A step's committed 5-seed test check, and its pass-rate check over seeds 0-19 when there is one."""

    step: str
    role: str
    anchor: str  # of its section in docs/series.md
    file: str
    plot: str
    model: str
    params: int
    epochs: int
    teacher: Optional[tuple[str, int]]  # a distilled step's teacher (step, epochs), which trained first in each run
    metric: str
    seeds: int
    threshold: float
    proof: Proof
    wide: Optional[Proof]  # the pass-rate check's
    wide_file: Optional[str]

    @property
    def rate_cell(self) -> str:
        return rate_cell(self.proof, self.wide)


@dataclass(frozen=True)
class TimedCheck:
    """One check timed with a given number of jobs (results/check-<step>-jobs<N>.json)."""

    file: str
    step: str
    epochs: int
    seeds: int
    jobs: int
    threads_per_run: int
    wall_min: float
    per_epoch_s: float  # the median over its runs' epochs (seconds_per_epoch)
    host: str
    kernels: str  # in words
    by_epochs: bool  # handed to the workers epoch by epoch (evidence from before the field: whole runs)


@dataclass(frozen=True)
class Screened:
    """One candidate of a screen: its objective on the screen's seeds (the mean of the last epochs' validation
    accuracy), and its 5-seed validation check when it was confirmed."""

    name: str
    params: int
    changes: str
    objective: float
    mean_worst: Optional[float]  # of its 5-seed confirmation
    worst: Optional[float]
    earned: bool  # it cleared the gate: a look at test


@dataclass(frozen=True)
class ScreenRecord:
    """A committed screen (results/screen-<name>/screen.json)."""

    name: str
    step: str
    max_params: int
    seeds: int
    done: bool
    ranked: tuple[Screened, ...]  # best first; candidates not screened yet are left out
    gate_mean_worst: Optional[float]  # the yardstick's mean of the seeds' worsts plus its margin
    gate_worst: Optional[float]

    @property
    def earned(self) -> bool:
        return any(c.earned for c in self.ranked)

    @property
    def best_confirmed(self) -> Optional[Screened]:
        confirmed = [c for c in self.ranked if c.mean_worst is not None]
        return max(confirmed, key=lambda c: c.mean_worst) if confirmed else None


@dataclass(frozen=True)
class Writeup:
    """A published network rebuilt from its write-up (results/writeups.json) and, when checked, our check of it."""

    writeup: str  # the write-up's file name
    section: str
    models_file: str
    cls: str
    claimed: dict  # params, test_acc, consistency (quoted), runs
    evidence: str  # the check's file under results/
    check: Optional[dict]  # that check's raw evidence (None: not checked yet)
    proof: Optional[Proof]


class Records:
    """results/ as typed records, each file read at most once."""

    def __init__(self, root: Path = RESULTS):
        self.root = Path(root)
        self._json: dict[str, Optional[dict]] = {}

    def json(self, name: str) -> Optional[dict]:
        """A results file's JSON (name relative to results/), or None when it is not there; read once."""
        if name not in self._json:
            path = self.root / name
            self._json[name] = read_json(path) if path.is_file() else None
        return self._json[name]

    def first_command(self) -> Optional[FirstCommand]:
        t = self.json(FIRST_COMMAND)
        if t is None:
            return None
        minutes, seconds = divmod(round(t["seconds"]), 60)
        return FirstCommand(FIRST_COMMAND, minutes, seconds, hardware_text(t), t["python"], t["data"].startswith("from"))

    def small_batches(self) -> Optional[SmallBatches]:
        b = self.json(SMALL_BATCHES_FILE)
        if b is None:
            return None

        def speed(cell: dict) -> Speed:
            return Speed(cell["images_per_s"], cell["fraction_of_peak"])

        rows = tuple(SmallBatchRow(r["recipe"], r["model"], r["batch_size"], speed(r["one_thread_before"]),
                                   speed(r["one_thread"]), speed(r["before"]), speed(r["after"]), r["one/before"],
                                   r["after/before"], r["threads/one"]) for r in b["rows"])
        return SmallBatches(SMALL_BATCHES_FILE, hardware_text(b["env"]), b["rows"][0]["threads"], b["steps"],
                            b["repeats"], rows)

    def layer_times(self) -> Optional[LayerTimes]:
        b = self.json(LAYERS_FILE)
        if b is None:
            return None
        rows = tuple(LayerRow(r["threads"], r["step_ms"], r["leaves_ms"], r["rest_ms"], r["gemm_peak_gflops"],
                              tuple(LayerTime(l["layer"], l["forward_ms"], l["backward_ms"], l["gflops"], l["of_peak"])
                                    for l in r["leaves"])) for r in b["rows"])
        return LayerTimes(LAYERS_FILE, hardware_text(b["env"]), b["recipe"], b["model"], b["batch_size"], b["steps"],
                          b["repeats"], rows)

    def versions(self) -> list[VersionAB]:
        """Every A/B of versions under results/bench-chains/, oldest baseline first (then by name)."""
        out = []
        for path in sorted((self.root / VERSIONS_DIR).glob("*.json")):
            b = self.json(f"{VERSIONS_DIR}/{path.name}")
            trees = tuple((name, t["commit"][:7]) for name, t in b["trees"].items())
            base = trees[0][0]
            cells = tuple(VersionCell(key.split("@")[0], int(key.split("@")[1]), v["median_images_per_s"],
                                      v[f"paired_ratio_to_{base}"], v[f"paired_ratio_per_gflops_to_{base}"])
                          for key, v in b["summary"].items() if "@" in key)
            two = tuple((key.split(":")[0], v) for key, v in b["summary"].items() if key.endswith(" threads"))
            threads = sorted({int(key.split("@")[1]) for key in b["summary"] if "@" in key})
            unit = f"{b['steps']} steps on one fixed batch" if b.get("steps") else b["unit"]
            step_model = {st.name: st.config.model for st in STEPS}.get(b["step"], "the step's own network")
            model = b["model"] or next(iter(b.get("models", {}).values()), step_model)
            out.append(VersionAB(f"{VERSIONS_DIR}/{path.name}", hardware_text(b["env"]),
                                 unit, b["step"], model, b["batch_size"], b["rounds"], trees, cells, two,
                                 (threads[0], threads[-1])))
        return out

    def check(self, step: Step) -> Optional[StepCheck]:
        name = CHECK_FILE.format(step=step.name)
        ev = self.json(name)
        if ev is None:
            return None
        wide_name = RATE_FILE.format(step=step.name)
        wide = self.json(wide_name)
        teacher = (ev["teacher"]["step"], ev["teacher"]["epochs"]) if ev.get("teacher") else None
        return StepCheck(step.name, step.role, _anchor(step.heading), name, str(Path(name).with_suffix(".png")),
                         ev["model"], ev["params"], ev["epochs"], teacher, ev.get("metric", "test_acc"),
                         len(ev["seeds"]), ev["threshold"], proof(ev), proof(wide) if wide else None,
                         wide_name if wide else None)

    def timed_checks(self) -> list[TimedCheck]:
        """The same check timed with one job and with one per core, in file order."""
        out = []
        for path in sorted(self.root.glob("check-*-jobs*.json")):
            ev = self.json(path.name)
            kernels = ev.get("trained", {}).get("kernels", "native")  # evidence from before the field: PyTorch's
            out.append(TimedCheck(path.name, ev["step"], ev["epochs"], len(ev["seeds"]), ev["jobs"],
                                  ev["threads_per_run"], ev["wall_s"] / 60,
                                  seconds_per_epoch([x["history"] for x in ev["seeds"]]), hardware_text(ev["env"]),
                                  _kernels_text(kernels, ev["env"].get("kernel_ops")), ev.get("handed_out") == "epochs"))
        return out

    def screens(self) -> list[ScreenRecord]:
        """Every committed screen, by name."""
        out = []
        for path in sorted(self.root.glob("screen-*/screen.json")):
            sc = self.json(f"{path.parent.name}/screen.json")
            confirmed = {c["name"]: c for c in sc["confirmed"]}
            rows = {r["name"]: r for r in sc["candidates"]}
            ranked = []
            for name in sc["ranked"]:
                r, c = rows[name], confirmed.get(name, {})
                changes = ", ".join(f"{k}={v}" for k, v in r["changes"].items() if k != "layout")
                ranked.append(Screened(name, r["params"], changes, r["objective"], c.get("mean_worst"), c.get("worst"),
                                       bool(c.get("earns_test_look"))))
            yard = sc.get("yardstick") or {}
            gate = (yard["mean_worst"] + sc.get("margin_spreads", 0) * yard["seed_spread"]) if yard else None
            out.append(ScreenRecord(sc["screen"], sc["step"], sc["max_params"], sc["seeds"], sc.get("done", True),
                                    tuple(ranked), gate, yard.get("worst")))
        return out

    def writeups(self) -> list[Writeup]:
        return [Writeup(Path(e["writeup"]).name, e["section"], e["models_file"], e["class"], e["claimed"],
                        e["evidence"], ev, proof(ev) if ev else None)
                for e in (self.json(WRITEUPS_FILE) or []) for ev in [self.json(e["evidence"])]]

    def checks(self) -> list[StepCheck]:
        """Every step of the series with a committed check, in the series' order."""
        return [c for c in map(self.check, STEPS) if c is not None]

    def smallest(self) -> tuple[Optional[StepCheck], Optional[StepCheck]]:
        """(the smallest step whose test check passed over every seed, the smallest reliable step), or None."""
        rows = sorted((c for c in self.checks() if c.metric == "test_acc"), key=lambda c: (c.params, c.step))
        five = next((c for c in rows if c.proof.passed), None)
        reliable = next((c for c in rows if c.wide is not None and c.wide.reliable), None)
        return five, reliable
