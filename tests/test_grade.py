"""`tinymnist grade`: a class's own logs judged by the rules, claims checked, strangers' code run apart."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import pytest
from nbformat import v4

from tinymnist.cli import main
from tinymnist.apps.grade import accuracies, find_claim, grade, judge_claim, judge_log, pick_log, Log

ROOT = Path(__file__).resolve().parents[1]
CLASS = ROOT / "examples" / "class"
TIMEOUT = "5"  # seconds: what docs/class/grades.md was graded with (scripts/grade_example_class.sh)


# ---------------------------------------------------------------- the log forms


@pytest.mark.parametrize("text, form", [
    ("Test set: Average loss: 0.0195, Accuracy: 9954/10000 (99.54%)\n", "pytorch/examples"),
    ("EPOCH: 3\nVal Accuracy:  9954/10000 | Percent: 99.54%\n", "correct/total | percent"),
    ("test:  50%|█████     | 40/79 [00:01<00:01, test_acc=99.31]\rtest: 100%|██████████| 79/79 [00:02<00:00, "
     "test_acc=99.54]\n", "tqdm postfix"),
    ("Train Accuracy: 98.70%\nTest Accuracy: 99.54%\n", "test accuracy: N%"),
    ("    epoch  train_loss  test_acc\n0       1      0.2100     99.54\n", "a printed table"),
    ("| Epoch | Train Acc | Test Acc |\n|---|---|---|\n| 1 | 98.1 | 99.54 |\n", "a printed table"),
])
def test_each_log_form_is_read_as_the_epochs_test_accuracy(text, form):
    assert accuracies(text) == [(99.54, form)]


def test_a_tqdm_bar_counts_once_and_a_training_accuracy_never():
    bar = "".join(f"\rtest: {p}%|██| [00:01, test_acc={99 + p / 1000:.3f}]" for p in (10, 50, 100)) + "\n"
    assert accuracies("Loss=0.05 Batch_id=468 Accuracy=98.76: 100%|████| 469/469\n" + bar) == [(99.1, "tqdm postfix")]


def test_the_last_complete_log_is_graded_and_a_later_lone_print_is_not_an_epoch():
    found = [Log(3, (98.0, 98.5, 98.9), "f", False), Log(4, (99.0,) * 15, "f", True), Log(6, (99.42,), "f", True)]
    log, note = pick_log(found)
    assert log.cell == 4 and "2 logs (cells 3, 4): graded the last complete one, cell 4" in note
    assert "cell 6 prints 99.42% once more after the log: not counted as an epoch" in note
    assert pick_log([]) == (None, "no log found: the notebook holds no saved output with a test accuracy per epoch")


@pytest.mark.parametrize("accs, verdict, why", [
    ([99.5] * 15, "PASS", ""),
    ([99.5] * 10 + [99.36] + [99.5] * 4, "FAIL", "epoch 11 logs 99.36%"),
    ([99.5] * 3, "FAIL", "3 epochs logged: fewer than the rule's last 5"),
    ([99.5] * 16, "FAIL", "16 epochs: more than 15"),
])
def test_the_rules_on_one_logged_run(accs, verdict, why):
    rules, got, reason = judge_log(7000, accs)
    assert (got, reason) == (verdict, why) and len(rules) == 3
    assert judge_log(8000, [99.5] * 15)[2] == "8,000 parameters: not < 8,000"


def test_a_claim_is_held_to_the_log():
    log = [99.0] * 10 + [99.36, 99.41, 99.42, 99.45, 99.52]
    title = find_claim("", "MNIST 99.52", "nb")
    assert (title.value, title.source, title.consistency) == (99.52, "the notebook's title", False)
    assert judge_claim(title, log) == "matches the last epoch of the log (its best)"
    steady = find_claim("# Result\n\nTarget: try to achieve 99.4%\n\nconsistent >99.4% from epoch 11-15\n", "", "x")
    assert steady.consistency and steady.epochs == (11, 15) and steady.source == "README"  # not the target line
    assert judge_claim(steady, log) == "does not hold: epoch 11 logs 99.36%, under the claimed 99.40%"
    assert judge_claim(find_claim("We reached 99.61% test accuracy.", "", "x"), log) == \
        "not in the log: its best epoch logs 99.52%, its last 99.52%"


# ---------------------------------------------------------------- the made-up class in examples/class


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    out = tmp_path_factory.mktemp("graded")
    shutil.copytree(CLASS, out / "class")
    from tinymnist.models.sandbox import Limits

    rows = grade([out / "class"], Limits(seconds=float(TIMEOUT)), log=lambda line: None)
    return {r.submission: r for r in rows}, out


def test_the_class_is_graded_row_by_row(graded):
    rows, _ = graded
    assert len(rows) == 10
    assert rows["alice"].verdict == "PASS" and "holds" in rows["alice"].claim_note
    assert rows["bob"].verdict == "FAIL" and rows["bob"].why == "epoch 11 logs 99.36%"
    assert rows["bob"].claim_note == "matches the last epoch of the log (its best)"
    assert rows["bob"].rf == "all 28×28 (Linear)"  # what the summary says of a Linear head, not None×None
    assert rows["bob"].log["form"] == "correct/total | percent" and rows["bob"].seed.startswith("torch.manual_seed(1)")
    assert rows["dave"].why == "11,062 parameters: not < 8,000" and "graded the last complete one" in rows["dave"].log_note
    assert "not counted as an epoch" in rows["dave"].log_note and rows["dave"].epochs == 15
    assert rows["dave"].claim_note == "not in the log: its best epoch logs 99.55%, its last 99.53%"
    assert rows["erin"].why == "20 epochs: more than 15" and rows["erin"].log["form"] == "a printed table"
    assert rows["frank"].verdict == "no log" and rows["frank"].params == 3424
    assert any("torchsummary" in n for n in rows["frank"].notes)
    assert rows["grace"].verdict == "no log" and rows["grace"].params == 4242 and "no log found" in rows["grace"].why
    assert rows["heidi"].verdict == "not graded" and "corrupt notebook" in rows["heidi"].why
    assert rows["ivan"].why == "no notebook and no models file found"


def test_a_notebook_that_imports_its_network_from_its_own_package_is_graded(graded):
    carol = graded[0]["carol"]
    assert carol.file == "carol/notebooks/train.ipynb" and carol.model == "Net" and carol.params == 4556
    assert carol.verdict == "PASS" and carol.log["form"] == "tqdm postfix" and carol.epochs == 15
    assert not any("mnist.model" in n for n in carol.notes)  # resolved inside the submission, not skipped
    assert any("`import os`" in n and "allowlist" in n for n in carol.notes)  # mnist/utils.py: not on the list


def test_the_hostile_submission_costs_only_its_row(graded):
    mallory = graded[0]["mallory"]
    assert mallory.params is None and mallory.model_note == f"its model was not graded: timed out after {TIMEOUT} s " \
                                                            "while building Net()"
    assert not Path("/tmp/tinymnist-grade-canary").exists()


def test_the_committed_class_table_is_what_grade_writes(graded, tmp_path):
    rows, out = graded
    from tinymnist.apps.grade import markdown_table, sort_rows

    page = ROOT / "docs" / "class" / "grades.md"
    table = markdown_table(sort_rows(list(rows.values())), page.with_suffix(""), page)
    assert table.replace(str(out / "class"), "examples/class") in page.read_text()
    for line in table.splitlines()[2:]:
        card = line.rsplit("](", 1)[1].rstrip(") |")
        assert (page.parent / card).is_file()


# ---------------------------------------------------------------- strangers' code


def _notebook(path: Path, cells: list[str], output: str = "") -> None:
    nb = v4.new_notebook()
    nb.cells = [v4.new_code_cell(c) for c in cells]
    if output:
        nb.cells[-1].outputs = [v4.new_output("stream", name="stdout", text=output)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))


def test_a_class_body_that_writes_a_file_and_opens_a_socket_and_an_init_that_never_returns(tmp_path, capsys):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    reached = []

    def listen():
        while not stop.is_set():
            try:
                reached.append(server.accept())
            except OSError:
                pass

    stop = threading.Event()
    listener = threading.Thread(target=listen)
    listener.start()
    marker = tmp_path / "written-by-the-class-body"
    body = (f"import torch\nimport torch.nn as nn\n\nclass Net(nn.Module):\n"
            f"    try:\n        open({str(marker)!r}, 'w').write('x')\n    except Exception:\n        pass\n"
            f"    try:\n        _fd = torch.os.open({str(marker)!r}, torch.os.O_CREAT | torch.os.O_WRONLY)\n"
            f"        torch.os.write(_fd, b'x')\n    except Exception:\n        pass\n"
            f"    try:\n        torch.os.system('touch {marker}')\n    except Exception:\n        pass\n"
            f"    try:\n        __import__('socket').create_connection(('127.0.0.1', {port}), timeout=1)\n"
            f"    except Exception:\n        pass\n"
            f"    try:\n        torch.multiprocessing.reductions.socket.create_connection(('127.0.0.1', {port}), 1)\n"
            f"    except Exception:\n        pass\n"
            "    def __init__(self):\n        super().__init__()\n        while True:\n            pass\n\n"
            "class Small(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
            "        self.c = nn.Conv2d(1, 10, 28)\n    def forward(self, x):\n        return self.c(x).flatten(1)\n")
    _notebook(tmp_path / "sub" / "evil.ipynb", [body, "model = Net()"],
              "".join(f"Test Accuracy: {99.5:.2f}%\n" for _ in range(15)))
    try:
        code = main(["grade", str(tmp_path / "sub"), "--timeout", "3", "--markdown", str(tmp_path / "t.md")])
    finally:
        stop.set()
        listener.join()
        server.close()
    out = capsys.readouterr().out
    assert code == 0 and "graded 1 files" in out
    card_text = (tmp_path / "t" / "sub--sub-evil.ipynb.md").read_text()
    if "an empty root" in card_text:  # chroot: no path outside the child's empty directory exists for it
        assert not marker.exists()
    else:  # no chroot on this host: a file may be created, but never written to
        assert not marker.exists() or marker.stat().st_size == 0
    assert not reached  # no connection, neither from this process nor from the child
    card = (tmp_path / "t" / "sub--sub-evil.ipynb.md").read_text()
    assert "`Net` timed out after 3 s while building Net()" in card and "`Small` 7,850 parameters" in card
    assert "no network" in card and "no file writes" in card


def test_a_failing_import_in_a_submission_is_one_line_and_the_model_is_still_graded(tmp_path):
    _notebook(tmp_path / "s" / "a.ipynb", ["import os, subprocess\nfrom torchsummary import summary\n"
                                           "import torch.nn as nn\nclass Net(nn.Module):\n"
                                           "    def __init__(self):\n        super().__init__()\n"
                                           "        self.c = nn.Conv2d(1, 10, 28)\n"
                                           "    def forward(self, x):\n        return self.c(x).flatten(1)\n"])
    rows = grade([tmp_path / "s"], log=lambda line: None)
    assert rows[0].params == 7850 and rows[0].verdict == "no log"
    assert [n.split(":")[0] for n in rows[0].notes] == ["skipped `import os, subprocess` (cell 1, line 1)",
                                                       "skipped `from torchsummary import summary` (cell 1, line 2)"]


def test_bad_paths_are_one_line(tmp_path, capsys):
    assert main(["grade", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file or folder" in err and "Traceback" not in err
    (tmp_path / "x.txt").write_text("hi")
    assert main(["grade", str(tmp_path / "x.txt")]) == 1
    assert "not a notebook (.ipynb), a models file (.py) or a folder" in capsys.readouterr().err


def test_grading_never_imports_the_submission_in_the_graders_process(tmp_path):
    # a models file that marks its import: the grader's own interpreter must not have it afterwards
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "model.py").write_text("import torch.nn as nn\nclass StrangersNet(nn.Module):\n    X = 1\n"
                                             "    def __init__(self):\n        super().__init__()\n"
                                             "        self.c = nn.Conv2d(1, 10, 28)\n"
                                             "    def forward(self, x):\n        return self.c(x).flatten(1)\n")
    code = ("import sys; from tinymnist.apps.grade import grade\n"
            f"rows = grade([{str(tmp_path / 's')!r}], log=lambda l: None)\n"
            "assert rows[0].params == 7850, rows[0]\n"
            "import torch.nn as nn\n"
            "assert not [c for c in nn.Module.__subclasses__() if c.__name__ == 'StrangersNet'], 'defined here'\n"
            "assert 'submission' not in sys.modules\nprint('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


# ---------------------------------------------------------------- retraining


def _small_class(root: Path) -> Path:
    for name in ("alice", "carol"):
        shutil.copytree(CLASS / name, root / "class" / name)
    return root / "class"


_RETRAIN = """
import sys, torch.nn as nn
from tinymnist.cli import main
code = main(sys.argv[1:])
# the graded classes trained in confined worker processes; none was ever defined in this one
assert not [c for c in nn.Module.__subclasses__() if c.__module__.startswith(("submission", "tinymnist_user"))]
sys.exit(code)
"""


def test_retrain_checks_the_rows_that_pass_their_log_apart_and_resumes(tmp_path):
    from conftest import synthetic_mnist

    synthetic_mnist(tmp_path / "d", n_train=256, n_test=64)
    cls = _small_class(tmp_path)
    cmd = [sys.executable, "-c", _RETRAIN, "grade", str(cls), "--retrain", "2", "--epochs", "1", "--limit-batches",
           "2", "--jobs", "2", "--state", str(tmp_path / "state"), "--data-dir", str(tmp_path / "d"),
           "--markdown", str(tmp_path / "t.md"), "--csv", str(tmp_path / "t.csv"), "--no-progress"]
    env = {**__import__("os").environ, "TINYMNIST_VERIFY": "0"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "2 rows x 2 seeds = 4 runs" in first.stdout and "0 done, 4 to train" in first.stdout
    evidence = sorted((tmp_path / "state").glob("*/check.json"))
    assert len(evidence) == 2
    for path in evidence:
        ev = json.loads(path.read_text())
        assert [s["seed"] for s in ev["seeds"]] == [0, 1] and ev["pass_rate"]["seeds"] == 2
        assert ev["models_file"]["class"] == "Net" and ev["params"] in (4556, 5832)
    rows = list(__import__("csv").DictReader((tmp_path / "t.csv").open()))
    assert {r["check_verdict"] for r in rows} == {"FAIL"} and {r["check_seeds"] for r in rows} == {"2"}
    card = next((tmp_path / "t").glob("carol*.md")).read_text()
    assert "#### Retrained with tinymnist's check" in card and "0 of 2 seeds pass" in card
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "4 done, 0 to train" in again.stdout, again.stderr


def test_two_machines_share_the_retraining_through_postgres(postgres, tmp_path):
    from conftest import synthetic_mnist

    synthetic_mnist(tmp_path / "d", n_train=512, n_test=64)
    cls = _small_class(tmp_path)
    env = {**__import__("os").environ, "TINYMNIST_VERIFY": "0"}

    def machine(name: str):
        return subprocess.Popen([sys.executable, "-c", _RETRAIN, "grade", str(cls), "--retrain", "3", "--epochs", "1",
                                 "--limit-batches", "3", "--jobs", "1", "--storage", postgres, "--no-progress",
                                 "--state", str(tmp_path / name), "--data-dir", str(tmp_path / "d")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    a, b = machine("a"), machine("b")
    (out_a, err_a), (out_b, err_b) = a.communicate(timeout=600), b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, err_a + err_b
    trained = [line for line in (out_a + out_b).splitlines() if ") seed " in line]
    assert len(trained) == 6 and len(set(trained)) == 6, trained  # every run once, shared between the two
    import optuna

    from tinymnist.lab.sweep import driver_url

    study = optuna.load_study(study_name=out_a.split(" in study ")[1].split(";")[0], storage=driver_url(postgres))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["run"] for t in done) == list(range(6))


from test_sweep import postgres  # noqa: E402,F401 - the throw-away PostgreSQL server fixture


def test_a_killed_grading_loses_only_the_run_it_was_training(tmp_path):
    import os
    import signal
    import time

    import optuna
    from conftest import synthetic_mnist

    from tinymnist.lab.sweep import driver_url

    synthetic_mnist(tmp_path / "d", n_train=2048, n_test=64)
    shutil.copytree(CLASS / "alice", tmp_path / "class" / "alice")
    cmd = [sys.executable, "-m", "tinymnist.cli", "grade", str(tmp_path / "class"), "--retrain", "2", "--epochs", "2",
           "--batch-size", "16", "--jobs", "1", "--heartbeat", "1", "--state", str(tmp_path / "state"),
           "--data-dir", str(tmp_path / "d"), "--no-progress"]
    env = {**os.environ, "TINYMNIST_VERIFY": "0"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    url = driver_url(f"sqlite:///{tmp_path / 'state' / 'retrain.db'}")
    deadline, running = time.time() + 180, []
    while time.time() < deadline and not running:
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
            running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
        except Exception:  # noqa: BLE001 - the database or the study is not there yet
            continue
    assert running, "the grading never started a run"
    os.killpg(first.pid, signal.SIGKILL)  # the grader and its confined worker, with no chance to clean up
    first.wait()
    time.sleep(2.5)  # past twice the heartbeat: the run is stale
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    states = sorted(t.state.name for t in study.trials)
    assert states.count("COMPLETE") == 2 and states.count("FAIL") == 1, states  # the killed run, and only it
    evidence = json.loads(next((tmp_path / "state").glob("*/check.json")).read_text())
    assert [s["seed"] for s in evidence["seeds"]] == [0, 1]
