"""screen: candidates ranked on validation, the best confirmed over more seeds, and the gate against a yardstick."""

import json

import pytest

from tinymnist.cli import main
from tinymnist.errors import TinyMnistError
from tinymnist.lab.screen import earns_test_look, read_screen, summarize_evidence

from conftest import synthetic_mnist

SCREEN = """
[screen]
step = "budget-5000"
seeds = 2
val = 64
max_params = 5000
last = 2
confirm = 1
confirm_seeds = 3
yardstick = "yard.json"
fixed = { epochs = 2, limit_batches = 3, batch_size = 16 }

[[candidate]]
name = "baseline"

[[candidate]]
name = "settle"
cycle_epochs = 1

[[candidate]]
name = "too-big"
layout = "c8 c16 P c10/1 c16 c16 c16 G o"
"""


def _ev(worsts):
    """A validation check's evidence with one seed per worst accuracy, each 2 epochs long."""
    return {"metric": "val_acc", "params": 4000, "passed": min(worsts) >= 99.4,
            "seeds": [{"history": [{"epoch": 1, "val_acc": w + 0.1}, {"epoch": 2, "val_acc": w}]} for w in worsts]}


def test_the_gate_compares_worst_and_mean_with_the_yardstick():
    yard = summarize_evidence(_ev([99.30, 99.34, 99.38]), last=2)
    assert yard["worst"] == 99.30 and yard["mean_worst"] == pytest.approx(99.34)
    assert earns_test_look(summarize_evidence(_ev([99.32, 99.35, 99.36]), 2), yard)[0]
    assert not earns_test_look(summarize_evidence(_ev([99.29, 99.45, 99.45]), 2), yard)[0]  # worst seed below
    assert not earns_test_look(summarize_evidence(_ev([99.31, 99.31, 99.32]), 2), yard)[0]  # mean below
    assert earns_test_look(summarize_evidence(_ev([99.40, 99.41]), 2), None)[0]  # passes outright
    assert not earns_test_look(summarize_evidence(_ev([99.39, 99.50]), 2), None)[0]


def test_one_seed_spread_and_one_top_spread_for_every_page():
    from tinymnist.lab.check import seed_gap, top_spread

    assert seed_gap([[99.30, 99.40], [99.35, 99.35, 99.39], [99.2]]) == pytest.approx(0.07)  # (0.10 + 0.04) / 2
    assert seed_gap([[99.3], [99.4]]) is None  # one seed each: no spread to state
    assert top_spread([99.30, 99.41, 99.38, 99.20], 3) == pytest.approx(0.11)  # 99.41 - 99.30
    assert top_spread([99.30, 99.41], 6) == pytest.approx(0.11) and top_spread([99.3], 6) is None


def test_a_margin_of_the_yardsticks_own_spread_turns_a_tie_away():
    yard = summarize_evidence(_ev([99.30, 99.34, 99.38]), last=2)  # mean 99.34, seed spread 0.04
    tie = summarize_evidence(_ev([99.32, 99.35, 99.36]), 2)  # mean 99.343: as high as the yardstick, not above it
    assert earns_test_look(tie, yard, margin_spreads=0)[0]
    ok, why = earns_test_look(tie, yard, margin_spreads=1)
    assert not ok and "99.380%" in why  # 99.34 + 1 x 0.04
    assert earns_test_look(summarize_evidence(_ev([99.36, 99.38, 99.40]), 2), yard, margin_spreads=1)[0]  # at the bar
    assert not earns_test_look(summarize_evidence(_ev([99.36, 99.38, 99.40]), 2), yard, margin_spreads=1.5)[0]


@pytest.mark.parametrize("value", ["-1", '"one"', "true"])
def test_a_bad_margin_is_one_error(tmp_path, value):
    path = tmp_path / "s.toml"
    path.write_text(SCREEN.replace('yardstick = "yard.json"', f'yardstick = "yard.json"\nmargin_spreads = {value}'))
    with pytest.raises(TinyMnistError, match="margin_spreads"):
        read_screen(path)


