"""The series: models, steps, the check verdict, and the README section generated from results/."""

import re
from pathlib import Path

import pytest
import torch

from tinymnist.lab.check import verdict
from tinymnist.lab.series import ANSWER, ANSWER_WHY, STEPS, answer, get_step, last_step
from tinymnist.models.model import create_model, list_models
from tinymnist.pages.common import step_result
from tinymnist.pages.report import PAGES, SECTIONS, generated_section, page_section

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_with_the_right_output(name):
    model = create_model(name).eval()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_models_are_numbered_in_series_order():
    used = [s.config.model for s in STEPS]
    assert used == sorted(used, key=lambda n: int(n.split("_")[1]))
    assert list_models() == [f"Model_{i}" for i in range(1, len(list_models()) + 1)]
    assert set(used) == set(list_models())  # no model outside the series, no step without a model


def test_last_step_meets_the_budget():
    s = last_step()
    assert s is STEPS[-1] and get_step(s.name) is s
    assert create_model(s.config.model, dropout=s.config.dropout).num_params() < 8000
    assert s.config.epochs <= 15


def _passing_checks() -> dict:
    """step -> its committed check evidence, for every step whose 5-seed (or more) test check passes with the
    step's current recipe."""
    import json

    from tinymnist.core.config import TrainConfig

    passing = {}
    for path in sorted((ROOT / "results").glob("check-*.json")):
        ev = json.loads(path.read_text())
        step = get_step(ev["step"])
        same = TrainConfig.from_dict(ev["config"]).recipe() == step.config.recipe()
        if same and ev["passed"] and ev["metric"] == "test_acc" and len(ev["seeds"]) >= 5 and ev["last"] >= 5:
            passing[step.name] = ev
    return passing


def _reliable_checks() -> dict:
    """step -> its committed 20-seed test check (results/check20-<step>.json), for every step that check shows
    reliable with the step's current recipe."""
    import json

    from tinymnist.core.config import TrainConfig
    from tinymnist.target import RELIABLE_SEEDS, is_reliable

    found = {}
    for path in sorted((ROOT / "results").glob("check20-*.json")):
        ev = json.loads(path.read_text())
        step = get_step(ev["step"])
        same = TrainConfig.from_dict(ev["config"]).recipe() == step.config.recipe()
        rate = ev.get("pass_rate") or {}
        if (same and ev["metric"] == "test_acc" and [s["seed"] for s in ev["seeds"]] == list(range(RELIABLE_SEEDS))
                and is_reliable(rate.get("passes", 0), len(ev["seeds"])) and rate.get("reliable")):
            found[step.name] = ev
    return found


def test_the_answer_is_the_smallest_reliable_step_and_passed_its_5_seed_check_first():
    reliable_steps, passing = _reliable_checks(), _passing_checks()
    assert ANSWER in reliable_steps, f"the answer {ANSWER!r} has no reliable 20-seed check under results/"
    assert ANSWER in passing, "a 20-seed check is run only for a step that passed its 5-seed check"
    params = {name: get_step(name).config.build_model().num_params() for name in reliable_steps}
    assert params[ANSWER] == min(params.values())
    smaller = [s.name for s in STEPS if s.config.build_model().num_params() < params[ANSWER]]
    assert not set(smaller) & set(reliable_steps), "a smaller step is reliable: it is the answer now"
    assert answer() is get_step(ANSWER)


def test_the_readme_names_the_smallest_5_of_5_step_and_the_smallest_reliable_one():
    passing = _passing_checks()
    smallest = min(passing, key=lambda n: get_step(n).config.build_model().num_params())
    head = (ROOT / "README.md").read_text().split("<!-- headline:start -->")[1].split("<!-- headline:end -->")[0]
    first, second = head.split("**The smallest reliable step**")
    assert f"[{smallest}]" in first and f"[{ANSWER}]" in second.split("\n")[0]


def test_the_shipped_model_is_the_answer():
    import json

    from tinymnist.core.config import TrainConfig
    from tinymnist.apps.demo import shipped_checkpoint
    from tinymnist.core.runs import load_checkpoint

    shipped = shipped_checkpoint()
    saved = TrainConfig.from_dict(json.loads((shipped.parent / "config.json").read_text())["config"])
    assert saved.recipe() == answer().config.recipe()
    _, cfg = load_checkpoint(shipped)
    assert cfg.recipe() == answer().config.recipe()


