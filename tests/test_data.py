import gzip

import pytest
import torch

from tinymnist.core.config import AugConfig
from tinymnist.core.data import (Loader, affine_matrices, augment, load_mnist, parse_idx, read_idx, sampling_grid,
                                 warp)
from tinymnist.errors import DataError

from conftest import idx_bytes, synthetic_mnist


def test_parse_valid_idx_roundtrip():
    arr = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    out = parse_idx(idx_bytes(arr), "x", expect_ndim=3)
    assert out.dtype == torch.uint8 and torch.equal(out, arr)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"\x00\x00\x0d\x03" + b[4:], "magic"),  # float dtype: not MNIST
    (lambda b: b"\x01" + b[1:], "magic"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: b[:10], "truncated"),
    (lambda b: b + b"\x00", "trailing"),
    (lambda b: b[:2], "too short"),
])
def test_parse_rejects_bad_bytes(mutate, message):
    good = idx_bytes(torch.zeros(2, 28, 28, dtype=torch.uint8))
    with pytest.raises(DataError, match=message) as e:
        parse_idx(mutate(good), "bad-file")
    assert "bad-file" in str(e.value)


def test_parse_rejects_wrong_dimensions():
    with pytest.raises(DataError, match="expected 3 dimensions, found 1"):
        parse_idx(idx_bytes(torch.zeros(5, dtype=torch.uint8)), "labels-as-images", expect_ndim=3)


def test_read_gzipped_and_raw(tmp_path):
    arr = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    assert torch.equal(read_idx(tmp_path / "a.gz"), arr)
    assert torch.equal(read_idx(tmp_path / "a"), arr)


def test_corrupt_gzip_names_the_file(tmp_path):
    data = gzip.compress(idx_bytes(torch.zeros(3, 28, 28, dtype=torch.uint8)))
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        read_idx(bad)


def test_load_mnist_from_synthetic_dir(synth_dir):
    m = load_mnist(synth_dir, download=False)
    assert m.train_images.shape == (64, 28, 28) and m.train_images.dtype == torch.uint8
    assert m.test_labels.shape == (32,) and m.test_labels.dtype == torch.int64


def test_load_mnist_raw_files(tmp_path):
    synthetic_mnist(tmp_path, gz=False)
    assert load_mnist(tmp_path, download=False).train_images.shape[0] == 64


def test_load_mnist_rejects_label_count_mismatch(tmp_path):
    synthetic_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(torch.zeros(5, dtype=torch.uint8))))
    with pytest.raises(DataError, match="64 images but 5 labels"):
        load_mnist(tmp_path, download=False)


def test_missing_file_without_download(tmp_path):
    with pytest.raises(DataError, match="missing"):
        load_mnist(tmp_path, download=False)


def test_data_dir_precedence(monkeypatch, tmp_path):
    from tinymnist.core.data import default_data_dir, resolve_data_dir

    monkeypatch.setenv("TINYMNIST_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("TINYMNIST_DATA")
    assert resolve_data_dir(None) == default_data_dir()


# ---------------------------------------------------------------- augmentation


def test_zero_magnitude_augmentation_is_identity():
    x = torch.rand(16, 1, 28, 28)
    assert torch.equal(augment(x.clone(), AugConfig(), torch.Generator().manual_seed(0)), x)
    # the sampling path itself, with zero-magnitude parameters, must not move a pixel either
    theta = affine_matrices(16, AugConfig(), torch.Generator().manual_seed(0))
    assert torch.allclose(warp(x, theta), x, atol=1e-5)


@pytest.mark.parametrize("n, h, w", [(32, 28, 28), (5, 7, 11), (1, 1, 3)])
def test_the_sampling_grid_is_affine_grids(n, h, w):
    # the same coordinates as PyTorch's affine_grid (a batched multiply there), for the augmentation's own maps and
    # for arbitrary ones; on AMD EPYC AVX-512 they are bit for bit equal, elsewhere the multiply may round otherwise
    gen = torch.Generator().manual_seed(n)
    for theta in (affine_matrices(n, AugConfig(rotate=10, translate=0.08, scale=0.08), gen),
                  torch.rand(n, 2, 3, generator=gen) * 4 - 2):
        ours = sampling_grid(theta, h, w)
        theirs = torch.nn.functional.affine_grid(theta, [n, 1, h, w], align_corners=False)
        assert ours.shape == theirs.shape == (n, h, w, 2)
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)  # within a rounding or two, on any host
        # a point of the grid is the map applied to that pixel's centre
        x, y = (2 * 0 + 1) / w - 1, (2 * (h - 1) + 1) / h - 1
        want = theta[:, :, 0] * x + theta[:, :, 1] * y + theta[:, :, 2]
        assert torch.allclose(ours[:, h - 1, 0], want, atol=1e-6)


