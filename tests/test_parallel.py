"""Parallel runs: the same histories whatever the number of jobs, failures reported per run, Ctrl-C safe."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinymnist.cli import main
from tinymnist.errors import TinyMnistError
from tinymnist.core.parallel import Job, plan, run_jobs

from conftest import synthetic_mnist


# module-level, so that spawned workers can import them
def square(x):
    return x * x


def fail_on(x, bad):
    if x == bad:
        raise TinyMnistError(f"run {x} went wrong")
    return x


def die_on(x, bad):
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)
    return x


def without_time(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


@pytest.mark.parametrize("cores", [1, 2, 4, 16])
def test_plan_splits_the_cores(cores):
    assert plan(5, 0, 0, "cpu", cores=cores) == (min(5, cores), max(1, cores // min(5, cores)))
    assert plan(1, 0, 0, "cpu", cores=cores) == (1, cores)  # one run gets every core
    assert plan(5, 0, 0, "cuda", cores=cores) == (1, cores)  # a GPU is one device
    assert plan(2, 8, 1, "cpu", cores=cores) == (2, 1)  # never more workers than runs
    assert plan(5, 3, 0, "cpu", cores=cores) == (3, max(1, cores // 3))  # the user's jobs, the cores shared


def test_plan_of_two_cores_is_two_single_thread_workers_for_five_seeds():
    assert plan(5, 0, 0, "cpu", cores=2) == (2, 1)
    assert plan(5, 0, 0, "cpu", cores=16) == (5, 3)


def test_outcomes_come_back_in_order_and_each_is_reported():
    seen = []
    out = run_jobs([Job(f"x{i}", square, {"x": i}) for i in range(5)], 2, 1, on_done=seen.append, progress=False)
    assert [o.result for o in out] == [0, 1, 4, 9, 16]
    assert sorted(o.label for o in seen) == [f"x{i}" for i in range(5)]


def test_a_failing_run_is_one_line_and_the_others_finish():
    out = run_jobs([Job(f"seed {i}", fail_on, {"x": i, "bad": 2}) for i in range(4)], 2, 1, progress=False)
    assert [o.ok for o in out] == [True, True, False, True]
    assert out[2].error == "run 2 went wrong"


def test_a_killed_worker_loses_only_its_run():
    out = run_jobs([Job(f"seed {i}", die_on, {"x": i, "bad": 1}) for i in range(4)], 2, 1, progress=False)
    assert not out[1].ok and "worker process died" in out[1].error
    assert [o.result for i, o in enumerate(out) if i != 1] == [0, 2, 3]


def test_check_histories_do_not_depend_on_jobs(tmp_path):
    synthetic_mnist(tmp_path / "d", n_train=256, n_test=64)
    args = ["check", "final", "--seeds", "3", "--epochs", "2", "--last", "2", "--batch-size", "32", "--val", "32",
            "--data-dir", str(tmp_path / "d"), "--no-progress", "--threads", "1"]
    for jobs in ("1", "2"):
        assert main(args + ["--jobs", jobs, "--runs", str(tmp_path / f"runs{jobs}"),
                            "--json", str(tmp_path / f"ev{jobs}.json")]) == 1  # random data fails the rule
    one, two = (json.loads((tmp_path / f"ev{j}.json").read_text()) for j in ("1", "2"))
    assert one["jobs"] == 1 and two["jobs"] == 2 and one["metric"] == "val_acc"
    assert (one["handed_out"], two["handed_out"]) == ("runs", "epochs")
    # the evidence says what 'auto' became here
    assert one["config"]["kernels"] == "auto" and one["trained"]["kernels"] in ("fused", "native")
    assert one["trained"]["memory_format"] in ("contiguous", "channels_last")
    # with 2 jobs the runs moved between the workers epoch by epoch (resume.pt), and none is left behind
    assert not list((tmp_path / "runs2").glob("*/resume.pt")) and len(list((tmp_path / "runs2").glob("*/model.pt"))) == 3
    for a, b in zip(one["seeds"], two["seeds"]):
        assert a["seed"] == b["seed"] and without_time(a["history"]) == without_time(b["history"])
        assert "val_acc" in a["history"][0]


def test_on_the_c_kernels_a_history_does_not_depend_on_the_thread_count(tmp_path):
    # the kernels sum over fixed slices and PyTorch's remaining training ops are elementwise or small: measured on
    # the full recipe too (results/check-final-jobs*.json: 2 threads per run and 1, the same five histories)
    from tinymnist.accel.kernels import library

    if library()[0] is None:
        pytest.skip("no C compiler here: the kernels do not run")
    synthetic_mnist(tmp_path / "d", n_train=256, n_test=64)
    args = ["check", "final", "--seeds", "1", "--epochs", "2", "--last", "2", "--batch-size", "64", "--val", "32",
            "--data-dir", str(tmp_path / "d"), "--no-progress", "--jobs", "1", "--kernels", "fused"]
    for threads in ("1", "2"):
        main(args + ["--threads", threads, "--runs", str(tmp_path / f"runs{threads}"),
                     "--json", str(tmp_path / f"ev{threads}.json")])
    one, two = (json.loads((tmp_path / f"ev{t}.json").read_text()) for t in ("1", "2"))
    assert (one["threads_per_run"], two["threads_per_run"]) == (1, 2)
    assert without_time(one["seeds"][0]["history"]) == without_time(two["seeds"][0]["history"])


def test_failed_seeds_are_named_and_check_exits_non_zero(tmp_path, capsys, monkeypatch):
    # no data: every seed fails in its worker, each is named on its own line, and the command ends in one line
    monkeypatch.setenv("TINYMNIST_MIRRORS", "http://127.0.0.1:9/")  # nothing listens there: fails at once
    code = main(["check", "final", "--seeds", "2", "--epochs", "1", "--last", "1", "--data-dir", str(tmp_path / "missing"),
                 "--no-progress", "--runs", str(tmp_path / "runs"), "--jobs", "2"])
    assert code == 1
    err = capsys.readouterr()
    assert "seed 0: FAILED" in err.out and "seed 1: FAILED" in err.out
    assert err.err.strip().count("\n") == 0 and "2 of 2 runs failed" in err.err


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_ctrl_c_or_kill_stops_every_worker_with_one_line_and_leaves_no_partial_file(tmp_path, how):
    synthetic_mnist(tmp_path / "d", n_train=2048, n_test=64)
    env = {**os.environ, "TINYMNIST_VERIFY": "0"}
    p = subprocess.Popen([sys.executable, "-m", "tinymnist.cli", "check", "final", "--seeds", "4", "--jobs", "2",
                          "--epochs", "15", "--batch-size", "16", "--data-dir", str(tmp_path / "d"), "--no-progress",
                          "--runs", str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "runs").glob("*/history.json")):
        time.sleep(0.2)
    assert list((tmp_path / "runs").glob("*/history.json")), "no epoch finished in time"
    if how == "ctrl-c":
        os.killpg(p.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C: the whole process group
    else:
        p.send_signal(signal.SIGTERM)  # `kill PID` of the command alone: it must stop its workers itself
    out, err = p.communicate(timeout=60)
    deadline = time.time() + 10  # multiprocessing's resource tracker leaves on its own once its pipe closes
    while time.time() < deadline and _session_members(p.pid):
        time.sleep(0.2)
    assert not _session_members(p.pid), [Path(f"/proc/{q}/cmdline").read_bytes() for q in _session_members(p.pid)]
    assert p.returncode == 130, err
    assert err.strip() == "tinymnist: interrupted"
    assert not [f for f in tmp_path.rglob("*") if f.name.endswith(".part")]
    for h in (tmp_path / "runs").glob("*/history.json"):
        json.loads(h.read_text())  # every file on disk is whole


_STRAY_SIGTERM = """
import signal, threading, time, multiprocessing as mp
from tinymnist.core import parallel
inbox = mp.get_context("spawn").Queue()  # empty: the worker waits for its next piece
signal.signal(signal.SIGTERM, parallel._terminated)
def poke():
    time.sleep(0.3)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # the kernel may pick any thread; here, not main
