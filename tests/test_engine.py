import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tinymnist.core.config import AugConfig, TrainConfig, override
from tinymnist.core.data import load_mnist
from tinymnist.core.engine import fit
from tinymnist.errors import TinyMnistError
from tinymnist.core.runs import load_checkpoint, save_checkpoint

from conftest import synthetic_mnist


def _strip_time(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


@pytest.mark.parametrize("optimizer, scheduler", [("sgd", "onecycle"), ("adamw", "step"), ("adam", "none")])
def test_same_seed_same_history(tmp_path, optimizer, scheduler):
    synthetic_mnist(tmp_path, n_train=192, n_test=64)
    data = load_mnist(tmp_path, download=False)
    cfg = TrainConfig(model="Model_5", epochs=2, batch_size=32, optimizer=optimizer, scheduler=scheduler,
                      lr=0.01, step_size=1, aug=AugConfig(rotate=10, translate=0.1, erase_p=0.5))
    _, h1 = fit(cfg, data, progress=False, verbose=False)
    _, h2 = fit(cfg, data, progress=False, verbose=False)
    _, h3 = fit(dataclasses.replace(cfg, seed=1), data, progress=False, verbose=False)
    assert _strip_time(h1) == _strip_time(h2)
    assert _strip_time(h1) != _strip_time(h3)


def test_schedules_move_the_lr(tmp_path):
    synthetic_mnist(tmp_path, n_train=128, n_test=32)
    data = load_mnist(tmp_path, download=False)
    base = TrainConfig(model="Model_6", epochs=3, batch_size=32, lr=0.1)
    _, step = fit(override(base, {"scheduler": "step", "step_size": 1, "gamma": 0.5}), data, progress=False, verbose=False)
    assert [r["lr"] for r in step] == pytest.approx([0.1, 0.05, 0.025])
    _, one = fit(override(base, {"scheduler": "onecycle"}), data, progress=False, verbose=False)
    assert one[0]["lr"] == pytest.approx(0.01) and one[-1]["lr"] < 0.1


def test_checkpoint_roundtrip(tmp_path):
    synthetic_mnist(tmp_path, n_train=64, n_test=32)
    data = load_mnist(tmp_path, download=False)
    cfg = TrainConfig(model="Model_6", epochs=1, batch_size=32)
    model, _ = fit(cfg, data, progress=False, verbose=False)
    save_checkpoint(tmp_path / "m.pt", model, cfg)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["config"]["model"] == "Model_6"
    loaded, cfg2 = load_checkpoint(tmp_path / "m.pt")
    assert cfg2 == cfg
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    assert torch.allclose(loaded(x), model(x))


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(TinyMnistError, match="unknown config key"):
        override(TrainConfig(), {"learning_rate": 0.1})
    with pytest.raises(TinyMnistError, match="unknown AugConfig key"):
        override(TrainConfig(), {"aug": {"rotation": 5}})
    with pytest.raises(TinyMnistError, match="unknown optimizer"):
        TrainConfig(optimizer="lion").validate()
    with pytest.raises(TinyMnistError, match="unknown model"):
        TrainConfig(model="Model_0").validate()
    assert override(TrainConfig(), {"aug": {"rotate": 5}}).aug.rotate == 5


def test_config_dict_roundtrip():
    cfg = TrainConfig(model="Model_4", aug=AugConfig(rotate=3, erase_area=(0.1, 0.2)), dropout=0.1)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_ema_averages_weights_and_bn_statistics():
    from tinymnist.core.engine import EMA
    from tinymnist.models.model import create_model

    model = create_model("Model_6")
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for t in model.state_dict().values():
            t.add_(1) if t.is_floating_point() else t.fill_(7)
    ema.update(model)
    d = min(0.9, 2 / 11)  # the warm-up decay of the first update
    for k, v in ema.model.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, before[k] + (1 - d)), k
        else:
            assert int(v) == 7, k
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_fit_with_ema_returns_the_averaged_model(tmp_path):
    synthetic_mnist(tmp_path, n_train=64, n_test=32)
    data = load_mnist(tmp_path, download=False)
    raw, _ = fit(TrainConfig(model="Model_6", epochs=1, batch_size=32), data, progress=False, verbose=False)
    avg, _ = fit(TrainConfig(model="Model_6", epochs=1, batch_size=32, ema=0.99), data, progress=False, verbose=False)
    assert not avg.training
    assert not torch.equal(raw.net[0][0].weight, avg.net[0][0].weight)