def test_train_with_no_step_trains_the_answer_and_says_why(tmp_path, capsys, monkeypatch):
    from tinymnist import cli

    seen = {}

    def fake_train_run(cfg, out=None, name=None, **kw):
        seen.update(cfg=cfg, name=name)
        return Path(out), [{"epoch": 1, "test_acc": 10.0}]

    monkeypatch.setattr("tinymnist.core.runs.train_run", fake_train_run)
    assert cli.main(["train", "--out", str(tmp_path / "run")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert seen["name"] == ANSWER and seen["cfg"] == answer().config
    assert first.startswith(f"training step {ANSWER} ") and f"the answer: {ANSWER_WHY}" in first


@pytest.mark.parametrize("step", [s for s in STEPS if s.chosen_by], ids=lambda s: s.name)
def test_a_searched_step_trains_the_recipe_its_trial_chose(step):
    import json
    from dataclasses import replace

    from tinymnist.lab.space import load_space

    study, number = step.chosen_by
    trials = json.loads((ROOT / "results" / f"sweep-{study}" / "trials.json").read_text())["trials"]
    row = next(r for r in trials if r["trial"] == number)
    space = load_space(ROOT / "spaces" / f"{study}.toml")
    chosen = space.config(row["values"])
    cfg = step.config
    # the trial's recipe, refit on every training image, its layout now a named model, its LR rounded
    assert chosen.val > 0 and cfg.val == 0 and f"{chosen.lr:.3g}" == f"{cfg.lr:.3g}"
    assert create_model(cfg.model).layout == chosen.layout
    assert replace(chosen, val=0, lr=cfg.lr, layout="", model=cfg.model) == cfg
    assert row["params"] == cfg.build_model().num_params() <= space.max_params


def test_readme_parameter_counts_match_the_models():
    section = generated_section(ROOT / "docs" / "series.md", "experiments")
    rows = re.findall(r"^\| \[([\w-]+)\]\([^)]*\) \| (Model_\d+) \| ([\d,]+) \|", section, re.M)
    assert [r[0] for r in rows] == [s.name for s in STEPS]
    for step, model, params in rows:
        assert int(params.replace(",", "")) == create_model(model, dropout=get_step(step).config.dropout).num_params()


@pytest.mark.parametrize("page, section", [(p, s) for p, sections in PAGES.items() for s in sections])
def test_every_page_section_is_what_the_generator_produces(page, section):
    assert generated_section(ROOT / page, section) == page_section(page, section, ROOT / "results"), \
        f"{page} is stale: run `tinymnist report`"


def test_every_section_has_a_page():
    assert sorted(s for sections in PAGES.values() for s in sections) == sorted(SECTIONS)


def test_report_regenerates_every_page_byte_for_byte(tmp_path):
    """`tinymnist report` on a copy of the pages with every generated section emptied gives the committed pages."""
    import shutil

    from tinymnist.pages.common import markers
    from tinymnist.pages.report import update_pages

    for page, sections in PAGES.items():
        text = (ROOT / page).read_text()
        for name in sections:
            start, end = markers(name)
            text = text.split(start)[0] + start + end + text.split(end, 1)[1]
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / page).write_text(text)
    shutil.copytree(ROOT / "results", tmp_path / "results")
    shutil.copytree(ROOT / "spaces", tmp_path / "spaces")  # a search's section names its space's fixed fields
    assert update_pages(tmp_path, tmp_path / "results")
    for page in PAGES:
        assert (tmp_path / page).read_bytes() == (ROOT / page).read_bytes(), page
    assert update_pages(tmp_path, tmp_path / "results") == []


def test_a_page_without_its_markers_is_one_clear_error(tmp_path):
    from tinymnist.errors import TinyMnistError
    from tinymnist.pages.report import update_pages

    for page in PAGES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / page).write_text("# no markers\n")
    with pytest.raises(TinyMnistError, match="README.md has no <!-- setup-time:start -->"):
        update_pages(tmp_path, ROOT / "results")


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def _anchors(page: Path) -> set[str]:
    from tinymnist.pages.common import _anchor

    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")))
