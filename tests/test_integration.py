"""One epoch of the default recipe on the real MNIST (TINYMNIST_DATA); under CI missing data is a failure."""

import json

import pytest

from tinymnist.cli import main


@pytest.mark.slow
def test_one_epoch_of_the_default_model_reaches_98(real_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--epochs", "1", "--out", str(out), "--data-dir", str(real_data_dir), "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "curves.png", "history.json", "model.pt"]
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and history[0]["test_acc"] >= 98.0, history