def test_bf16_precision_trains_and_is_validated(tmp_path):
    synthetic_mnist(tmp_path, n_train=64, n_test=32)
    data = load_mnist(tmp_path, download=False)
    model, history = fit(TrainConfig(model="Model_6", epochs=1, batch_size=32, precision="bf16"), data,
                         progress=False, verbose=False)
    assert next(model.parameters()).dtype == torch.float32  # autocast leaves the weights in float32
    assert history[0]["train_loss"] > 0
    with pytest.raises(TinyMnistError, match="unknown precision"):
        TrainConfig(precision="fp8").validate()


@pytest.mark.parametrize("kernels", ["native", "fused"])
def test_a_run_stopped_after_every_epoch_and_resumed_matches_one_that_never_stopped(tmp_path, kernels):
    # every piece of state a later epoch reads: momentum, the LR schedule, the EMA, dropout's global RNG, the
    # loader's order and augmentation generators, Python's and NumPy's RNGs (through torch.save, as on disk)
    from tinymnist.core.engine import Trainer
    from tinymnist.core.plan import make_plan
    from tinymnist.accel.kernels import library

    if kernels == "fused" and library()[0] is None:
        pytest.skip("no C compiler here: the kernels do not run")
    synthetic_mnist(tmp_path, n_train=192, n_test=64)
    data = load_mnist(tmp_path, download=False)
    cfg = TrainConfig(model="Model_7", epochs=3, batch_size=32, lr=0.05, dropout=0.1, ema=0.9, val=32,
                      label_smoothing=0.1, aug=AugConfig(rotate=10, translate=0.1, erase_p=0.5), aug_epochs=2,
                      memory_format="channels_last", kernels=kernels)
    straight = Trainer(make_plan(cfg, data))
    while not straight.done:
        straight.run_epoch(progress=False, verbose=False)
    state = None
    for _ in range(cfg.epochs):
        trainer = Trainer(make_plan(cfg, data))  # a new process would start the same way: seeded, then the saved state
        if state is not None:
            torch.save(state, tmp_path / "s.pt")
            trainer.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
        trainer.run_epoch(progress=False, verbose=False)
        state = trainer.state_dict()
        torch.rand(7)  # whatever else the process does with the global RNG in between does not leak in
    assert _strip_time(trainer.history) == _strip_time(straight.history)
    for a, b in zip(trainer.final.state_dict().values(), straight.final.state_dict().values()):
        assert torch.equal(a, b)


def test_aug_epochs_augments_the_first_epochs_only(tmp_path, monkeypatch):
    import tinymnist.core.data as data_module
    from tinymnist.core.engine import Trainer
    from tinymnist.core.plan import make_plan

    synthetic_mnist(tmp_path, n_train=128, n_test=32)
    data = load_mnist(tmp_path, download=False)
    calls, real = [], data_module.augment
    monkeypatch.setattr(data_module, "augment", lambda *a: calls.append(1) or real(*a))
    aug = AugConfig(rotate=10, translate=0.1)
    cfg = TrainConfig(model="Model_6", epochs=3, batch_size=32, lr=0.05, aug=aug, aug_epochs=2)
    trainer, per_epoch = Trainer(make_plan(cfg, data)), []
    while not trainer.done:
        trainer.run_epoch(progress=False, verbose=False)
        per_epoch.append(len(calls))
    assert per_epoch == [4, 8, 8]  # 4 batches an epoch, augmented in epochs 1 and 2 only
    _, every = fit(dataclasses.replace(cfg, aug_epochs=0), data, progress=False, verbose=False)
    assert _strip_time(trainer.history)[:2] == _strip_time(every)[:2] and trainer.history[2] != every[2]
    with pytest.raises(TinyMnistError, match="aug_epochs"):
        dataclasses.replace(cfg, aug_epochs=-1).validate()