threading.Thread(target=poke).start()
try:
    parallel._next_task(inbox)
except KeyboardInterrupt:
    print("stopped")
"""


def test_a_waiting_worker_stops_even_when_a_helper_thread_takes_the_sigterm():
    # a bare blocking get() would wait forever here: Python runs the handler only when the main thread runs code
    done = subprocess.run([sys.executable, "-c", _STRAY_SIGTERM], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "stopped", done.stderr


def _session_members(sid: int) -> list[int]:
    """Live processes of session `sid`: a worker orphaned by its parent's death still belongs to it."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # fields: state, ppid, pgrp, session
            out.append(int(stat.parent.name))
    return out


def _simulate(parts, workers):
    """Pieces of one time unit each, handed out as run_jobs hands them: (makespan, finish time per run)."""
    from tinymnist.core.parallel import Schedule

    schedule, t, finished = Schedule(parts, workers), 0, {}
    while not schedule.finished:
        for w in schedule.idle(range(workers)):
            if (piece := schedule.next_piece(w)) is not None:
                assert piece[1] == parts[piece[0]] - schedule.left[piece[0]]  # each run's pieces in order
                assert schedule.holding[w] == piece[0]
        assert schedule.holding, "a worker must always have something while runs are open"
        assert len(set(schedule.holding.values())) == len(schedule.holding)  # no run on two workers at once
        t += 1
        for w in sorted(schedule.holding):
            run, last = schedule.piece_done(w)
            if last:
                finished[run] = t
    return t, finished


