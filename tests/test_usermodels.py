"""Your own model.py: tinymnist summarises, trains, checks, explains, exports and serves plain nn.Module classes
from a file written the way this assignment's write-ups write theirs (tests/data/seed_style_models.py)."""

import json
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinymnist.cli import main
from tinymnist.errors import TinyMnistError

from conftest import synthetic_mnist

MODELS = Path(__file__).resolve().parent / "data" / "seed_style_models.py"
FAST = ["--epochs", "2", "--limit-batches", "3", "--no-progress"]


@pytest.fixture(scope="module")
def data_dir(learnable_dir):
    return learnable_dir


@pytest.fixture(autouse=True)
def _no_verify(no_verify):
    """Every test here trains on made-up data."""


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """Model_1 of the file, trained through the CLI as a student would: its run directory."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--models", str(MODELS), "--model", "Model_1", "--out", str(out),
                 "--data-dir", str(data_dir), *FAST]) == 0
    return out


def test_log_softmax_outputs_train_as_logits_do():
    """cross_entropy(log_softmax(z)) == cross_entropy(z): a forward may return either, and the loss (and with it the
    gradient) is the same, label smoothing included."""
    z = torch.randn(64, 10, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (64,))
    for smoothing in (0.0, 0.1):
        a = F.cross_entropy(z, y, label_smoothing=smoothing)
        b = F.cross_entropy(F.log_softmax(z, dim=1), y, label_smoothing=smoothing)
        assert torch.allclose(a, b)
        ga, = torch.autograd.grad(a, z)
        gb, = torch.autograd.grad(b, z)
        assert torch.allclose(ga, gb)


def test_models_lists_the_file_and_says_what_it_skipped(capsys):
    assert main(["models", "--models", str(MODELS)]) == 0
    out = capsys.readouterr().out
    assert "Model_1" in out and "Model_2" in out and "Net" in out and "skipped: its constructor needs channels" in out


def test_summary_of_a_user_model(capsys):
    assert main(["summary", "Model_1", "--models", str(MODELS)]) == 0
    out = capsys.readouterr().out
    assert "Receptive field at the output: 28x28" in out and "Total params: 4,720" in out
    assert main(["summary", "Model_2", "--models", str(MODELS)]) == 0
    assert "a Linear layer sees every pixel" in capsys.readouterr().out


def test_train_records_the_file_and_what_the_machine_gave_it(trained):
    meta = json.loads((trained / "config.json").read_text())
    cfg = meta["config"]
    assert cfg["model"] == "Model_1" and cfg["models_file"] == str(MODELS) and cfg["dropout"] is None
    assert meta["params"] == 4720 and len(json.loads((trained / "history.json").read_text())) == 2
    payload = torch.load(trained / "model.pt", weights_only=True)
    assert payload["models_file"]["class"] == "Model_1"
    assert payload["models_file"]["sha256"] == __import__("hashlib").sha256(MODELS.read_bytes()).hexdigest()
    if cfg["kernels"] == "fused":  # the plain convolutions and the 2x2 pool train in C; BN after ReLU stays PyTorch's
        applied = meta["kernels_applied"]
        assert applied["convolutions"] == {"fused": 7, "of": 7} and applied["2x2 max pools"]["fused"] == 1
        assert applied["batch norm + activation"]["fused"] == 0


def test_a_network_that_cannot_train_in_channels_last_trains_contiguous(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--models", str(MODELS), "--model", "Model_2", "--out", str(out),
                 "--data-dir", str(data_dir), *FAST]) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["memory_format"] == "contiguous"
    err = capsys.readouterr().err
    if "does not train in channels_last" in err:  # only where auto would pick channels_last
        assert err.count("channels_last") == 1


def test_check_over_two_seeds_writes_the_verdict_and_the_proof(data_dir, tmp_path, capsys):
    ev_path = tmp_path / "ev.json"
    code = main(["check", "--models", str(MODELS), "--model", "Model_1", "--seeds", "2", "--last", "2", "--jobs", "2",
                 "--runs", str(tmp_path / "runs"), "--json", str(ev_path), "--data-dir", str(data_dir), *FAST])
    ev = json.loads(ev_path.read_text())
    assert code == (0 if ev["passed"] else 1)
    assert ev["model"] == "Model_1" and ev["models_file"]["class"] == "Model_1" and len(ev["seeds"]) == 2
    assert ev["rules"][0]["rule"] == "parameters 4,720 < 8,000"
    out = capsys.readouterr().out
    assert "check Model_1: 2 seeds" in out and f"proof plot written to {ev_path.with_suffix('.png')}" in out
    k = sum(min(h["test_acc"] for h in s["history"][-2:]) >= 99.4 for s in ev["seeds"])
    rate = ev["pass_rate"]
    assert (rate["passes"], rate["seeds"], rate["confidence"], rate["reliable"]) == (k, 2, 0.95, False)
    assert f"{k} of 2 seeds pass; per-run pass rate ≥ {rate['lower_bound']:.2f} with 95% confidence" in out
    assert ev_path.with_suffix(".png").stat().st_size > 0


def test_a_model_over_the_budget_fails_the_check_naming_the_rule(data_dir, tmp_path, capsys):
    ev_path = tmp_path / "ev.json"
    assert main(["check", "--models", str(MODELS), "--model", "Model_1", "--seeds", "1", "--last", "1",
                 "--max-params", "3999", "--runs", str(tmp_path / "runs"), "--json", str(ev_path),
                 "--data-dir", str(data_dir), *FAST]) == 1
    ev = json.loads(ev_path.read_text())
    assert not ev["passed"] and ev["rules"][0] == {"rule": "parameters 4,720 ≤ 3,999", "passed": False}
    assert "FAIL  parameters 4,720 ≤ 3,999" in capsys.readouterr().out


def test_errors_export_and_predict_on_onnx_without_the_file(trained, data_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    ckpt = trained / "model.pt"
    assert main(["errors", str(ckpt), "--models", str(MODELS), "--out", str(tmp_path / "e"),
                 "--data-dir", str(data_dir)]) == 0
    assert (tmp_path / "e" / "errors.json").is_file() and (tmp_path / "e" / "confusion.png").is_file()
    onnx = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--models", str(MODELS), "--onnx", str(onnx)]) == 0
    from PIL import Image

    img = tmp_path / "d.png"
    canvas = Image.new("L", (28, 28), 0)
    canvas.paste(255, (6, 6, 22, 9))
    canvas.save(img)
    capsys.readouterr()
    assert main(["predict", str(onnx), str(img), "--json"]) == 0  # no models file: the ONNX file is self-contained
    onnx_pred = json.loads(capsys.readouterr().out)[0]
    assert main(["predict", str(ckpt), str(img), "--json", "--models", str(MODELS)]) == 0
    torch_pred = json.loads(capsys.readouterr().out)[0]
    assert onnx_pred["digit"] == torch_pred["digit"]
    assert abs(onnx_pred["probability"] - torch_pred["probability"]) < 1e-4


def test_the_demo_serves_a_user_model(trained):
    import io
    import urllib.request

    from PIL import Image

    from tinymnist.apps.demo import make_server

    srv = make_server(trained / "model.pt", "127.0.0.1", 0, models=str(MODELS))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        canvas = Image.new("L", (280, 280), 255)
        canvas.paste(0, (130, 40, 150, 240))
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")
        req = urllib.request.Request(f"http://127.0.0.1:{srv.server_port}/api/predict", data=buf.getvalue(),
                                     method="POST", headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.loads(r.read())
        assert r.status == 200 and len(body["top"]) == 3 and 0 <= body["digit"] <= 9
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------- checkpoints never run code of their own


def test_a_user_checkpoint_needs_its_models_file_named(trained, capsys):
    assert main(["errors", str(trained / "model.pt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--models FILE.py" in err and "never imports a path" in err


def test_a_changed_models_file_loads_after_one_warning_naming_both_hashes(trained, tmp_path, capsys):
    from tinymnist.core.runs import load_checkpoint
    from tinymnist.models.userfile import file_sha256

    changed = tmp_path / "model.py"
    changed.write_text(MODELS.read_text() + "\n# tuned later\n")
    model, cfg = load_checkpoint(trained / "model.pt", models=str(changed))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err
    assert file_sha256(changed)[:16] in err and file_sha256(MODELS)[:16] in err
    assert cfg.models_file == str(changed) and sum(p.numel() for p in model.parameters()) == 4720


# ---------------------------------------------------------------- bad input: one line, exit 1 or 2, nothing written


def _files(root: Path) -> list:
    return sorted(p.relative_to(root) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize("source, code, fragment", [
    (None, 1, "models file not found"),
    ("import torch\nclass Model_1(torch.nn.Module:\n    pass\n", 1, "model.py: line 2: SyntaxError"),
    ("import torch\n\nclass Model_1(torch.nn.Module):\n    raise ValueError('no GPU here')\n", 1,
     "model.py: line 4: ValueError: no GPU here"),
    ("import torch\nimport torch.nn as nn\n\nclass Net(nn.Module):\n    def __init__(self, c):\n        super().__init__()\n",
     1, "no usable model"),
    ("import torch.nn as nn\n\nclass Model_1(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
     "        self.c = nn.Conv2d(1, 10, 3)\n    def forward(self, x):\n        return self.c(x).mean(dim=(2, 3)) @ x\n",
     1, "forward fails on a (2, 1, 28, 28) batch"),
    ("import torch.nn as nn\n\nclass Model_1(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
     "        self.c = nn.Conv2d(1, 10, 3)\n    def forward(self, x):\n        return self.c(x)\n",
     1, "forward gives (2, 10, 26, 26)"),
])
def test_bad_models_files_are_one_line(data_dir, tmp_path, capsys, source, code, fragment):
    path = tmp_path / "model.py"
    if source is not None:
        path.write_text(source)
    out = tmp_path / "run"
    assert main(["train", "--models", str(path), "--model", "Model_1", "--out", str(out), "--data-dir",
                 str(data_dir), *FAST]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err, err
    assert not out.exists()


def test_an_unknown_model_lists_the_valid_names(capsys):
    assert main(["summary", "Model_7", "--models", str(MODELS)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "choose from Model_1, Model_2" in err and "Net (its constructor needs channels)" in err
    assert main(["train", "--models", str(MODELS)]) == 2  # two models: name one
    assert "name one with --model" in capsys.readouterr().err


# ---------------------------------------------------------------- the Python API: register_model


def test_register_model_makes_a_notebook_class_trainable_and_checkable(data_dir, tmp_path, monkeypatch):
    import tinymnist
    from tinymnist.models import model

    monkeypatch.setattr(model, "_REGISTERED", {})  # registered for this test only

    @tinymnist.register_model
    class TinyNotebookNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 10, 3, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x):
            return F.log_softmax(self.body(x), dim=1)

    assert "TinyNotebookNet" in tinymnist.list_models()
    assert isinstance(tinymnist.create_model("TinyNotebookNet"), TinyNotebookNet)
    assert tinymnist.summarize(tinymnist.create_model("TinyNotebookNet")).total_params == 72 + 16 + 720
    ev = tinymnist.run_check(seeds=2, last=1, data_dir=str(data_dir), out_root=str(tmp_path), progress=False, jobs=2,
                             model="TinyNotebookNet", overrides={"epochs": 1, "limit_batches": 2})
    assert ev["model"] == "TinyNotebookNet" and len(ev["seeds"]) == 2 and ev["jobs"] == 1  # in this process

    with pytest.raises(TinyMnistError, match="one of tinymnist's models"):
        tinymnist.register_model(type("Model_7", (nn.Module,), {}))
    with pytest.raises(TinyMnistError, match="constructor needs width"):
        @tinymnist.register_model
        class Wide(nn.Module):
            def __init__(self, width):
                super().__init__()


def test_load_models_file_from_python():
    import tinymnist

    found = tinymnist.load_models_file(MODELS)
    assert list(found.classes) == ["Model_1", "Model_2"] and "Net" in found.skipped
    assert tinymnist.load_models_file(MODELS) is found  # imported once per content


def test_a_sweep_searches_a_user_models_classes(data_dir, tmp_path):
    optuna = pytest.importorskip("optuna")
    space = tmp_path / "mine.toml"
    space.write_text("""
