"""--models NOTEBOOK.ipynb: a student's notebook in the write-ups' style is graded as it is; only what defines the
model runs (imports, definitions, the constants they use), never its installs, downloads or training loop."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinymnist.cli import main

from conftest import synthetic_mnist

FAST = ["--epochs", "2", "--limit-batches", "3", "--batch-size", "32", "--no-progress"]

NET = '''class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(8),
                                   nn.Dropout(dropout_value))
        self.conv2 = nn.Sequential(nn.Conv2d(8, 16, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(16))
        self.pool = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(16, 10, 1, bias=False)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.conv3(self.pool(self.conv2(self.conv1(x))))
        return F.log_softmax(self.gap(x).view(-1, 10), dim=-1)
'''


def notebook(path: Path, *sources: str, markdown: bool = True) -> Path:
    """A notebook (nbformat 4) with a markdown cell first, then one code cell per source."""
    cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# MNIST under 8k\n", "Step 4."]}] if markdown else []
    cells += [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
               "source": [line + "\n" for line in src.split("\n")]} for src in sources]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def seeds_style(tmp_path: Path, net: str = NET) -> Path:
    """A notebook as the write-ups have them: installs, magics, a package that is not installed here, a download,
    a DataLoader, a summary call, a training loop, and a line that would leave a file behind if it ran."""
    sentinel = tmp_path / "ran.txt"
    return notebook(
        tmp_path / "ERAS7_M4_Final.ipynb",
        "!pip install torchsummary\n%matplotlib inline",
        "from __future__ import print_function\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"
        "import torch.optim as optim\nfrom torchvision import datasets, transforms",
        "!pip install torchsummary\nfrom torchsummary import summary\nuse_cuda = torch.cuda.is_available()\n"
        "device = torch.device('cuda' if use_cuda else 'cpu')",
        "dropout_value = 0.05\nunused_value = 3",
        net,
        "model = Net().to(device)\nsummary(model, input_size=(1, 28, 28))",
        "train_loader = torch.utils.data.DataLoader(datasets.MNIST('../data', train=True, download=True,\n"
        "    transform=transforms.Compose([transforms.ToTensor()])), batch_size=128, shuffle=True)",
        "def train(model, device, train_loader, optimizer, epoch):\n    model.train()\n"
        "    for data, target in train_loader:\n        optimizer.zero_grad()",
        f"open({str(sentinel)!r}, 'w').write('a training cell ran')\n"
        "optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)\nfor epoch in range(1, 16):\n"
        "    train(model, device, train_loader, optimizer, epoch)\nraise SystemExit('the training loop ran')",
        "%%time\nprint('a cell magic')",
    )


@pytest.fixture(scope="module")
def data_dir(learnable_dir):
    return learnable_dir


@pytest.fixture(autouse=True)
def _no_verify(no_verify):
    """Every test here trains on made-up data."""


def test_models_lists_what_was_taken_and_what_was_left(tmp_path, capsys):
    nb = seeds_style(tmp_path)
    assert main(["models", "--models", str(nb)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("Net") and "1,432 params" in out.splitlines()[0]
    assert "taken from the notebook: 8 statements (imports, definitions, constants) from 4 of 10 code cells" in out
    assert "left unrun: 10 other statements and 5 shell or magic lines" in out
    assert "skipped import: from torchvision import datasets, transforms (cell 3, line 6): ModuleNotFoundError" in out
    assert "skipped import: from torchsummary import summary (cell 4, line 2)" in out
    assert not (tmp_path / "ran.txt").exists()


def test_a_check_trains_the_notebooks_class_and_nothing_else_runs(tmp_path, data_dir, capsys):
    nb = seeds_style(tmp_path)
    ev_path = tmp_path / "ev.json"
    env_before = dict(os.environ)
    assert main(["check", "--models", str(nb), "--seeds", "2", "--last", "1", "--jobs", "2", "--threads", "1",
                 "--runs", str(tmp_path / "runs"), "--json", str(ev_path), "--data-dir", str(data_dir), *FAST]) == 1
    ev = json.loads(ev_path.read_text())
    assert ev["model"] == "Net" and ev["params"] == 1432 and len(ev["seeds"]) == 2
    assert ev["models_file"]["sha256"] == __import__("hashlib").sha256(nb.read_bytes()).hexdigest()
    assert not (tmp_path / "ran.txt").exists() and not (tmp_path / "data").exists()  # no training cell, no download
    assert dict(os.environ) == env_before
    err = capsys.readouterr().err
    assert err.count("skipped `from torchsummary import summary` (cell 4, line 2)") == 1  # said once, not per worker


def test_a_checkpoint_of_a_notebooks_class_loads_with_the_notebook_named_again(tmp_path, data_dir, capsys):
    nb = seeds_style(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--models", str(nb), "--out", str(run), "--data-dir", str(data_dir), *FAST]) == 0
    assert main(["errors", str(run / "model.pt"), "--data-dir", str(data_dir)]) == 1
    assert "--models FILE.py" in capsys.readouterr().err
    assert main(["errors", str(run / "model.pt"), "--models", str(nb), "--data-dir", str(data_dir)]) == 0
    assert main(["summary", "Net", "--models", str(nb)]) == 0
    assert "Net" in capsys.readouterr().out


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("not json {"), "not a Jupyter notebook (not JSON: line 1"),
    (lambda p: p.write_text(json.dumps({"hello": "world"})), "JSON, but not a Jupyter notebook"),
    (lambda p: notebook(p), "the notebook has no code cell"),
    (lambda p: notebook(p, "import torch\nx = torch.zeros(3)"), "no usable model"),
    (lambda p: notebook(p, "import torch.nn as nn", "class Net(nn.Module):\n    def __init__(self)\n        pass"),
     "cell 3, line 2: SyntaxError"),
    (lambda p: notebook(p, "import torch.nn as nn\nfrom torchsummary import summary",
                        "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                        "        self.s = summary(nn.Conv2d(1, 10, 28))\n    def forward(self, x):\n"
                        "        return self.s(x).flatten(1)"),
     "Net() fails at cell 3, line 4: NameError: name 'summary' is not defined"),
    (lambda p: notebook(p, "import torch.nn as nn\n@staticmethod\ndef f(x=1 / 0):\n    pass"),
     "cell 2, line 3: ZeroDivisionError"),
])
def test_bad_notebooks_are_one_line_and_leave_nothing_behind(tmp_path, data_dir, make, message):
    nb = tmp_path / "bad.ipynb"
    make(nb)
    p = subprocess.run([sys.executable, "-m", "tinymnist.cli", "train", "--models", str(nb), "--out",
                        str(tmp_path / "run"), "--data-dir", str(data_dir), *FAST],
                       capture_output=True, text=True, env={**os.environ, "TINYMNIST_VERIFY": "0"})
    assert p.returncode != 0 and "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], p.stderr
    assert not (tmp_path / "run").exists()


def test_a_report_card_is_the_checks_evidence_in_markdown(tmp_path, data_dir):
    nb = seeds_style(tmp_path)
    card, ev_path = tmp_path / "docs" / "card.md", tmp_path / "results" / "ev.json"
    assert main(["check", "--models", str(nb), "--seeds", "2", "--last", "2", "--jobs", "1", "--runs",
                 str(tmp_path / "runs"), "--json", str(ev_path), "--markdown", str(card), "--data-dir", str(data_dir),
                 *FAST]) == 1
    ev, text = json.loads(ev_path.read_text()), card.read_text()
    assert text.startswith("### Report card: `Net` from `ERAS7_M4_Final.ipynb`")
    assert "| 1,432 | " in text and "| **FAIL** |" in text and "fewer than 8,000 parameters" in text
    for s in ev["seeds"]:  # each seed's last accuracies, as the evidence holds them
        tail = ", ".join(f"{r['test_acc']:.2f}" for r in s["history"][-2:])
        assert f"| {s['seed']} | {tail} |" in text
    assert "](../results/ev.png)" in text and (tmp_path / "results" / "ev.png").is_file()  # relative to the card
