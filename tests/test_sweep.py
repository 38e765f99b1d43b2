"""Sweeps on Optuna: the space file, SQLite with 2 workers, and PostgreSQL shared by 2 worker processes."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from tinymnist.cli import main  # noqa: E402
from tinymnist.errors import TinyMnistError  # noqa: E402
from tinymnist.lab.space import parse_space  # noqa: E402

from conftest import synthetic_mnist  # noqa: E402

SPACE = """
step = "final"
seeds = 1
max_params = 5000
last = 2
[fixed]
epochs = {epochs}
batch_size = 32
val = 64
[search]
lr = {{ low = 0.01, high = 0.5, log = true }}
layout = ["c4 c8 P c4/1 c8 c8 G o", "c4 c6 P c4/1 c6 c8 G o", "c8 c16 P c10/1 c16 c16 c16 G o"]
[pruner]
startup_trials = 50
"""


def write_space(path: Path, epochs: int = 2) -> Path:
    path.write_text(SPACE.format(epochs=epochs))
    return path


def trials_of(url: str, study: str):
    from tinymnist.lab.sweep import open_storage

    return optuna.load_study(study_name=study, storage=open_storage(url, None)).get_trials()


def assert_consistent(trials, want: int, epochs: int):
    from optuna.trial import TrialState

    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) >= want
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    params = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(params)) == len(params), "two complete trials with the same parameters"
    for t in done:
        assert t.user_attrs["params"] <= 5000 and t.value == min(t.user_attrs["val_worst"])
        for run in t.user_attrs["run_dirs"]:
            history = json.loads((Path(run) / "history.json").read_text())
            assert len(history) == epochs and "val_acc" in history[-1]
            assert (Path(run) / "model.pt").is_file()
    for t in trials:  # the Model_7-sized choice is over the budget: rejected before training, with no run directory
        if t.user_attrs.get("rejected"):
            assert t.state == TrialState.PRUNED and "run_dirs" not in t.user_attrs
    return done


# ---------------------------------------------------------------- the space file


@pytest.mark.parametrize("table, fragment", [
    ({"fixed": {"epochz": 3}}, "unknown recipe field 'epochz'"),
    ({"search": {"lr": {"low": 0.5, "high": 0.1}}}, "low < high"),
    ({"search": {"lr": {"low": 0, "high": 0.1, "log": True}}}, "log range needs low > 0"),
    ({"search": {"lr": "fast"}}, "expected a list of choices"),
    ({"search": {"lr": []}}, "empty list"),
    ({"fixed": {"val": 0}}, "val must be > 0"),
    ({"fixed": {"lr": 0.1}, "search": {"lr": [0.1, 0.2]}}, "both fixed and searched"),
    ({"step": "nope"}, "unknown step 'nope'"),
    ({"speed": 1}, "unknown key"),
    ({"fixed": {"layout": "c8 Q o"}}, "unknown token 'Q'"),
    ({"fixed": {"epochs": 3}, "last": 5}, "more than the 3 epochs"),
])
def test_bad_spaces_are_one_clear_error(table, fragment):
    with pytest.raises(TinyMnistError, match=fragment):
        parse_space(table)


def test_space_defaults_and_nested_aug():
    space = parse_space({"search": {"aug": {"rotate": {"low": 0.0, "high": 15.0}}, "ema": [0.99, 0.999]}})
    assert space.fixed["val"] == 10000 and space.seeds == (0,)
    cfg = space.config({"aug.rotate": 7.5, "ema": 0.99})
    assert cfg.aug.rotate == 7.5 and cfg.ema == 0.99 and cfg.val == 10000


def test_a_space_file_that_is_not_toml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "s.toml"
    bad.write_text("step = [unclosed\n")
    assert main(["sweep", str(bad), "--trials", "1", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid TOML" in err


# ---------------------------------------------------------------- SQLite: the default, two workers


def test_sqlite_sweep_with_two_workers_then_report_and_resume(tmp_path, capsys):
    synthetic_mnist(tmp_path / "d", n_train=256, n_test=64)
    space = write_space(tmp_path / "tiny.toml")
    out = tmp_path / "out"
    args = ["sweep", str(space), "--trials", "3", "--jobs", "2", "--out", str(out), "--data-dir", str(tmp_path / "d"),
            "--threads", "1"]
    assert main(args) == 0
    url = f"sqlite:///{out / 'study.db'}"
    done = assert_consistent(trials_of(url, "tiny"), 3, epochs=2)
    assert len({t.user_attrs["pid"] for t in done}) >= 1
    capsys.readouterr()

    assert main(["sweep-report", str(out), "--json", str(tmp_path / "trials.json")]) == 0
    text = capsys.readouterr().out
    assert f"#{done[0].number}" in text and "val worst" in text and "test worst" not in text
    assert (out / "tiny-history.png").stat().st_size > 0 and (out / "tiny-importances.png").stat().st_size > 0
    exported = json.loads((tmp_path / "trials.json").read_text())
    assert len(exported["trials"]) == len(done)
    assert all(exported_trial["test_worst"] is None for exported_trial in exported["trials"])
    for t in done:  # a trial's runs hold images out, so they never read the test set
        history = json.loads(Path(t.user_attrs["run_dirs"][0], "history.json").read_text())
        assert all("val_acc" in r and "test_acc" not in r and "test_loss" not in r for r in history)
    assert main(["sweep-report", str(out), "--show-test", "--plots", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("test not read") == len(done)

    before = len(trials_of(url, "tiny"))
    assert main(args[:3] + ["5"] + args[4:]) == 0  # the same command with more trials resumes the study
    after = trials_of(url, "tiny")
    assert len(after) > before
    assert_consistent(after, 5, epochs=2)


def test_sweep_report_on_nothing_is_one_line(tmp_path, capsys):
    assert main(["sweep-report", str(tmp_path)]) == 1
    assert "no study.db" in capsys.readouterr().err


def test_sweep_report_on_a_study_with_no_trial_says_so_and_draws_nothing(tmp_path, capsys):
    optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path / 'study.db'}")
    capsys.readouterr()
    assert main(["sweep-report", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[:2] == ["study empty: no trial yet", "no complete trial yet"] and err == ""
    assert not list(tmp_path.glob("*.png"))


# ---------------------------------------------------------------- PostgreSQL: a real server on loopback


def _pg_bin(name: str):
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    return found[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL server on a loopback port, run as the postgres user when we are root."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl or importlib_missing("psycopg2"):
        msg = "PostgreSQL server binaries (initdb, pg_ctl) or psycopg2 are missing"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    runas = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="tinymnist-pg-"))
    if runas:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    subprocess.run(runas + [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"], check=True,
                   capture_output=True)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(runas + [pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"], check=True,
                   capture_output=True)
    try:
        # the plain form the README shows (trust authentication accepts any password); SQLAlchemy 2.1 alone would
        # take it to psycopg 3, which the sweep extra does not install
        yield f"postgresql://postgres:pw@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(runas + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def test_two_worker_processes_share_a_postgres_study_and_survive_a_kill(postgres, tmp_path, capsys):
    from optuna.trial import TrialState

    synthetic_mnist(tmp_path / "d", n_train=1024, n_test=64)
    epochs = 4
    space = write_space(tmp_path / "pg.toml", epochs=epochs)
    env = {**os.environ, "TINYMNIST_VERIFY": "0"}
    cmd = [sys.executable, "-m", "tinymnist.cli", "sweep", str(space), "--trials", "4", "--storage", postgres,
           "--study", "shared", "--jobs", "1", "--threads", "1", "--heartbeat", "1", "--data-dir", str(tmp_path / "d")]
    # the first worker creates the study; the second joins it, as a worker on another machine would
    first = subprocess.Popen(cmd + ["--out", str(tmp_path / "a")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(cmd + ["--out", str(tmp_path / "b")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.time() + 180
    while time.time() < deadline and victim is None:  # wait until the first worker is training a trial
        time.sleep(0.3)
        try:
            running = [t for t in trials_of(postgres, "shared") if t.state == TrialState.RUNNING]
        except KeyError:  # the study does not exist yet
            continue
        for t in running:
            hist = [Path(r) / "history.json" for r in t.user_attrs.get("run_dirs", [])]
            if t.user_attrs.get("pid") == first.pid and hist and hist[0].is_file():
                victim = t.number
    assert victim is not None, "the first worker never started training a trial"
    first.send_signal(signal.SIGKILL)  # no chance to clean up: only its heartbeat stops
    first.wait()
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    # the same command again resumes: the killed trial is failed (and retried) once its heartbeat is stale, which
    # it is after twice the heartbeat; until then the command leaves it running
    deadline = time.time() + 60
    while True:
        again = subprocess.run(cmd + ["--out", str(tmp_path / "b")], env=env, capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0, again.stderr
        trials = trials_of(postgres, "shared")
        killed = next(t for t in trials if t.number == victim)
        if killed.state != TrialState.RUNNING or time.time() > deadline:
            break
    assert killed.state == TrialState.FAIL
    assert_consistent(trials, 4, epochs=epochs)
    assert main(["sweep-report", postgres, "--study", "shared", "--plots", str(tmp_path)]) == 0
    assert "study shared:" in capsys.readouterr().out


def test_unreachable_storage_is_one_line(tmp_path, capsys):
    synthetic_mnist(tmp_path / "d")
    space = write_space(tmp_path / "s.toml")
    url = f"postgresql+psycopg2://nobody:secret@127.0.0.1:{_free_port()}/none"
    assert main(["sweep", str(space), "--trials", "1", "--storage", url, "--data-dir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot open study storage" in err and "secret" not in err


# ---------------------------------------------------------------- the pruner's warm-up holds for every seed


def test_searching_epochs_is_refused():
    with pytest.raises(TinyMnistError, match="epochs cannot be searched"):
        parse_space({"search": {"epochs": [10, 15]}})


def test_pruner_warmup_holds_for_every_seed():
    """A trial far below the median is never pruned in the first warmup_epochs - 1 epochs of any seed."""
    from tinymnist.lab.sweep import _pruner

    epochs, warmup = 4, 3
    space = parse_space({"seeds": 2, "fixed": {"epochs": epochs}, "last": 2,
                         "pruner": {"startup_trials": 1, "warmup_epochs": warmup}})
    study = optuna.create_study(direction="maximize", pruner=_pruner(space))
    good = study.ask()
    for step in range(2 * epochs):
        good.report(99.0, step)
    study.tell(good, 99.0)
    bad = study.ask()
    pruned_at = []
    for step in range(2 * epochs):
        bad.report(10.0, step)
        if bad.should_prune():
            pruned_at.append(step)
    # seed 0: steps 0-3, seed 1: steps 4-7; epochs 1-2 of each seed (steps 0, 1, 4, 5) are warm-up
    assert pruned_at == [2, 3, 6, 7]


def test_a_trial_with_one_strong_seed_sets_no_higher_bar_than_its_objective():
    """The objective is the minimum over seeds: a complete trial whose seed 0 was strong and whose seed 1 ended low
    bars the others at its objective, not at its strong seed's values."""
    from tinymnist.lab.sweep import _pruner

    epochs = 4
    space = parse_space({"seeds": 2, "fixed": {"epochs": epochs}, "last": 1,
                         "pruner": {"startup_trials": 1, "warmup_epochs": 2}})
    study = optuna.create_study(direction="maximize", pruner=_pruner(space))
    lopsided = study.ask()
    for step in range(2 * epochs):
        lopsided.report(99.5 if step < epochs else 99.0, step)
    study.tell(lopsided, 99.0)  # its seed 1 ended at 99.0
    steady = study.ask()
    steady.report(99.2, 2)  # seed 0, epoch 3: below the lopsided trial's 99.5 there, above its objective
    assert not steady.should_prune()
    weak = study.ask()
    weak.report(98.5, 2)
    assert weak.should_prune()


