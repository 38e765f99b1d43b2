"""Write examples/class/: a made-up class of submissions to this assignment, in the styles of the write-ups, for the
tests of `tinymnist grade` and for docs/class/. Every log and claim in it is invented for the tests; none is a
measurement. Each submission shows one thing the grader must handle: a log form, a model imported from the
submission's own package, two logs in one notebook, a notebook without outputs, a models file alone, a corrupt
notebook, a folder with nothing to grade, and one whose class body writes a file and opens a socket and whose
__init__ never returns.

    python scripts/make_example_class.py [OUT]     # default: examples/class
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nbformat
from nbformat import v4

ROOT = Path(__file__).resolve().parents[1]
CANARY = "/tmp/tinymnist-grade-canary"  # what mallory's class body tries to write; the grader must never let it

IMPORTS = "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\nimport torch.optim as optim\n" \
          "from torchsummary import summary\nfrom torchvision import datasets, transforms\nfrom tqdm import tqdm"

# the write-ups' shape: three convs, a pool, a 1x1, three convs, GAP, a 1x1 to 10
NET = '''dropout_value = 0.05

class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.convblock1 = nn.Sequential(nn.Conv2d(1, {a}, 3, bias=False), nn.ReLU(), nn.BatchNorm2d({a}))
        self.convblock2 = nn.Sequential(nn.Conv2d({a}, {b}, 3, bias=False), nn.ReLU(), nn.BatchNorm2d({b}),
                                        nn.Dropout(dropout_value))
        self.pool1 = nn.MaxPool2d(2, 2)
        self.trans1 = nn.Sequential(nn.Conv2d({b}, {a}, 1, bias=False))
        self.convblock3 = nn.Sequential(nn.Conv2d({a}, {c}, 3, bias=False), nn.ReLU(), nn.BatchNorm2d({c}))
        self.convblock4 = nn.Sequential(nn.Conv2d({c}, {c}, 3, bias=False), nn.ReLU(), nn.BatchNorm2d({c}))
        self.convblock5 = nn.Sequential(nn.Conv2d({c}, {c}, 3, bias=False), nn.ReLU(), nn.BatchNorm2d({c}))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.out = nn.Conv2d({c}, 10, 1, bias=False)

    def forward(self, x):
        x = self.convblock2(self.convblock1(x))
        x = self.trans1(self.pool1(x))
        x = self.convblock5(self.convblock4(self.convblock3(x)))
        x = self.out(self.gap(x))
        return F.log_softmax(x.view(-1, 10), dim=-1)
'''

# a small net that ends in a Linear layer: its receptive field is the whole input
LINEAR_NET = '''class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 12, 3, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.adaptive_avg_pool2d(x, 4)
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)
'''

TRAIN = '''torch.manual_seed(1)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
model = {call}.to(device)
optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scheduler = optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, epochs={epochs}, steps_per_epoch=len(train_loader))
for epoch in range(1, {epochs} + 1):
    train(model, device, train_loader, optimizer, epoch)
    test(model, device, test_loader)'''


def pytorch_examples(accs) -> str:
    return "".join(f"loss=0.0{i % 7 + 1}21 batch_id=468: 100%|██████████| 469/469 [00:18<00:00, 25.61it/s]\n\n"
                   f"Test set: Average loss: 0.0{30 - i:02d}5, Accuracy: {round(a * 100)}/10000 ({a:.2f}%)\n\n"
                   for i, a in enumerate(accs, 1))


def val_percent(accs) -> str:
    return "".join(f"EPOCH: {i}\nTrain Loss: 0.0{i % 9 + 1}4 | Train Acc: 98.{i % 10}1\n"
                   f"Val Accuracy:  {round(a * 100)}/10000 | Percent: {a:.2f}%\n" for i, a in enumerate(accs, 1))


def tqdm_postfix(accs) -> str:
    out = ""
    for i, a in enumerate(accs, 1):
        out += f"Epoch {i}: 100%|██████████| 469/469 [00:19<00:00, loss=0.0{i % 8 + 1}3, acc=98.{i % 10}2]\n"
        steps = "".join(f"\rtest: {p}%|████      | {p * 79 // 100}/79 [00:01<00:00, test_acc={a - 0.3 + p / 500:.2f}]"
                        for p in (25, 50, 75))
        out += steps + f"\rtest: 100%|██████████| 79/79 [00:02<00:00, test_acc={a:.2f}]\n"
    return out


def test_accuracy(accs) -> str:
    return "".join(f"Epoch {i}\nTrain Accuracy: 98.{i % 10}3%\nTest Accuracy: {a:.2f}%\n" for i, a in enumerate(accs, 1))


def table(accs) -> str:
    rows = "\n".join(f"{i - 1:<4}{i:>6}{0.3 / i:>12.4f}{a:>10.2f}" for i, a in enumerate(accs, 1))
    return f"{'':<4}{'epoch':>6}{'train_loss':>12}{'test_acc':>10}\n" + rows + "\n"


def notebook(title: str, cells: list) -> nbformat.NotebookNode:
    nb = v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [v4.new_markdown_cell(f"# {title}")]
    count = 0
    for kind, source, *out in cells:
        if kind == "md":
            nb.cells.append(v4.new_markdown_cell(source))
            continue
        count += 1
        cell = v4.new_code_cell(source, execution_count=count)
        if out and out[0] is not None:
            cell.outputs = [v4.new_output("stream", name="stdout", text=out[0])]
        if len(out) > 1 and out[1]:
            cell.outputs.append(v4.new_output("error", ename="KeyboardInterrupt", evalue="", traceback=[]))
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # fixed ids: the same notebook byte for byte each time it is written
        cell.id = f"cell-{i}"
    return nb


def write(path: Path, nb) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))


def steady(start: float, end: float, n: int = 15) -> list[float]:
    return [round(start + (end - start) * (i / (n - 1)) ** 0.3, 2) for i in range(n)]


def build(out: Path) -> None:
    """Write the class into `out` (replacing what is there)."""
    if out.exists():
        shutil.rmtree(out)
    setup = ("code", "!pip install torchsummary\n%matplotlib inline\n" + IMPORTS, "Collecting torchsummary\n")
    loaders = ("code", "train_loader = torch.utils.data.DataLoader(datasets.MNIST('../data', train=True, "
                       "download=True, transform=transforms.ToTensor()), batch_size=128, shuffle=True)")

    # alice: pytorch/examples' log, 15 epochs, every one of the last 5 above 99.40; the README's claim holds
    alice = [99.02, 99.1, 99.21, 99.26, 99.3, 99.31, 99.35, 99.33, 99.38, 99.39, 99.41, 99.45, 99.44, 99.48, 99.46]
    write(out / "alice" / "S6_final.ipynb", notebook("Session 6: the final model", [
        setup, loaders, ("code", NET.format(a=8, b=12, c=14)),
        ("code", TRAIN.format(call="Net()", epochs=15), pytorch_examples(alice))]))
    (out / "alice" / "README.md").write_text(
        "# MNIST under 8k parameters\n\nTarget: 99.4% in the last epochs, within 15 epochs.\n\n"
        "Result: consistent >99.4% from epoch 11-15.\n")

    # bob: "Val Accuracy ... | Percent" log; the title quotes the last epoch, and epoch 11 is under the line
    bob = [98.81, 99.0, 99.1, 99.12, 99.2, 99.25, 99.28, 99.3, 99.33, 99.35, 99.36, 99.41, 99.42, 99.45, 99.52]
    write(out / "bob" / "mnist_99.52.ipynb", notebook("MNIST 99.52% with a tiny network", [
        setup, loaders, ("code", LINEAR_NET), ("code", TRAIN.format(call="Net()", epochs=15), val_percent(bob))]))

    # carol: tqdm postfixes; the network comes from her own package (mnist/model.py), not from the notebook
    carol = [98.9, 99.05, 99.12, 99.2, 99.28, 99.3, 99.33, 99.36, 99.38, 99.4, 99.43, 99.44, 99.47, 99.45, 99.49]
    write(out / "carol" / "notebooks" / "train.ipynb", notebook("Training the model from the mnist package", [
        ("code", IMPORTS + "\nfrom mnist.model import Net\nfrom mnist.utils import train, test"),
        loaders, ("code", TRAIN.format(call="Net()", epochs=15), tqdm_postfix(carol))]))
    (out / "carol" / "mnist").mkdir(parents=True, exist_ok=True)
    (out / "carol" / "mnist" / "__init__.py").write_text("")
    (out / "carol" / "mnist" / "model.py").write_text(
        "import torch.nn as nn\nimport torch.nn.functional as F\n\n" + NET.format(a=8, b=10, c=12)
        + "\n\nif __name__ == '__main__':\n    print(Net())\n")
    (out / "carol" / "mnist" / "utils.py").write_text(
        "import os\nfrom tqdm import tqdm\n\n\ndef train(model, device, loader, optimizer, epoch):\n    pass\n\n\n"
        "def test(model, device, loader):\n    pass\n")
    (out / "carol" / "README.md").write_text("# carol's MNIST\n\nBest test accuracy 99.49% with under 8,000 "
                                              "parameters.\n")

    # dave: "Test Accuracy: N%"; a first try interrupted after 3 epochs, then 15 epochs, then an evaluation cell
    # that prints one accuracy more; a network over the budget
    dave = [99.1, 99.2, 99.3, 99.35, 99.38, 99.4, 99.42, 99.45, 99.44, 99.47, 99.5, 99.52, 99.51, 99.55, 99.53]
    write(out / "dave" / "Experiment_3.ipynb", notebook("Experiment 3: wider", [
        setup, loaders, ("code", NET.format(a=10, b=16, c=20)),
        ("code", TRAIN.format(call="Net()", epochs=15), test_accuracy([98.1, 98.7, 98.9]), True),
        ("code", TRAIN.format(call="Net()", epochs=15), test_accuracy(dave)),
        ("code", "test(model, device, test_loader)", "Test Accuracy: 99.53%\n")]))
    (out / "dave" / "README.md").write_text("# Experiment 3\n\nWe reached 99.61% test accuracy.\n")  # not in its log

    # erin: a printed table, 20 epochs: more than the rule's 15
    erin = steady(98.9, 99.5, 20)
    write(out / "erin" / "mnist.ipynb", notebook("Twenty epochs", [
        setup, loaders, ("code", NET.format(a=8, b=12, c=12)),
        ("code", TRAIN.format(call="Net()", epochs=20) + "\nprint(pd.DataFrame(log))", table(erin))]))

    # frank: a models file alone, which imports torchsummary and runs a summary at module level
    (out / "frank").mkdir(parents=True, exist_ok=True)
    (out / "frank" / "model.py").write_text(
        "from torchsummary import summary\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n"
        + NET.format(a=8, b=8, c=10) + "\n\nmodel = Net()\nsummary(model, input_size=(1, 28, 28))\n")

    # grace: a notebook saved without its outputs: no log, and the model is still graded
    write(out / "grace" / "S6.ipynb", notebook("Session 6", [
        setup, loaders, ("code", NET.format(a=6, b=12, c=12)), ("code", TRAIN.format(call="Net()", epochs=15))]))

    # heidi: a notebook cut short in transfer: not JSON
    (out / "heidi").mkdir(parents=True, exist_ok=True)
    (out / "heidi" / "S6.ipynb").write_text('{"cells": [{"cell_type": "code", "source": "import torch\\n", "outp')

    # ivan: a README and nothing to grade
    (out / "ivan").mkdir(parents=True, exist_ok=True)
    (out / "ivan" / "README.md").write_text("# Work in progress\n\nThe notebook is coming.\n")

    # mallory: the class body writes a file and opens a socket; __init__ never returns
    evil = (
        "class Net(nn.Module):\n"
        "    try:\n"
        f"        _fd = torch.os.open({CANARY!r}, torch.os.O_CREAT | torch.os.O_WRONLY)\n"
        "        torch.os.write(_fd, b'the grader ran my class body')\n"
        "    except Exception:\n"
        "        pass\n"
        "    try:\n"
        "        _s = __import__('socket').create_connection(('example.com', 80), timeout=2)\n"
        "    except Exception:\n"
        "        pass\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        while True:\n"
        "            pass\n\n"
        "    def forward(self, x):\n"
        "        return x\n")
    write(out / "mallory" / "S6.ipynb", notebook("Session 6", [
        ("code", "import torch\nimport torch.nn as nn"), ("code", evil),
        ("code", TRAIN.format(call="Net()", epochs=15), pytorch_examples([99.5] * 15))]))
    (out / "mallory" / "README.md").write_text("# 99.50% every epoch\n")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "examples" / "class"
    build(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