def test_augmentation_is_per_sample_and_seeded():
    x = torch.rand(1, 1, 28, 28).expand(8, 1, 28, 28).contiguous()
    aug = AugConfig(rotate=15, translate=0.1, scale=0.1, erase_p=0.5)
    a = augment(x.clone(), aug, torch.Generator().manual_seed(1))
    b = augment(x.clone(), aug, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])  # every sample gets its own parameters


def test_translation_moves_content_and_fills_black():
    x = torch.zeros(1, 1, 28, 28)
    x[..., 10:18, 10:18] = 1.0
    theta = torch.tensor([[[1.0, 0.0, -2 * 4 / 28], [0.0, 1.0, 0.0]]])  # sample 4 px to the left = shift right
    y = warp(x, theta)
    assert torch.allclose(y[..., 10:18, 14:22], torch.ones(1, 1, 8, 8), atol=1e-5)
    assert y[..., :, :14].abs().max() < 1e-5


def test_erase_blacks_out_a_rectangle():
    x = torch.ones(32, 1, 28, 28)
    y = augment(x.clone(), AugConfig(erase_p=1.0), torch.Generator().manual_seed(0))
    erased = (y == 0).flatten(1).sum(1)
    assert (erased > 0).all() and (erased < 28 * 28 * 0.3).all()


# ---------------------------------------------------------------- loader


def test_loader_shapes_and_normalisation(synth_dir):
    m = load_mnist(synth_dir, download=False)
    loader = Loader(m.train_images, m.train_labels, batch_size=20, shuffle=True, seed=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [b[0].shape for b in batches] == [(20, 1, 28, 28)] * 3 + [(4, 1, 28, 28)]
    assert batches[0][0].dtype == torch.float32 and batches[0][1].dtype == torch.int64
    assert sum(len(y) for _, y in batches) == 64
    assert torch.equal(torch.cat([y for _, y in batches]).sort().values, m.train_labels.sort().values)


def test_loader_is_deterministic_per_seed(synth_dir):
    m = load_mnist(synth_dir, download=False)
    aug = AugConfig(rotate=10, translate=0.1)

    def epochs(seed):
        loader = Loader(m.train_images, m.train_labels, 16, shuffle=True, seed=seed, aug=aug)
        return [torch.cat([x.flatten() for x, _ in loader]) for _ in range(2)]

    a, b, c = epochs(0), epochs(0), epochs(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])  # a new order each epoch
    assert not torch.equal(a[0], c[0])


def test_loader_limit_batches(synth_dir):
    m = load_mnist(synth_dir, download=False)
    loader = Loader(m.train_images, m.train_labels, 10, limit_batches=2)
    assert len(loader) == 2 and len(list(loader)) == 2


# ---------------------------------------------------------------- the validation split


def test_validation_split_is_stratified_disjoint_and_fixed():
    from tinymnist.core.data import split_fingerprint, validation_split

    g = torch.Generator().manual_seed(3)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate([590, 674, 596, 613, 584, 542, 592, 627, 585, 597])])
    labels = labels[torch.randperm(len(labels), generator=g)]
    train, val = validation_split(labels, 1000)
    assert len(val) == 1000 and len(train) + len(val) == len(labels)
    assert not set(train.tolist()) & set(val.tolist())
    share = torch.bincount(labels[val], minlength=10).float() / 1000
    assert torch.allclose(share, torch.bincount(labels, minlength=10).float() / len(labels), atol=0.001)
    again = validation_split(labels.clone(), 1000)[1]
    assert torch.equal(val, again) and split_fingerprint(val) == split_fingerprint(again)
    assert split_fingerprint(validation_split(labels, 1000, seed=1)[1]) != split_fingerprint(val)


