"""The command line: usage errors are one line with exit code 2; user errors one line with exit code 1."""

import json
from pathlib import Path
import subprocess
import sys

import pytest

from tinymnist.cli import main


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse exits for --help and usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, needle", [
    (["train", "--model", "Nope"], "invalid choice: 'Nope' (choose from Model_1, "),
    (["train", "--epochs", "0"], "expected a positive integer, got 0"),
    (["train", "--epochs", "ten"], "expected a positive integer, got 'ten'"),
    (["train", "--lr", "-1"], "expected a positive number"),
    (["train", "--dropout", "1.5"], "expected a number in [0, 1)"),
    (["train", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["train", "--distill", "0"], "expected a number in (0, 1]"),
    (["check", "--distill-temp", "0"], "expected a positive number"),
    (["summary", "Model_99"], "invalid choice: 'Model_99'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
])
def test_usage_errors_are_one_line_exit_2(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_help_shows_defaults(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0 and "(default: auto)" in out and "(default: 0)" in out


def test_models_lists_every_model_with_its_size(capsys):
    from tinymnist.models.model import create_model, list_models

    code, out, _ = run(capsys, "models")
    assert code == 0
    for name in list_models():
        assert f"{create_model(name).num_params():,} params" in out


def test_summary_prints_rows_and_totals(capsys):
    code, out, _ = run(capsys, "summary", "Model_6")
    assert code == 0 and "Conv2d-1" in out and "Total params: 7,432" in out and "Receptive field" in out


def test_offline_empty_data_dir_is_one_line_and_leaves_nothing(tmp_path):
    data = tmp_path / "empty"
    data.mkdir()
    env = {"PATH": "/usr/bin:/bin", "TINYMNIST_MIRRORS": "http://127.0.0.1:9/,https://127.0.0.1:9/",
           "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "tinymnist.cli", "train", "--data-dir", str(data), "--no-progress",
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "train-images-idx3-ubyte.gz" in lines[0] and str(data) in lines[0] and "127.0.0.1:9" in lines[0]
    assert list(data.iterdir()) == []


def test_corrupt_data_is_one_line(tmp_path, capsys):
    from conftest import synthetic_mnist

    synthetic_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    code, _, err = run(capsys, "train", "--data-dir", str(tmp_path), "--no-progress", "--out", str(tmp_path / "r"))
    assert code == 1 and "t10k-images-idx3-ubyte.gz" in err and len(err.strip().splitlines()) == 1


def test_train_smoke_on_synthetic_data(tmp_path, capsys):
    from conftest import synthetic_mnist

    synthetic_mnist(tmp_path / "d", n_train=256, n_test=64)
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--model", "Model_6", "--epochs", "2", "--batch-size", "64",
                            "--data-dir", str(tmp_path / "d"), "--out", str(out), "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "curves.png", "history.json", "model.pt"]
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert set(history[0]) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"}
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"]["model"] == "Model_6" and meta["params"] == 7432 and meta["seed"] == 0
    assert meta["env"]["torch"] and meta["env"]["device"] == "cpu"
    assert "Test set: Average loss:" in stdout


def test_a_closed_pipe_ends_quietly():
    """`tinymnist experiments | head -1`: the reader leaves before the writer is done; no traceback, SIGPIPE's code."""
    p = subprocess.Popen([sys.executable, "-m", "tinymnist.cli", "experiments"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # before the interpreter has started, so the first write meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and err == "", err


def test_resume_finishes_a_stopped_run_as_if_it_never_stopped(tmp_path, capsys):
    from conftest import synthetic_mnist
    from tinymnist.core.config import TrainConfig
    from tinymnist.core.runs import STATE_FILE, train_run

    synthetic_mnist(tmp_path / "d", n_train=256, n_test=64)
    cfg = TrainConfig(model="Model_6", epochs=3, batch_size=64, dropout=0.1, ema=0.9)
    common = dict(data_dir=str(tmp_path / "d"), device="cpu", progress=False, verbose=False, threads=1)
    _, straight = train_run(cfg, out=tmp_path / "straight", **common)
    train_run(cfg, out=tmp_path / "stopped", until=1, **common)  # what a Ctrl-C after epoch 1 leaves
    stopped = tmp_path / "stopped"
    assert sorted(p.name for p in stopped.iterdir()) == ["config.json", "history.json", STATE_FILE]
    code, out, err = run(capsys, "resume", str(stopped), "--data-dir", str(tmp_path / "d"), "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in stopped.iterdir()) == ["config.json", "curves.png", "history.json", "model.pt"]
    resumed = json.loads((stopped / "history.json").read_text())
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed) == strip(straight) and f"{straight[-1]['test_acc']:.2f}%" in out
    # and every way it cannot go on is one line, exit 1, with nothing changed
    code, _, err = run(capsys, "resume", str(stopped))
    assert code == 1 and "finished; there is nothing to resume" in err and err.count("\n") == 1
    code, _, err = run(capsys, "resume", str(tmp_path / "nowhere"))
    assert code == 1 and "not a run directory" in err and err.count("\n") == 1
    train_run(cfg, out=tmp_path / "other", until=1, **common)
    (tmp_path / "other" / STATE_FILE).write_bytes(b"not a state")
    code, _, err = run(capsys, "resume", str(tmp_path / "other"))
    assert code == 1 and "not a tinymnist resume state" in err and err.count("\n") == 1
    train_run(TrainConfig(model="Model_6", epochs=3, batch_size=32), out=tmp_path / "mixed", until=1, **common)
    (tmp_path / "mixed" / STATE_FILE).write_bytes((tmp_path / "straight" / "model.pt").read_bytes())
    code, _, err = run(capsys, "resume", str(tmp_path / "mixed"))
    assert code == 1 and "not a tinymnist resume state" in err
    train_run(cfg, out=tmp_path / "a", until=1, **common)
    train_run(TrainConfig(model="Model_6", epochs=3, batch_size=32), out=tmp_path / "b", until=1, **common)
    (tmp_path / "b" / STATE_FILE).write_bytes((tmp_path / "a" / STATE_FILE).read_bytes())
    code, _, err = run(capsys, "resume", str(tmp_path / "b"))
    assert code == 1 and "saved by a different recipe" in err
    assert json.loads((tmp_path / "b" / "history.json").read_text())[0]["epoch"] == 1  # untouched


@pytest.mark.parametrize("verb", ["train", "check"])
def test_recipe_options_are_generated_from_the_config(capsys, verb):
    """Every TrainConfig field marked for the CLI is an option with its help and choices, written once; the help of
    --kernels names every operation the C kernels run."""
    import dataclasses

    from tinymnist.core.config import TrainConfig
    from tinymnist.accel.kernels import OPS

    code, out, _ = run(capsys, verb, "--help")
    flat = " ".join(out.split())
    marked = [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli")]
    assert {f.name for f in marked} >= {"epochs", "lr", "optimizer", "kernels", "val", "layout"}
    for f in marked:
        assert "--" + f.name.replace("_", "-") in out
        for choice in f.metadata.get("choices") or ():
            assert choice in out
    assert all(op in flat for op in OPS)


def test_reproduce_trains_steps_in_parallel_and_regenerates_the_pages(tmp_path, capsys):
    import shutil

    from conftest import synthetic_mnist

    root = Path(__file__).resolve().parents[1]
    synthetic_mnist(tmp_path / "d", n_train=64, n_test=32)
    shutil.copytree(root / "docs", tmp_path / "site" / "docs")
    shutil.copy(root / "README.md", tmp_path / "site" / "README.md")
    shutil.copytree(root / "spaces", tmp_path / "spaces")
    results = tmp_path / "results"
    code, out, err = run(capsys, "reproduce", "--only", "setup", "skeleton", "--jobs", "2", "--threads", "1",
                         "--results", str(results), "--root", str(tmp_path / "site"), "--runs", str(tmp_path / "runs"),
                         "--data-dir", str(tmp_path / "d"), "--no-progress")
    assert code == 0, err
    assert "reproduce: 2 steps, 2 at a time with 1 thread(s) each" in out
    for step in ("setup", "skeleton"):
        assert f"{step}: best test" in out and (results / step / "history.json").is_file()
    series = (tmp_path / "site" / "docs" / "series.md").read_text()
    assert "](../results/setup/curves.png)" in series and "docs/series.md: experiments" in out


def test_a_validation_run_reports_validation_and_plots_it_and_never_reads_the_test_set(tmp_path, capsys):
    from conftest import synthetic_mnist

    synthetic_mnist(tmp_path / "d", n_train=192, n_test=32)
    assert main(["train", "--epochs", "2", "--batch-size", "32", "--val", "32", "--data-dir", str(tmp_path / "d"),
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("best validation accuracy") and "the test set is not read" in last
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [sorted(r) for r in history] == [sorted(["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                                                     "seconds"])] * 2
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


def test_a_one_cycle_that_cannot_warm_up_is_one_line_and_leaves_no_run(tmp_path, capsys):
    from conftest import synthetic_mnist

    synthetic_mnist(tmp_path / "d", n_train=128, n_test=32)  # 4 batches of 32: PyTorch's warm-up would end at step 0
    code, _, err = run(capsys, "train", "--epochs", "1", "--batch-size", "32", "--data-dir", str(tmp_path / "d"),
                       "--out", str(tmp_path / "run"), "--no-progress")
    assert code == 1 and err.count("\n") == 1 and "cannot warm up over 0.25 x 4 batches" in err
    assert not (tmp_path / "run").exists()


def test_a_teacher_that_is_no_step_is_one_line_and_no_run_directory(tmp_path, capsys):
    from conftest import synthetic_mnist

    synthetic_mnist(tmp_path / "data", n_train=64, n_test=32)
    code, out, err = run(capsys, "train", "--teacher", "nobody", "--epochs", "1", "--out", str(tmp_path / "run"),
                         "--data-dir", str(tmp_path / "data"), "--no-progress")
    assert code == 1 and "unknown step 'nobody'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("step", [None, "plain-7000"])  # the answer (GELU after every batch norm), and ReLU
def test_a_step_trains_the_same_history_and_weights_at_1_and_2_threads(tmp_path, capsys, step):
    """Every batch norm (whatever activation follows it) and every conv trains on the C kernels, which sum over fixed
    slices of the batch: `train` at --threads 1 and 2 gives one history and bit-identical weights, so an installed
    package with no results/ trains the check's own seed 0 at any thread count."""
    import torch
    from conftest import synthetic_mnist
    from tinymnist.accel.kernels import library

    if library()[0] is None:
        pytest.skip("no C compiler here: the kernels do not run")
    synthetic_mnist(tmp_path / "d", n_train=640, n_test=64)
    common = ("train", "--epochs", "2", "--data-dir", str(tmp_path / "d"), "--no-progress",
              *(("--step", step) if step else ()))
    for threads in ("1", "2"):
        code, out, err = run(capsys, *common, "--threads", threads, "--out", str(tmp_path / threads))
        assert code == 0 and "depend on the thread count" not in err, err
    configs = [json.loads((tmp_path / t / "config.json").read_text()) for t in ("1", "2")]
    assert [c["env"]["threads"] for c in configs] == [1, 2] and configs[0]["config"]["kernels"] == "fused"
    one, two = ([{k: v for k, v in r.items() if k != "seconds"} for r in
                 json.loads((tmp_path / t / "history.json").read_text())] for t in ("1", "2"))
    assert one == two and len(one) == 2
    a, b = (torch.load(tmp_path / t / "model.pt", weights_only=True)["state_dict"] for t in ("1", "2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_on_pytorchs_own_ops_says_its_history_is_that_of_its_thread_count(tmp_path, capsys):
    from conftest import synthetic_mnist

    synthetic_mnist(tmp_path / "d", n_train=128, n_test=32)
    common = ("train", "--epochs", "1", "--data-dir", str(tmp_path / "d"), "--no-progress", "--kernels", "native",
              "--limit-batches", "1")
    code, _, err = run(capsys, *common, "--threads", "2", "--out", str(tmp_path / "two"))
    assert code == 0 and "depend on the thread count: its history is the one of 2 threads" in err
    assert err.count("\n") == 1
    code, _, err = run(capsys, *common, "--threads", "1", "--out", str(tmp_path / "one"))
    assert code == 0 and "thread count" not in err


def test_check_reuse_trains_only_the_missing_seeds_and_refuses_another_host(tmp_path, capsys):
    from conftest import synthetic_mnist

    synthetic_mnist(tmp_path / "d", n_train=128, n_test=32)
    common = ("check", "final", "--epochs", "1", "--last", "1", "--limit-batches", "1", "--jobs", "1",
              "--data-dir", str(tmp_path / "d"), "--no-progress", "--runs", str(tmp_path / "runs"))
    run(capsys, *common, "--seeds", "2", "--json", str(tmp_path / "two.json"))
    code, out, err = run(capsys, *common, "--seeds", "3", "--reuse", str(tmp_path / "two.json"),
                         "--json", str(tmp_path / "three.json"))
    assert "seed(s) 0, 1 taken from an earlier check" in out and "1 seeds to train" in out, err
    two, three = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "three.json"))
    assert three["reused"]["seeds"] == [0, 1] and three["reused"]["file"] == "two.json"
    assert [s["seed"] for s in three["seeds"]] == [0, 1, 2] and three["seeds"][:2] == two["seeds"]
    assert len(list((tmp_path / "runs").glob("check-final-seed*"))) == 3  # seeds 0 and 1 trained once
    (tmp_path / "sub").mkdir()  # evidence in another folder names the file it reused by the path from there
    run(capsys, *common, "--seeds", "2", "--reuse", str(tmp_path / "two.json"), "--json", str(tmp_path / "sub" / "a.json"))
    assert json.loads((tmp_path / "sub" / "a.json").read_text())["reused"]["file"] == "../two.json"
    other = dict(two, env={**two["env"], "hardware": {**two["env"]["hardware"], "cpu_model": "Some Other CPU"}})
    (tmp_path / "other.json").write_text(json.dumps(other))
    for bad, why in (("other.json", "trained on another kind of host"), ("missing.json", "not a check's evidence")):
        code, out, err = run(capsys, *common, "--seeds", "3", "--reuse", str(tmp_path / bad))
        assert code == 1 and why in err and err.count("\n") == 1 and "Traceback" not in err