def test_every_link_and_image_works_from_its_page(page):
    here = ROOT / page
    for link in _links(here):
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        path = (here.parent / target).resolve() if target else here
        assert path.exists(), f"{page}: {link} points at nothing"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{page}: {link}: no such heading"


def test_the_readme_reads_in_two_minutes():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    order = ["```bash", "<!-- headline:start -->", "<!-- answer:start -->", "docs/demo.png", "## Use a trained model",
             "## Commands", "## More"]
    assert [text.index(x) for x in order] == sorted(text.index(x) for x in order)


def test_results_record_their_run():
    for s in STEPS:
        r = step_result(s, ROOT / "results")
        if r is None:
            continue
        meta = r["meta"]
        assert meta["config"]["model"] == s.config.model and meta["config"]["seed"] == s.config.seed
        assert meta["params"] == create_model(s.config.model, dropout=s.config.dropout).num_params()
        assert meta["env"]["torch"] and meta["env"]["device"]
        assert [h["epoch"] for h in r["history"]] == list(range(1, s.config.epochs + 1))


def _history(accs):
    return [{"epoch": i + 1, "test_acc": a} for i, a in enumerate(accs)]


def test_verdict_passes_when_every_seed_holds():
    hs = [_history([98.0] * 10 + [99.41, 99.5, 99.45, 99.6, 99.4]), _history([99.0] * 10 + [99.5] * 5)]
    rules = verdict(7432, 15, hs, last=5)
    assert all(r.passed for r in rules)


@pytest.mark.parametrize("params, epochs, accs, failing", [
    (7432, 15, [99.5, 99.5, 99.39, 99.5, 99.5], 2),  # one dip in the window
    (8000, 15, [99.5] * 5, 0),  # the budget is strictly fewer than 8,000
    (7432, 16, [99.5] * 5, 1),
])
def test_verdict_fails_on_each_rule(params, epochs, accs, failing):
    hs = [_history([99.0] * 10 + [99.5] * 5), _history([99.0] * 10 + accs)]
    rules = verdict(params, epochs, hs, last=5)
    assert [i for i, r in enumerate(rules) if not r.passed] == [failing]


def test_verdict_ignores_epochs_before_the_window_and_needs_enough_epochs():
    assert verdict(7000, 15, [_history([10.0] + [99.5] * 5)], last=5)[2].passed
    assert not verdict(7000, 15, [_history([99.5] * 3)], last=5)[2].passed
    assert not verdict(7000, 15, [], last=5)[2].passed


@pytest.mark.parametrize("passes, seeds, bound", [
    (5, 5, 0.549), (19, 20, 0.784), (20, 20, 0.861), (18, 20, 0.717), (14, 16, 0.656), (0, 5, 0.0), (1, 1, 0.05),
])
def test_the_pass_rate_bound_is_clopper_pearsons_one_sided_95_percent(passes, seeds, bound):
    # known values: 5 of 5 is 0.05 ** (1/5); 19 and 20 of 20 as the issue states them; 1 of 1 is 1 - 0.95
    from tinymnist.target import pass_rate_bound, pass_rate_words

    assert pass_rate_bound(passes, seeds) == pytest.approx(bound, abs=5e-4)
    assert pass_rate_words(passes, seeds).startswith(f"{passes} of {seeds} seeds pass; per-run pass rate ≥ {bound:.2f}")
    with pytest.raises(ValueError):
        pass_rate_bound(seeds + 1, seeds)


def test_a_proof_counts_the_seeds_that_pass_and_calls_a_step_reliable_at_19_of_20():
    from tinymnist.lab.check import proof

    def ev(worsts, params_ok=True):
        return {"last": 5, "passed": False, "metric": "test_acc", "threshold": 99.4,
                "rules": [{"passed": params_ok}, {"passed": True}, {"passed": False}],
                "seeds": [{"history": _history([99.0] * 10 + [w] * 5)} for w in worsts]}

    pr = proof(ev([99.5] * 19 + [99.39]))
    assert (pr.passes, pr.seeds, pr.reliable) == (19, 20, True) and pr.rate_bound == pytest.approx(0.784, abs=5e-4)
    assert not proof(ev([99.5] * 18 + [99.3, 99.39])).reliable  # 18 of 20
    assert not proof(ev([99.5] * 5)).reliable  # 5 of 5 is the rule's proof, not a rate
    assert proof(ev([99.5] * 20, params_ok=False)).passes == 0  # over budget: no run passes


