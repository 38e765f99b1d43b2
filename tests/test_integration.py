"""One epoch of the default recipe on the real MNIST (TINYMNIST_DATA); under CI missing data is a failure."""

import json

import pytest


@pytest.mark.slow
def test_one_epoch_of_the_default_model_reaches_98(trained_run):
    assert sorted(p.name for p in trained_run.iterdir()) == ["config.json", "curves.png", "history.json", "model.pt"]
    history = json.loads((trained_run / "history.json").read_text())
    assert len(history) == 1 and history[0]["test_acc"] >= 98.0, history