def test_two_seed_sweep_prunes_no_trial_before_the_warmup_of_its_second_seed(tmp_path):
    from optuna.trial import TrialState

    from tinymnist.lab.sweep import create_study

    synthetic_mnist(tmp_path / "d", n_train=512, n_test=64, learnable=True)
    epochs, warmup = 3, 2
    space = tmp_path / "two.toml"
    space.write_text(f"""
step = "final"
seeds = 2
max_params = 5000
last = 1
[fixed]
epochs = {epochs}
batch_size = 32
val = 64
layout = "c4 c8 P c4/1 c8 c8 G o"
[search]
lr = [1e-6, 0.1, 0.2, 0.3]
[pruner]
startup_trials = 1
warmup_epochs = {warmup}
""")
    out = tmp_path / "out"
    # a good recipe first, then one that learns nothing: the median rule must prune the second, after warm-up
    from tinymnist.lab.space import load_space
    from tinymnist.lab.sweep import storage_url

    study = create_study(load_space(space), storage_url(None, out), "two")
    study.enqueue_trial({"lr": 0.1})
    study.enqueue_trial({"lr": 1e-6})
    assert main(["sweep", str(space), "--trials", "4", "--jobs", "1", "--threads", "1", "--out", str(out),
                 "--data-dir", str(tmp_path / "d")]) == 0
    trials = trials_of(f"sqlite:///{out / 'study.db'}", "two")
    by_median = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    assert [t.params["lr"] for t in by_median][:1] == [1e-6]
    assert by_median[0].user_attrs["pruned_at"] == {"seed": 0, "epoch": warmup, "rule": "median of min(value, objective)"}
    for t in trials:
        if t.state == TrialState.PRUNED and t.intermediate_values:
            last = max(t.intermediate_values)
            assert last % epochs >= warmup - 1, f"trial {t.number} pruned at step {last}, inside a seed's warm-up"
    # every seed-1 epoch is reported one seed's length after seed 0's, so the steps line up between trials
    for t in trials:
        assert set(t.intermediate_values) <= set(range(2 * epochs))


def test_a_sweep_stopped_with_kill_says_one_line_and_prints_no_traceback(tmp_path):
    synthetic_mnist(tmp_path / "d", n_train=2048, n_test=64)
    space = write_space(tmp_path / "k.toml", epochs=15)
    env = {**os.environ, "TINYMNIST_VERIFY": "0"}
    p = subprocess.Popen([sys.executable, "-m", "tinymnist.cli", "sweep", str(space), "--trials", "4", "--jobs", "2",
                          "--threads", "1", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "d")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120  # until both workers train a trial: trials in flight when the signal comes
    while time.time() < deadline and len(list((tmp_path / "out" / "trials").glob("*/history.json"))) < 2:
        time.sleep(0.2)
    assert len(list((tmp_path / "out" / "trials").glob("*/history.json"))) >= 2, "no trial got under way"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == "tinymnist: interrupted"
