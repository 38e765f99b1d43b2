"""bench: all three pipelines measured and both ratios reported (tiny sizes; this checks shape, not speed)."""

import json

import pytest

from tinymnist.cli import main

from conftest import synthetic_mnist


def test_bench_writes_every_figure_and_ratio(tmp_path, capsys):
    synthetic_mnist(tmp_path / "d", n_train=256, n_test=64)
    out = tmp_path / "bench.json"
    code = main(["bench", "--steps", "2", "--repeats", "1", "--workers", "0", "--batch-size", "32",
                 "--concurrency", "0.5", "--data-dir", str(tmp_path / "d"), "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    for k in ("ours", "classic", "model_only"):
        assert result[k]["images_per_s"] > 0 and result[k]["batch_size"] == 32
    assert result["ours"]["epoch_plus_test_s"] > 0
    r = result["ratios"]
    assert set(r) >= {"ours/classic", "ours/model-only", "lean/plain", "heap/system", "model-step/peak",
                      "multi-run/single", "two-runs/one"} and all(v > 0 for v in r.values())
    assert result["env"]["torch"] and result["env"]["batch_size"] == 32
    hw = result["env"]["hardware"]
    assert hw["cores"] >= 1 and hw["cpu_model"]
    assert result["plain"]["heap"] == "system" and result["plain"]["memory_format"] == "contiguous"
    assert result["model_only"]["heap"] == hw["heap"] and result["system_heap"]["heap"] == "system"
    # the same step under both heap policies, each with its page faults per step counted (the measured claim of
    # runtime.py lives in bench.json, with its host)
    assert result["system_heap"]["memory_format"] == result["model_only"]["memory_format"]
    assert all(result[k]["page_faults_per_step"] >= 0 for k in ("model_only", "plain", "system_heap"))
    step = result["model_step"]
    assert step["flops_per_image"] == 6 * step["macs_per_image"] and result["gemm_peak_gflops"] > 0
    # each model-only timing is paired with the peak measured right after it, in the same process
    assert len(result["gemm_peak_runs"]) == len(result["model_only"]["runs"]) == len(step["fraction_of_peak_runs"])
    assert result["gemm_peak_gflops"] == max(result["gemm_peak_runs"])
    first = result["model_only"]["runs"][0] * step["flops_per_image"] / 1e9 / result["gemm_peak_runs"][0]
    assert abs(step["fraction_of_peak_runs"][0] - first) < 2e-3  # from unrounded figures
    assert r["model-step/peak"] == round(sorted(step["fraction_of_peak_runs"])[2], 3)  # the median of 5
    single = result["single_run"]["images_per_s"]
    assert result["multi_run"]["processes"] == hw["cores"] and result["multi_run"]["threads_each"] == 1
    assert result["two_runs"]["processes"] == 2 and len(result["two_runs"]["per_process"]) == 2
    assert single > 0 and result["multi_run"]["images_per_s"] > 0
    assert result["single_run_spinning"]["omp_wait_policy"] == "ACTIVE"
    assert result["single_run_spinning"]["gomp_spincount"] is None  # unlimited spinning, whatever the default
    assert "ours/classic" in capsys.readouterr().out


def test_classic_dataset_matches_our_normalisation():
    import torch

    from tinymnist.apps.bench import ClassicDataset
    from tinymnist.core.config import AugConfig
    from tinymnist.core.data import normalize

    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    ds = ClassicDataset(images, torch.arange(4), AugConfig())  # zero magnitude: no change but normalisation
    x, y = ds[2]
    assert y == 2 and torch.allclose(x, normalize(images[2:3])[0], atol=1e-5)


def test_small_batch_rows_pair_each_setting_with_its_own_peak_and_state_the_ratios(tmp_path):
    """bench --small-batches: per recipe and batch, at 1 and at n threads, the kernels layer by layer (before)
    and as training runs now, as programs (after), each with the peak its own process measured."""
    from tinymnist.apps.bench import FLOPS_PER_MAC, small_batch_rows
    from tinymnist.core.data import load_mnist
    from tinymnist.lab.series import get_step

    synthetic_mnist(tmp_path / "d", n_train=64, n_test=16)
    data = load_mnist(str(tmp_path / "d"))
    final = get_step("final").config
    result = small_batch_rows(data, {"final": ("Model_7", final)}, batches=(8,), threads=2, steps=2, repeats=1,
                              log=None, gemm_seconds=0.05)
    assert [(r["recipe"], r["batch_size"]) for r in result["rows"]] == [("final", 8)]
    for row in result["rows"]:
        for name in ("one_thread_before", "one_thread", "before", "after"):
            cell = row[name]
            assert cell["images_per_s"] > 0 and len(cell["runs"]) == len(cell["gemm_peak_gflops"]) == 1
            expect = cell["runs"][0] * FLOPS_PER_MAC * row["macs_per_image"] / 1e9 / cell["gemm_peak_gflops"][0]
            assert abs(cell["fraction_of_peak"] - expect) < 2e-3 * max(1, expect)
        assert row["after/before"] == round(row["after"]["images_per_s"] / row["before"]["images_per_s"], 3)
        assert row["one/before"] == round(row["one_thread"]["images_per_s"]
                                          / row["one_thread_before"]["images_per_s"], 3)
        assert row["threads/one"] == round(row["after"]["images_per_s"] / row["one_thread"]["images_per_s"], 3)
        assert row["threads"] == 2 and row["macs_per_image"] > 0
    assert result["env"]["hardware"]["cpu_model"] and result["env"]["torch"]


def test_layer_rows_split_a_step_into_its_layers_and_the_rest(tmp_path):
    """bench --layers: each leaf of the answer's program, forward and backward, at each thread count; its
    multiply-adds are the network's own (summary.py counts the same), and the step is its layers plus the rest."""
    from tinymnist.apps.bench import layer_rows
    from tinymnist.core.data import load_mnist
    from tinymnist.lab.series import get_step
    from tinymnist.models.model import create_model
    from tinymnist.models.summary import summarize

    synthetic_mnist(tmp_path / "d", n_train=64, n_test=16)
    data = load_mnist(str(tmp_path / "d"))
    step = get_step("dw-gelu-8000")
    result = layer_rows(data, step.config.model, step.config, step.name, batch_size=8, thread_counts=(1, 2),
                        steps=2, repeats=1, log=None, gemm_seconds=0.05)
    assert [r["threads"] for r in result["rows"]] == [1, 2] and result["batch_size"] == 8
    macs = summarize(create_model(step.config.model)).macs
    for row in result["rows"]:
        layers = [leaf["layer"] for leaf in row["leaves"]]
        assert layers[0] == "conv 1→8 3×3 on 28×28" and "max pool 2×2, 12 channels on 22×22" in layers
        convs = [leaf for leaf in row["leaves"] if leaf["macs"]]
        # forward once, backward twice (input and weight gradients) but the first conv's input needs none
        assert sum(leaf["macs"] for leaf in convs) == 8 * (3 * macs - 26 * 26 * 8 * 9)
        for leaf in row["leaves"]:
            assert leaf["forward_ms"] > 0 and leaf["backward_ms"] > 0
            if leaf["macs"]:
                t = (leaf["forward_ms"] + leaf["backward_ms"]) / 1e3
                assert abs(leaf["gflops"] - 2 * leaf["macs"] / t / 1e9) <= 0.01 * leaf["gflops"] + 0.01
                assert leaf["of_peak"] == pytest.approx(leaf["gflops"] / row["gemm_peak_gflops"], abs=0.002, rel=0.01)
        assert row["rest_ms"] == pytest.approx(row["step_ms"] - row["leaves_ms"], abs=2e-3)
    assert result["env"]["hardware"]["cpu_model"] and result["env"]["torch"]