def test_a_second_check_at_a_budget_is_recorded_as_the_second_look_at_test(tmp_path, monkeypatch):
    import dataclasses
    import json

    from tinymnist.lab import series as experiments
    from tinymnist.lab.check import earlier_test_looks

    later = dataclasses.replace(get_step("half"), name="half-again")
    monkeypatch.setattr(experiments, "STEPS", experiments.STEPS + (later,))
    assert earlier_test_looks("half-again", 5000, tmp_path) == []
    (tmp_path / "check-half.json").write_text(json.dumps({"step": "half", "metric": "test_acc"}))
    (tmp_path / "check-final.json").write_text(json.dumps({"step": "final", "metric": "test_acc"}))
    (tmp_path / "check-half-val.json").write_text(json.dumps({"step": "half", "metric": "val_acc"}))
    assert earlier_test_looks("half-again", 5000, tmp_path) == ["half"]  # final has another budget
    assert earlier_test_looks("half", 5000, tmp_path) == []  # a re-run of one step is not a new look


def test_the_committed_budget_5000_check_is_the_second_look_and_the_frontier_says_so():
    import json

    ev = json.loads(Path("results/check-budget-5000.json").read_text())
    assert (ev["budget"], ev["test_look"], ev["earlier_looks"]) == (5000, 2, ["half"])
    row = next(line for line in Path("README.md").read_text().splitlines()
               if line.startswith("| ≤ 5,000 | [budget-5000]"))  # the frontier table's row
    assert "look 2 at test for this budget" in row


def test_the_searches_page_marks_the_trial_each_step_refits_with_its_per_seed_scores():
    import json

    page = Path("docs/searches.md").read_text()
    for s in STEPS:
        if not s.chosen_by:
            continue
        study, number = s.chosen_by
        trial = next(t for t in json.loads(Path(f"results/sweep-{study}/trials.json").read_text())["trials"]
                     if t["trial"] == number)
        per_seed = ", ".join(f"{v:.2f}" for v in trial["val_worst"])
        row = rf"^\| {number} → `{s.name}` \|.*\| {trial['objective']:.2f}% \| {per_seed} \|$"
        assert re.search(row, page, re.M), s.name


def test_step_prose_names_the_numbers_results_hold_instead_of_typing_them():
    import re

    from tinymnist.pages.common import NOT_CONFIRMED
    from tinymnist.pages.series_page import PLACEHOLDER, fill

    for s in STEPS:
        for text in (s.target, s.analysis):
            # accuracies to the hundredth, seed counts and trial counts come from results/, never from the prose
            typed = re.findall(r"\b99\.(?!40%)\d\d%", text)  # 99.40% is the rule's line, not a result
            assert not typed, (s.name, typed)
            filled = fill(text, s, ROOT / "results")  # every placeholder names a number results/ holds
            assert not PLACEHOLDER.search(filled)
            assert NOT_CONFIRMED not in filled, s.name  # every confirmation the prose names is committed
    assert [s.heading.split(".")[0] for s in STEPS] == [str(i) for i in range(1, len(STEPS) + 1)]


def test_the_validation_check_that_earned_a_look_is_named_not_typed():
    import json
    import statistics

    from tinymnist.lab.check import worst_of_last
    from tinymnist.pages.series_page import fill

    def worsts(path):
        ev = json.loads(path.read_text())
        return [worst_of_last(s["history"], ev["last"], ev["metric"]) for s in ev["seeds"]]

    step = get_step("writeup-002")
    screen, cand = step.screened_by
    val = worsts(ROOT / "results" / f"screen-{screen}" / f"confirm-{cand}.json")
    test = worsts(ROOT / "results" / "check-writeup-002.json")
    got = fill("{screened.worst} {screened.mean_worst} {check.mean_worst} {screen.writeups.writeup-002-7288.worst}",
               step, ROOT / "results")
    assert got == (f"{min(val):.2f}% {statistics.mean(val):.3f}% {statistics.mean(test):.3f}% {min(val):.2f}%")