@pytest.mark.parametrize("runs, workers", [(5, 2), (9, 2), (3, 2), (2, 2), (7, 3), (1, 2)])
def test_the_schedule_keeps_every_worker_busy_to_the_end(runs, workers):
    import math

    makespan, finished = _simulate([15] * runs, workers)
    assert makespan == max(15, math.ceil(15 * runs / workers))  # the least possible: no core idles at the end
    if runs >= 2 * workers:  # while there are enough runs, whole runs finish early, as one after another would
        assert sorted(finished.values())[:workers] == [15] * workers


def test_uneven_runs_still_finish_together():
    makespan, _ = _simulate([15, 20, 15, 15, 15, 15, 15, 15, 15], 2)
    assert makespan == 70  # 140 pieces on 2 workers


def piece(x, part, log):
    with open(log, "a") as f:
        f.write(f"{x}:{part}\n")
    if x == 2 and part == 1:
        raise TinyMnistError("run 2 broke in its second piece")
    return (x, part)


def test_pieces_run_in_order_the_last_one_is_the_result_and_a_failed_piece_ends_only_its_run(tmp_path):
    log = tmp_path / "log"
    for workers in (1, 2):
        log.write_text("")
        seen = []
        out = run_jobs([Job(f"run {x}", piece, {"x": x, "log": str(log)}, parts=3) for x in range(4)], workers, 1,
                       on_done=seen.append, progress=False)
        assert [o.result for o in out] == [(0, 2), (1, 2), None, (3, 2)]
        assert out[2].error == "run 2 broke in its second piece" and len(seen) == 4
        lines = log.read_text().split()
        for x in range(4):
            assert [line for line in lines if line.startswith(f"{x}:")] == (
                [f"{x}:0", f"{x}:1"] if x == 2 else [f"{x}:0", f"{x}:1", f"{x}:2"])


@pytest.mark.parametrize("where", ["chmod", "write", "replace"])
def test_a_stop_anywhere_inside_an_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch, where):
    # a worker's SIGTERM raises KeyboardInterrupt between any two bytecodes: after mkstemp made the file, while the
    # data is written, or at the rename; the file being written is then as it was, and no .part file is left
    import os as os_module

    from tinymnist import fileio

    target = tmp_path / "history.json"
    target.write_text("[1]\n")

    def stop(*a, **k):
        raise KeyboardInterrupt

    if where != "write":
        monkeypatch.setattr(fileio.os, where, stop)
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_path(target) as tmp:
            tmp.write_text("[1, 2]\n")
            if where == "write":
                stop()
    monkeypatch.setattr(fileio.os, "chmod", os_module.chmod)
    assert target.read_text() == "[1]\n" and [p.name for p in tmp_path.iterdir()] == ["history.json"]