def test_a_run_records_whether_its_checkout_differs_from_the_commit(tmp_path):
    import subprocess

    from tinymnist.core.runs import _git_commit, _git_dirty

    assert _git_dirty(tmp_path) is None and _git_commit(tmp_path) is None  # not a checkout: an installed wheel
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "model.py").write_text("a = 1\n")
    subprocess.run(git + ["add", "model.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    assert _git_dirty(tmp_path) is False and len(_git_commit(tmp_path)) == 40
    (tmp_path / "notes.txt").write_text("untracked files change no code that ran\n")
    assert _git_dirty(tmp_path) is False
    (tmp_path / "model.py").write_text("a = 2\n")
    assert _git_dirty(tmp_path) is True


def test_the_distillation_loss_is_the_labels_loss_plus_the_softened_kl_to_the_teacher():
    import torch.nn.functional as F

    from tinymnist.core.engine import distillation_loss

    torch.manual_seed(0)
    out, other, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = F.cross_entropy(out, y)
    # a teacher that agrees with the student adds nothing: only the labels' share is left
    assert distillation_loss(out, out, y, 0.25, 4.0) == pytest.approx(0.75 * ce.item(), rel=1e-6)
    assert distillation_loss(out, out, y, 1.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    kl = F.kl_div(F.log_softmax(out / 2, 1), F.softmax(other / 2, 1), reduction="batchmean")
    assert distillation_loss(out, other, y, 0.5, 2.0) == pytest.approx(0.5 * ce.item() + 0.5 * 4 * kl.item(), rel=1e-5)


def test_a_distilled_run_trains_its_teacher_on_the_same_images_first_and_resumes_as_if_it_never_stopped(tmp_path):
    from tinymnist.core.engine import Trainer
    from tinymnist.core.plan import make_plan
    from tinymnist.lab.series import teacher_recipe

    synthetic_mnist(tmp_path, n_train=192, n_test=64)
    data = load_mnist(tmp_path, download=False)
    cfg = TrainConfig(model="Model_6", epochs=2, batch_size=32, lr=0.05, ema=0.9, val=32, limit_batches=2,
                      aug=AugConfig(rotate=10), teacher="writeup-002", distill=0.7, distill_temp=3.0)
    with pytest.raises(TinyMnistError, match="its teacher's recipe must be given"):
        make_plan(cfg, data)  # the core trains recipes; it never looks a step up by name
    straight = Trainer(make_plan(cfg, data, teacher=teacher_recipe(cfg)))
    while not straight.done:
        straight.run_epoch(progress=False, verbose=False)
    teacher = straight.teacher_history
    assert len(teacher) == 15  # the teacher step's own epochs, recorded beside the student's
    assert all("val_acc" in r and "test_acc" not in r for r in teacher)  # the student's split: no test set read
    state = None
    for _ in range(cfg.epochs):  # stopped after every epoch: the teacher comes back from the state, not retrained
        trainer = Trainer(make_plan(cfg, data, teacher=teacher_recipe(cfg)))
        if state is not None:
            torch.save(state, tmp_path / "s.pt")
            trainer.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
            assert trainer.teacher is not None and _strip_time(trainer.teacher_history) == _strip_time(teacher)
        trainer.run_epoch(progress=False, verbose=False)
        state = trainer.state_dict()
    assert _strip_time(trainer.history) == _strip_time(straight.history)
    _, alone = fit(dataclasses.replace(cfg, teacher=""), data, progress=False, verbose=False)
    assert _strip_time(alone)[0] != _strip_time(straight.history)[0]  # the teacher's outputs change the loss


def test_a_teacher_must_be_a_step_that_trains_on_the_labels(monkeypatch):
    from tinymnist.lab import series as experiments
    from tinymnist.lab.series import teacher_recipe

    with pytest.raises(TinyMnistError, match="unknown step 'nobody'"):
        teacher_recipe(TrainConfig(model="Model_6", teacher="nobody"))
    taught = dataclasses.replace(experiments.get_step("final"), name="taught",
                                 config=dataclasses.replace(experiments.get_step("final").config, teacher="final"))
    monkeypatch.setattr(experiments, "STEPS", experiments.STEPS + (taught,))
    with pytest.raises(TinyMnistError, match="itself distilled"):
        teacher_recipe(TrainConfig(model="Model_6", teacher="taught"))
    assert teacher_recipe(TrainConfig(model="Model_6", teacher="final", seed=3, val=100)).recipe() == \
        dataclasses.replace(experiments.get_step("final").config, val=100).recipe()
    with pytest.raises(TinyMnistError, match="distill must be"):
        TrainConfig(model="Model_6", distill=0.0).validate()


def test_a_distilled_check_states_its_teachers_epochs_beside_the_students(tmp_path, capsys):
    from tinymnist.lab.check import run_check

    synthetic_mnist(tmp_path / "d", n_train=192, n_test=64)
    cfg = TrainConfig(model="Model_6", epochs=2, batch_size=32, lr=0.05, val=32, limit_batches=2,
                      teacher="writeup-002")
    ev = run_check("budget-5000", 1, 2, data_dir=str(tmp_path / "d"), out_root=str(tmp_path / "runs"),
                   progress=False, threads=1, jobs=1, recipe=cfg)
    assert ev["teacher"] == {"step": "writeup-002", "epochs": 15} and ev["epochs"] == 2
    assert "teacher (writeup-002) trained 15 epochs before the student's 2, 17 in all" in capsys.readouterr().out
    run_dir = Path(ev["seeds"][0]["run_dir"])
    teacher = json.loads((run_dir / "teacher.json").read_text())
    assert teacher["step"] == "writeup-002" and teacher["epochs"] == len(teacher["history"]) == 15
    assert teacher["config"]["val"] == 32 and teacher["config"]["seed"] == 0  # the student's split and seed


def test_sam_takes_the_gradient_uphill_and_puts_the_weights_and_batch_norm_statistics_back():
    """sam_ascent: inside, every weight with a gradient is moved by rho * g / ||g|| (one norm over all of them), and
    batch norm does not update its running statistics; after, the weights and statistics are exactly as before,
    and the gradient left for the optimizer is the one taken inside."""
    import torch
    from torch import nn

    from tinymnist.core.engine import sam_ascent

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).train()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    with sam_ascent(model, 0.05):
        for p, g, (k, w) in zip(model.parameters(), grads, [(k, weights[k]) for k, _ in model.named_parameters()]):
            assert torch.allclose(p, w + 0.05 * g / norm, atol=1e-7), k
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        inside = [p.grad.clone() for p in model.parameters()]
    after = model.state_dict()
    assert all(torch.equal(after[k], weights[k]) for k in weights)  # weights, running stats and the batch count
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), inside))
    assert not all(torch.equal(a, b) for a, b in zip(inside, grads))