seeds = 1
last = 1
[fixed]
epochs = 1
limit_batches = 2
val = 64
[search]
model = ["Model_1", "Model_2"]
lr = { low = 0.01, high = 0.2, log = true }
""")
    out = tmp_path / "out"
    assert main(["sweep", str(space), "--trials", "2", "--jobs", "1", "--threads", "1", "--models", str(MODELS),
                 "--out", str(out), "--data-dir", str(data_dir)]) == 0
    trials = optuna.load_study(study_name="mine", storage=f"sqlite:///{out / 'study.db'}").get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) >= 2
    for t in done:
        cfg = t.user_attrs["config"]
        assert cfg["models_file"] == str(MODELS) and cfg["model"] == t.params["model"] and cfg["dropout"] is None
        assert t.user_attrs["params"] == {"Model_1": 4720, "Model_2": 4626}[t.params["model"]]


def test_resume_of_a_run_of_your_model_takes_the_file_again_checked_and_never_imports_the_recorded_path(
        data_dir, tmp_path, capsys):
    import shutil
    import subprocess
    import sys

    from tinymnist.core.config import TrainConfig
    from tinymnist.core.runs import train_run

    own = tmp_path / "model.py"
    shutil.copy(MODELS, own)
    with own.open("a") as f:
        f.write("\nprint('IMPORTED', flush=True)\n")  # a sign of any import of this file
    cfg = TrainConfig(model="Model_1", models_file=str(own), epochs=2, limit_batches=3, batch_size=32)
    run = tmp_path / "run"
    train_run(cfg, out=run, data_dir=str(data_dir), progress=False, verbose=False, until=1)  # stopped after epoch 1
    capsys.readouterr()
    cmd = [sys.executable, "-m", "tinymnist.cli", "resume", str(run), "--data-dir", str(data_dir), "--no-progress"]
    env = {**__import__("os").environ, "TINYMNIST_VERIFY": "0"}
    without = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert without.returncode == 1 and "IMPORTED" not in without.stdout + without.stderr
    assert without.stderr.count("\n") == 1 and "--models FILE.py" in without.stderr
    changed = tmp_path / "changed.py"
    changed.write_text(own.read_text() + "\n# edited\n")
    refused = subprocess.run(cmd + ["--models", str(changed)], capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "must train the same code" in refused.stderr
    assert main(["resume", str(run), "--models", str(own), "--data-dir", str(data_dir), "--no-progress"]) == 0
    assert len(json.loads((run / "history.json").read_text())) == 2


def test_a_models_file_gets_the_notebooks_rule_definitions_only_and_a_missing_import_skipped(tmp_path, capsys):
    # as public submissions' modelV4.py: torchsummary is imported at the top and a test run sits at module level
    path = tmp_path / "modelV4.py"
    marker = tmp_path / "ran"
    path.write_text(
        "from torchsummary import summary\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n"
        "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.c = nn.Conv2d(1, 10, 28)\n    def forward(self, x):\n"
        "        return F.log_softmax(self.c(x).flatten(1), dim=1)\n\n"
        f"open({str(marker)!r}, 'w').write('module-level code ran')\nmodel = Net()\nsummary(model, (1, 28, 28))\n"
        "if __name__ == '__main__':\n    raise SystemExit('ran as a script')\n")
    assert main(["models", "--models", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Net" in out and "7,850 params" in out
    assert "skipped import: from torchsummary import summary (line 1): ModuleNotFoundError" in out
    assert "taken from the file: 3 statements" in out and "left unrun: 4 other statements" in out
    assert not marker.exists()