def test_an_unknown_placeholder_is_one_error_naming_the_step():
    from tinymnist.errors import TinyMnistError
    from tinymnist.pages.series_page import fill

    with pytest.raises(TinyMnistError, match=r"steps/final.md: no number \{check.luck\}"):
        fill("the {check.luck} of it", get_step("final"), ROOT / "results")
    # a confirmation that results/ does not hold (a fresh reproduce) is said to be missing, not made up
    assert fill("{screen.writeups.nobody.worst}", get_step("final"), ROOT / "results") == "[not confirmed yet]"
    with pytest.raises(TinyMnistError, match=r"steps/final.md: no number \{screened.worst\}"):
        fill("{screened.worst}", get_step("final"), ROOT / "results")  # final was not earned by a screen


def test_a_screened_step_trains_its_candidates_recipe_on_all_the_images():
    from dataclasses import replace

    from tinymnist.lab.screen import read_screen

    for s in STEPS:
        if s.screened_by:
            screen_name, cand = s.screened_by
            screen = read_screen(ROOT / "screens" / f"{screen_name}.toml")
            chosen = screen.recipe(next(c for c in screen.candidates if c.name == cand))
            # the same training, and the same network: a candidate written as a layout (and an activation) may be
            # a numbered model now
            same = {"model": s.config.model, "layout": s.config.layout, "activation": s.config.activation}
            assert replace(chosen, val=0, **same).recipe() == s.config.recipe()
            assert str(chosen.build_model().net) == str(s.config.build_model().net)
            assert (ROOT / "results" / f"screen-{screen_name}" / f"confirm-{cand}.json").is_file()


def test_the_frontier_draws_one_validation_point_per_budget_the_best_of_its_confirmations():
    import json
    import statistics

    from tinymnist.pages.frontier import _validation_points

    results = ROOT / "results"
    by_budget: dict[int, list[tuple[float, str]]] = {}
    for path in sorted(results.glob("screen-*/screen.json")):
        sc = json.loads(path.read_text())
        for c in sc["confirmed"]:
            if not (path.parent / f"confirm-{c['name']}.json").is_file():
                continue  # a confirmation still training
            ev = json.loads((path.parent / f"confirm-{c['name']}.json").read_text())
            worsts = [min(s["history"][-1 - i]["val_acc"] for i in range(ev["last"])) for s in ev["seeds"]]
            by_budget.setdefault(sc["max_params"], []).append((statistics.mean(worsts), f"{sc['screen']}: {c['name']}"))
    points = [p for p in _validation_points(results) if "confirmed" in p["name"]]
    assert len(points) == len(by_budget)  # one point per budget, however many confirmations it holds
    for budget, group in by_budget.items():
        best = max(group, key=lambda t: t[0])[1]  # a tie (the same runs, confirmed again by a later screen): the first
        assert any(p["name"].startswith(best + "\n") and f"≤ {budget:,}" in p["name"] for p in points), budget


def test_only_the_answer_names_the_shipped_checkpoint_in_its_errors_section():
    """results/<step>/errors/errors.json records the checkpoint it evaluated, and for a step that was once the answer
    that is the package's model.pt, which now holds another step's run: the page then names the run instead, and
    says where its config.json is."""
    from tinymnist.pages.common import RESULTS
    from tinymnist.pages.series_page import _errors_section

    shown = {}
    for step in STEPS:
        lines = _errors_section(step, RESULTS)
        if lines:
            shown[step.name] = lines[2]
    assert ANSWER in shown and len(shown) > 1
    for name, line in shown.items():
        assert ("src/tinymnist/assets/model.pt" in line) == (name == ANSWER), name
        found = re.search(r"`(results/[^`]+)`\.$", line)
        assert found and (RESULTS.parent / found.group(1) / "config.json").is_file(), name