def test_a_sam_recipe_trains_and_its_history_differs_from_plain_sgd(tmp_path):
    from dataclasses import replace

    from conftest import synthetic_mnist
    from tinymnist.core.config import TrainConfig
    from tinymnist.core.data import load_mnist
    from tinymnist.core.engine import fit

    synthetic_mnist(tmp_path / "d", n_train=256, n_test=64)
    data = load_mnist(str(tmp_path / "d"))
    cfg = TrainConfig(model="Model_7", epochs=1, batch_size=32, lr=0.05)
    plain = fit(cfg, data, verbose=False)[1]
    sam = fit(replace(cfg, sam_rho=0.05), data, verbose=False)[1]
    assert len(sam) == 1 and sam[0]["train_loss"] > 0 and sam[0]["train_loss"] != plain[0]["train_loss"]
    with pytest.raises(Exception, match="sam_rho"):
        replace(cfg, sam_rho=-1.0).validate()


def test_a_recipe_is_resolved_once_and_builds_its_network_once(tmp_path, monkeypatch):
    """Validating a recipe builds nothing; make_plan builds the network exactly once (the check of its shapes and
    the channels-last probe of a user's network work on that one, or on a copy of it), and records what it
    resolved: the dropout used, and no "auto" left."""
    import tinymnist.models.build as build
    from tinymnist.core.plan import make_plan

    built = []
    real = build.create_network
    monkeypatch.setattr(build, "create_network", lambda *a, **k: built.append(a) or real(*a, **k))
    synthetic_mnist(tmp_path, n_train=64, n_test=16)
    data = load_mnist(tmp_path, download=False)
    cfg = TrainConfig(model="Model_14", layout="c8 c8 P dw c16/1 G o", epochs=1, val=16)
    cfg.validate()
    assert built == []
    plan = make_plan(cfg, data)
    assert len(built) == 1
    assert plan.cfg.dropout == 0.0 and "auto" not in (plan.cfg.precision, plan.cfg.memory_format, plan.cfg.kernels)
    assert plan.params == sum(p.numel() for p in plan.model.parameters())
    assert plan.split is not None and plan.split.record["images"] == 16
