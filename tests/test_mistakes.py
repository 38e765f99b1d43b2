"""tinymnist errors: the misclassified images of a checkpoint, counted exactly as its recorded accuracy says."""

import json

from tinymnist.cli import main


def test_errors_writes_three_files_and_counts_match_the_recorded_accuracy(trained_run, real_data_dir, tmp_path,
                                                                          capsys):
    out = tmp_path / "errors"
    assert main(["errors", str(trained_run / "model.pt"), "--out", str(out), "--data-dir", str(real_data_dir)]) == 0
    result = json.loads((out / "errors.json").read_text())
    recorded = json.loads((trained_run / "history.json").read_text())[-1]["test_acc"]
    assert result["errors"] == round(10_000 * (100 - recorded) / 100) == len(result["misclassified"])
    assert sum(map(sum, result["confusion"])) == 10_000
    assert sum(result["confusion"][t][t] for t in range(10)) == 10_000 - result["errors"]
    probs = [e["probability"] for e in result["misclassified"]]
    assert probs == sorted(probs, reverse=True)  # most confident first
    assert all(e["true"] != e["predicted"] for e in result["misclassified"])
    for name in ("misclassified.png", "confusion.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{result['errors']} of 10,000 test images misclassified" in capsys.readouterr().out


def test_errors_on_a_bad_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "x.pt").write_text("nope")
    assert main(["errors", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a tinymnist checkpoint" in err and not (tmp_path / "o").exists()


def test_every_check_file_becomes_a_proof_picture(tmp_path):
    import shutil
    from pathlib import Path

    from tinymnist.pages.report import replot_checks

    # a frozen copy of a real check's evidence (results/check-final.json, which a new check would overwrite)
    shutil.copy(Path(__file__).resolve().parent / "data" / "check-final.json", tmp_path / "check-final.json")
    drawn = replot_checks(tmp_path)
    assert drawn == [tmp_path / "check-final.png"] and drawn[0].read_bytes()[:4] == b"\x89PNG"


def test_errors_never_writes_into_the_package(tmp_path):
    from pathlib import Path

    import tinymnist
    from tinymnist.apps.misclassified import PACKAGED_OUT, default_out

    shipped = Path(tinymnist.__file__).resolve().parent / "assets" / "model.pt"
    assert default_out(shipped) == PACKAGED_OUT and not PACKAGED_OUT.is_absolute()  # under the current directory
    run = tmp_path / "runs" / "final-1" / "model.pt"
    assert default_out(run) == run.parent  # a run's own directory, as before