def test_validation_split_rejects_impossible_sizes():
    from tinymnist.core.data import validation_split
    from tinymnist.errors import DataError

    with pytest.raises(DataError, match="cannot hold out"):
        validation_split(torch.zeros(10, dtype=torch.long), 10)


def test_fit_with_val_records_val_metrics_trains_on_the_rest_and_never_reads_the_test_set(synth_dir):
    from dataclasses import replace

    from tinymnist.core.config import TrainConfig
    from tinymnist.core.engine import fit

    data = load_mnist(synth_dir, download=False)
    cfg = TrainConfig(model="Model_7", epochs=2, batch_size=16, val=16)
    _, history = fit(cfg, data, progress=False, verbose=False)
    assert all({"val_loss", "val_acc"} <= set(r) and not {"test_loss", "test_acc"} & set(r) for r in history)
    # whatever the test set holds, a validation run is the same: it chooses a recipe, and the test set is read once,
    # by the chosen recipe's run on all training images
    scrambled = replace(data, test_images=255 - data.test_images, test_labels=(data.test_labels + 1) % 10)
    _, again = fit(cfg, scrambled, progress=False, verbose=False)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in again] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in history]
    # the train pass saw 64 - 16 images: 3 batches of 16, so its accuracy is a multiple of 1/48
    assert all(abs(r["train_acc"] * 48 / 100 - round(r["train_acc"] * 48 / 100)) < 1e-3 for r in history)


# ---------------------------------------------------------------- integrity of present files


def _real_copy(tmp_path, real_data_dir):
    import shutil

    d = tmp_path / "mnist"
    shutil.copytree(real_data_dir, d)
    return d


def test_a_changed_but_parseable_label_file_is_refused_in_one_line(tmp_path, real_data_dir):
    import gzip
    import subprocess
    import sys

    d = _real_copy(tmp_path, real_data_dir)
    f = d / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(f.read_bytes()))
    raw[8] = (raw[8] + 1) % 10  # one changed label: still a valid IDX file
    f.write_bytes(gzip.compress(bytes(raw)))
    p = subprocess.run([sys.executable, "-m", "tinymnist.cli", "train", "--epochs", "1", "--limit-batches", "1",
                        "--data-dir", str(d), "--out", str(tmp_path / "run"), "--no-progress"],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "t10k-labels-idx1-ubyte.gz: MD5 mismatch" in p.stderr
    assert not (tmp_path / "run").exists()  # never used


def test_raw_twins_are_verified_too(tmp_path, real_data_dir):
    import gzip

    from tinymnist.errors import DataError

    d = _real_copy(tmp_path, real_data_dir)
    f = d / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(f.read_bytes()))
    f.unlink()
    (d / "train-labels-idx1-ubyte").write_bytes(bytes(raw))
    load_mnist(d, download=False)  # the original, gunzipped: accepted
    raw[-1] = (raw[-1] + 1) % 10
    (d / "train-labels-idx1-ubyte").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: MD5 mismatch"):
        load_mnist(d, download=False)


def test_each_file_is_hashed_once_then_trusted_until_it_changes(tmp_path, real_data_dir, monkeypatch):
    import os

    import tinymnist.core.data as data

    d = _real_copy(tmp_path, real_data_dir)
    hashed = []
    real = data.md5sum
    monkeypatch.setattr(data, "md5sum", lambda p: hashed.append(p.name) or real(p))
    data.load_mnist(d, download=False)
    assert len(hashed) == 4
    data.load_mnist(d, download=False)
    assert len(hashed) == 4  # the stamps held
    f = d / "t10k-labels-idx1-ubyte.gz"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    data.load_mnist(d, download=False)
    assert hashed[4:] == ["t10k-labels-idx1-ubyte.gz"]
