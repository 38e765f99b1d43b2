"""The pages' machinery: records read once, one table helper, templates that refuse a missing name, and sections
that say when their evidence is not there yet."""

import json

import jinja2
import pytest

from tinymnist.pages.records import Records
from tinymnist.pages.render import paragraph, render_template, table
from tinymnist.pages.performance import render_setup_time


def test_table_aligns_each_column_and_refuses_a_missing_alignment():
    assert table(["a", "b"], "lr", [[1, "x"], ["y", 2.5]]).splitlines() == [
        "| a | b |", "| --- | ---: |", "| 1 | x |", "| y | 2.5 |"]
    with pytest.raises(ValueError):
        table(["a", "b"], "l", [])


def test_a_paragraph_is_one_line_however_the_template_wraps_it():
    assert paragraph("  one\n two\n\n  three ") == "one two three"


def test_a_template_refuses_a_name_its_records_lack(tmp_path):
    with pytest.raises(jinja2.UndefinedError):
        render_template("setup_time.md.j2")  # no fc at all: an error, never an empty sentence


def test_records_read_each_file_once_and_a_section_says_when_nothing_was_timed(tmp_path, monkeypatch):
    from tinymnist.pages import records

    assert "has not been timed yet" in render_setup_time(tmp_path)
    (tmp_path / records.FIRST_COMMAND).write_text(json.dumps(
        {"seconds": 125.4, "python": "3.11.7", "data": "from TINYMNIST_DATA",
         "hardware": {"cpu_model": "Some CPU", "cores": 2, "isa": {"avx2": True}}}))
    reads = []
    real = records.read_json
    monkeypatch.setattr(records, "read_json", lambda p: reads.append(p) or real(p))
    r = Records(tmp_path)
    fc = r.first_command()
    assert r.first_command() == fc and len(reads) == 1
    assert (fc.minutes, fc.seconds, fc.data_from_dir) == (2, 5, True) and fc.host.startswith("Some CPU (2 cores")
    text = render_setup_time(tmp_path)
    assert "**2 min 05 s**" in text and "Python 3.11.7 and MNIST read from `TINYMNIST_DATA`" in text
    assert len([line for line in text.splitlines() if line.startswith("From a fresh clone")]) == 1


def test_a_before_and_after_of_versions_reads_as_a_table_per_file(tmp_path):
    from tinymnist.pages import records
    from tinymnist.pages.performance import _version_lines

    assert _version_lines(tmp_path) == []  # nothing measured: no section
    hw = {"cpu_model": "Some CPU", "cores": 2, "isa": {"avx2": True}}
    (tmp_path / records.VERSIONS_DIR).mkdir()
    (tmp_path / records.VERSIONS_DIR / "ab-x.json").write_text(json.dumps({
        "step": "final", "model": None, "batch_size": 32, "unit": "one epoch on real MNIST, test pass included",
        "steps": None, "rounds": 3, "trees": {"old": {"commit": "a" * 40, "dirty": False},
                                              "new": {"commit": "b" * 40, "dirty": False}},
        "summary": {"old@1": {"median_images_per_s": 1000.0, "paired_ratio_to_old": 1.0,
                              "median_images_per_s_per_gflops": 10.0, "paired_ratio_per_gflops_to_old": 1.0},
                    "new@1": {"median_images_per_s": 1500.4, "paired_ratio_to_old": 1.512,
                              "median_images_per_s_per_gflops": 15.0, "paired_ratio_per_gflops_to_old": 1.49},
                    "old@2": {"median_images_per_s": 1200.0, "paired_ratio_to_old": 1.0,
                              "median_images_per_s_per_gflops": 6.0, "paired_ratio_per_gflops_to_old": 1.0},
                    "new@2": {"median_images_per_s": 2475.0, "paired_ratio_to_old": 2.06,
                              "median_images_per_s_per_gflops": 12.0, "paired_ratio_per_gflops_to_old": 2.0},
                    "old:2/1 threads": 1.2, "new:2/1 threads": 1.65},
        "env": {"hardware": hw}}))
    (ab,) = Records(tmp_path).versions()
    assert ab.base == "old" and ab.trees == (("old", "aaaaaaa"), ("new", "bbbbbbb")) and ab.model == "Model_7"
    assert [(c.tree, c.threads, c.ratio) for c in ab.cells] == [("old", 1, 1.0), ("new", 1, 1.512), ("old", 2, 1.0),
                                                                ("new", 2, 2.06)]
    text = "\n".join(_version_lines(tmp_path))
    assert "`final`'s recipe (`Model_7`, batch 32), one epoch on real MNIST, test pass included, 3 rounds" in text
    assert "| new | 1 | 1,500 | 1.51 | 1.49 |" in text
    assert "| new | 2 | 2,475 | 2.06 | 2.00 |" in text
    assert "One run's images/s at 2 threads over 1: `old` 1.20×, `new` 1.65×." in text