def test_a_screen_ranks_confirms_resumes_and_never_reads_the_test_set(tmp_path, capsys):
    synthetic_mnist(tmp_path / "d", n_train=512, n_test=64, learnable=True)
    screen = tmp_path / "s.toml"
    screen.write_text(SCREEN)
    results = tmp_path / "results"
    args = ["screen", str(screen), "--results", str(results), "--runs", str(tmp_path / "runs"), "--jobs", "2",
            "--threads", "1", "--data-dir", str(tmp_path / "d"), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no yardstick yet" in out and "too-big: 7,756 parameters > max_params 5,000: rejected" in out
    summary = json.loads((results / "screen-s" / "screen.json").read_text())
    ranked = summary["ranked"]
    assert sorted(ranked) == ["baseline", "settle"]
    assert summary["fixed"] == {"epochs": 2, "limit_batches": 3, "batch_size": 16}  # what every candidate shares
    rows = {r["name"]: r for r in summary["candidates"]}
    assert rows["too-big"] == {"name": "too-big", "changes": {"layout": "c8 c16 P c10/1 c16 c16 c16 G o"},
                               "rejected": True}
    assert rows[ranked[0]]["objective"] >= rows[ranked[1]]["objective"]
    ev = json.loads((results / "screen-s" / f"screen-{ranked[0]}.json").read_text())
    assert ev["metric"] == "val_acc" and all("test_acc" not in r for s in ev["seeds"] for r in s["history"])
    assert ev["config"]["val"] == 64 and ev["config"]["epochs"] == 2 and ev["candidate"]["name"] == ranked[0]
    assert ev["budget"] == 5000 and ev["test_look"] == 0
    assert [c["name"] for c in summary["confirmed"]] == ranked[:1]
    confirm = json.loads((results / "screen-s" / f"confirm-{ranked[0]}.json").read_text())
    assert len(confirm["seeds"]) == 3
    # the confirmation took the screen's 2 seeds as they were and trained only seed 2: 2 + 2 + 1 runs in all
    assert confirm["reused"]["seeds"] == [0, 1] and confirm["reused"]["file"] == f"screen-{ranked[0]}.json"
    assert confirm["seeds"][:2] == ev["seeds"] and confirm["seeds"][2]["seed"] == 2
    assert len(list((tmp_path / "runs").iterdir())) == 5
    # ... and it is the check that trains all 3 seeds afresh, history for history
    from tinymnist.lab.check import run_check
    from tinymnist.core.config import TrainConfig

    afresh = run_check("budget-5000", 3, 2, data_dir=str(tmp_path / "d"), out_root=str(tmp_path / "fresh"),
                       progress=False, threads=1, jobs=2, recipe=TrainConfig.from_dict(confirm["config"]))
    timeless = lambda e: [[{k: v for k, v in r.items() if k != "seconds"} for r in s["history"]] for s in e["seeds"]]
    assert timeless(afresh) == timeless(confirm) and "reused" not in afresh
    other = TrainConfig.from_dict({**confirm["config"], "lr": confirm["config"]["lr"] / 2})
    with pytest.raises(TinyMnistError, match="another recipe"):
        run_check("budget-5000", 3, 2, data_dir=str(tmp_path / "d"), out_root=str(tmp_path / "fresh"),
                  progress=False, threads=1, jobs=2, recipe=other, reuse=confirm)
    capsys.readouterr()
    # the yardstick arrives: the same command trains nothing more, and the gate now compares with it
    (results / "yard.json").write_text(json.dumps(_ev([0.0, 0.0])))
    before = {p: p.stat().st_mtime_ns for p in (results / "screen-s").glob("*-*.json")}
    assert main(args) == 0
    assert "check " not in capsys.readouterr().out  # no run started
    assert before == {p: p.stat().st_mtime_ns for p in (results / "screen-s").glob("*-*.json")}
    again = json.loads((results / "screen-s" / "screen.json").read_text())
    assert again["yardstick"]["worst"] == 0.0 and again["confirmed"][0]["earns_test_look"] and again["done"]
    # a running screen's progress, written without training: a candidate with no evidence yet is pending
    (results / "screen-s" / f"screen-{ranked[1]}.json").unlink()
    assert main(args + ["--no-train"]) == 0
    snap = json.loads((results / "screen-s" / "screen.json").read_text())
    assert {r["name"]: r.get("pending") for r in snap["candidates"]}[ranked[1]] and not snap["done"]
    assert snap["ranked"] == [ranked[0]] and snap["confirmed"] == []  # no confirmation before every candidate is in
    assert not (results / "screen-s" / f"screen-{ranked[1]}.json").exists()


@pytest.mark.parametrize("text, message", [
    ("[screen]\nstep = 'budget-5000'\n", "[[candidate]] tables"),
    ("[screen]\nstep = 'nope'\nmax_params = 1\n[[candidate]]\nname = 'a'\n", "nope"),
    ("[screen]\nstep = 'final'\nmax_params = 1\n[[candidate]]\nname = 'a'\nwidth = 3\n", "unknown recipe field"),
    ("[screen]\nstep = 'final'\nmax_params = 1\n[[candidate]]\nname = 'a'\nepochs = 3\n", "the screen's"),
    ("[screen]\nstep = 'final'\nmax_params = 1\n[[candidate]]\nname = 'a'\n[[candidate]]\nname = 'a'\n",
     "a name of its own"),
    ("[screen]\nstep = 'final'\nmax_params = 1\n[[candidate]]\nname = 'a'\nlayout = 'c4 x o'\n", "unknown token"),
    ("[screen\n", "not valid TOML"),
])
def test_a_bad_screen_file_is_one_error_naming_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(TinyMnistError, match=message.replace("[", r"\[")):
        read_screen(path)


def test_a_candidate_may_be_a_class_of_a_models_file(tmp_path):
    from pathlib import Path

    models = Path(__file__).resolve().parent / "data" / "seed_style_models.py"
    path = tmp_path / "w.toml"
    path.write_text(f"[screen]\nstep = 'final'\nmax_params = 7999\n[[candidate]]\nname = 'theirs'\n"
                    f"models_file = {str(models)!r}\nmodel = 'Model_1'\n[[candidate]]\nname = 'ours'\n")
    screen = read_screen(path)
    theirs, ours = (screen.recipe(c) for c in screen.candidates)
    assert theirs.user_model and theirs.models_file == str(models) and theirs.dropout is None and theirs.val == 10000
    assert not ours.user_model and ours.model == "Model_7"
    assert theirs.recipe() | {"model": "Model_7", "models_file": "", "dropout": ours.dropout} == ours.recipe()
