"""predict: MNIST-style preprocessing of ordinary images, bad input, and the ONNX export."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tinymnist.cli import main
from tinymnist.core.data import load_mnist
from tinymnist.apps.predict import ImageError, load_image, preprocess_image


def user_image(digit_u8: torch.Tensor, mode: str = "L") -> Image.Image:
    """What a person would hand us: the digit 10x larger, black ink on white paper, with a wide margin."""
    big = Image.fromarray(255 - digit_u8.numpy()).resize((280, 280), Image.BILINEAR)
    canvas = Image.new("L", (400, 360), 255)
    canvas.paste(big, (70, 30))
    return canvas.convert(mode)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_preprocessing_recovers_an_mnist_digit(real_data_dir):
    digits = load_mnist(real_data_dir, download=False).test_images[:100]
    corr = [np.corrcoef(preprocess_image(user_image(d)).float().flatten(), d.float().flatten())[0, 1] for d in digits]
    # thin strokes make pixel correlation very sensitive to a one-pixel rounding of the centre of mass
    assert np.mean(corr) > 0.93 and np.min(corr) > 0.6, (np.mean(corr), np.min(corr))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1"])
def test_any_mode_and_size(mode):
    img = Image.new("L", (123, 77), 255)
    img.paste(0, (50, 20, 60, 60))  # a dark vertical bar: a "1"
    out = preprocess_image(img.convert(mode))
    assert out.shape == (28, 28) and out.dtype == torch.uint8
    rows = torch.nonzero(out.max(1).values > 64).flatten()
    assert 18 <= rows[-1] - rows[0] + 1 <= 21  # the longer side is scaled to 20 px
    assert abs(float((out.float() * torch.arange(28).view(28, 1)).sum() / out.float().sum()) - 14) < 1.0


def test_transparent_canvas_drawing():
    img = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    img.paste((0, 0, 0, 255), (90, 30, 110, 170))  # black strokes on a transparent canvas
    assert preprocess_image(img).max() == 255


@pytest.mark.slow
def test_predict_classifies_user_style_images(trained_run, real_data_dir, tmp_path, capsys):
    data = load_mnist(real_data_dir, download=False)
    paths = []
    for i in range(100):
        p = tmp_path / f"digit{i:03d}.png"
        user_image(data.test_images[i]).save(p)
        paths.append(str(p))
    code, out, err = run(capsys, "predict", str(trained_run / "model.pt"), *paths, "--json", "--top", "2")
    assert code == 0, err
    preds = json.loads(out)
    assert [p["file"] for p in preds] == paths and all(len(p["top"]) == 2 for p in preds)
    correct = sum(p["digit"] == int(data.test_labels[i]) for i, p in enumerate(preds))
    assert correct >= 97, correct


def test_bad_files_are_reported_and_the_rest_classified(untrained_checkpoint, tmp_path, capsys):
    good = tmp_path / "good.png"
    user_image(torch.zeros(28, 28, dtype=torch.uint8).index_fill_(1, torch.tensor([13, 14]), 255)).save(good)
    (tmp_path / "text.png").write_text("this is not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (64, 64), (255, 255, 255)).save(tmp_path / "blank.png")
    bad = [tmp_path / "missing.png", tmp_path / "text.png", tmp_path / "empty.jpg", tmp_path / "blank.png"]
    code, out, err = run(capsys, "predict", str(untrained_checkpoint), str(good), *map(str, bad))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 4 and "Traceback" not in err
    for needle, line in zip(["no such file", "not a readable image", "empty file", "blank image"], lines):
        assert needle in line
    assert out.startswith(f"{good}: ") and len(out.strip().splitlines()) == 1


def test_not_a_checkpoint(tmp_path, capsys):
    fake = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(3)}, fake)
    img = tmp_path / "x.png"
    Image.new("L", (28, 28), 0).save(img)
    for ckpt in (fake, tmp_path / "nothing.pt", img):
        code, _, err = run(capsys, "predict", str(ckpt), str(img))
        assert code == 1 and "checkpoint" in err and len(err.strip().splitlines()) == 1


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="nope.png"):
        load_image(tmp_path / "nope.png")


HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.mark.skipif(not HAS_ONNX, reason="the [onnx] extra is not installed")
def test_onnx_export_matches_pytorch(trained_run, real_data_dir, tmp_path, capsys):
    import onnxruntime as ort

    from tinymnist.core.data import normalize
    from tinymnist.core.runs import load_checkpoint

    out = tmp_path / "model.onnx"
    code, _, err = run(capsys, "export", str(trained_run / "model.pt"), "--onnx", str(out))
    assert code == 0, err
    model, _ = load_checkpoint(trained_run / "model.pt")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = normalize(load_mnist(real_data_dir, download=False).test_images[:300])
    for batch in (x[:1], x[1:300]):  # the batch dimension is dynamic
        got = session.run(["logits"], {"image": batch.numpy()})[0]
        with torch.inference_mode():
            want = model(batch).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_export_without_onnx_names_the_package(untrained_checkpoint, tmp_path, capsys, monkeypatch):
    import importlib.util as iu

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    code, _, err = run(capsys, "export", str(untrained_checkpoint), "--onnx", str(tmp_path / "m.onnx"))
    assert code == 1 and "onnxscript" in err and "pip install" in err
    assert not (tmp_path / "m.onnx").exists()


def test_a_damaged_checkpoint_is_one_clear_error(tmp_path):
    import torch

    from tinymnist.errors import TinyMnistError
    from tinymnist.core.runs import CHECKPOINT_FORMAT, load_checkpoint

    for payload in ({"format": CHECKPOINT_FORMAT}, {"format": CHECKPOINT_FORMAT, "config": {"model": "Model_7"},
                                                    "state_dict": {}},
                    {"format": CHECKPOINT_FORMAT, "config": {"modle": 1}, "state_dict": {}}):
        torch.save(payload, tmp_path / "c.pt")
        with pytest.raises(TinyMnistError, match="c.pt"):
            load_checkpoint(tmp_path / "c.pt")
