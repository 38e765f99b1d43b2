"""The draw-a-digit demo: its HTTP API without a browser, then the page in a real Chromium driven by Playwright."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tinymnist.demo import find_checkpoint, make_server, shipped_checkpoint


@pytest.fixture(scope="module")
def model_path(request):
    """The model that ships in the package; a one-epoch model while none ships (a fresh checkout mid-way)."""
    shipped = shipped_checkpoint()
    if shipped.is_file():
        return shipped
    return request.getfixturevalue("trained_run") / "model.pt"


@pytest.fixture(scope="module")
def server(model_path):
    srv = make_server(model_path, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


def post(url: str, body: bytes, ctype: str = "image/png"):
    req = urllib.request.Request(url + "/api/predict", data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def drawn(digit_u8: np.ndarray, size: int = 280) -> bytes:
    """An MNIST digit as a person draws it: black ink on white, upscaled, with a margin."""
    big = np.asarray(Image.fromarray(255 - digit_u8).resize((size - 80, size - 80), Image.BILINEAR))
    canvas = np.full((size, size), 255, dtype=np.uint8)
    canvas[40:-40, 40:-40] = big
    return png(canvas)


@pytest.fixture(scope="module")
def test_digits(real_data_dir):
    from tinymnist.data import load_mnist

    m = load_mnist(real_data_dir, progress=False)
    return m.test_images[:20].numpy(), m.test_labels[:20].tolist()


def alive(url: str) -> bool:
    with urllib.request.urlopen(url + "/", timeout=10) as r:
        return r.status == 200


# ---------------------------------------------------------------- HTTP


def test_page_and_assets_are_served_locally(server):
    with urllib.request.urlopen(server + "/", timeout=10) as r:
        html = r.read().decode()
    assert "<canvas" in html and "/app.js" in html and "http" not in html.replace("http-equiv", "")
    for asset in ("/app.js", "/style.css"):
        with urllib.request.urlopen(server + asset, timeout=10) as r:
            body = r.read()
        assert body and b"http://" not in body and b"https://" not in body  # no CDN, no external fonts


def test_predict_returns_top3_and_the_28x28_input(server, test_digits):
    images, labels = test_digits
    status, answer = post(server, drawn(images[0]))
    assert status == 200 and answer["digit"] == labels[0]
    assert [t["digit"] for t in answer["top"]][0] == answer["digit"] and len(answer["top"]) == 3
    assert sum(t["probability"] for t in answer["top"]) <= 1.0 + 1e-6
    grid = np.array(answer["input28"])
    assert grid.shape == (28, 28) and grid.min() >= 0 and grid.max() <= 255


def test_same_preprocessing_as_predict(server, test_digits, model_path, tmp_path):
    from tinymnist.predict import load_image

    images, _ = test_digits
    (tmp_path / "d.png").write_bytes(drawn(images[3]))
    _, answer = post(server, drawn(images[3]))
    assert np.array_equal(np.array(answer["input28"]), load_image(tmp_path / "d.png").numpy())


def test_a_body_over_1mb_gets_413_and_the_server_goes_on(server):
    status, answer = post(server, b"\0" * (1 << 20 | 1))
    assert status == 413 and "error" in answer and alive(server)


def test_a_body_that_is_not_an_image_gets_400_json(server):
    for body in (b"hello, not a png", b"\x89PNG\r\n\x1a\n" + b"\0" * 50):
        status, answer = post(server, body)
        assert status == 400 and "not an image" in answer["error"]
    assert alive(server)


def test_a_blank_canvas_says_draw_a_digit(server):
    status, answer = post(server, png(np.full((280, 280), 255)))
    assert status == 200 and answer["digit"] is None and answer["message"] == "draw a digit"
    assert alive(server)


def test_concurrent_requests(server, test_digits):
    images, labels = test_digits
    bodies = [drawn(images[i % 10]) for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: post(server, b), bodies))
    assert all(s == 200 for s, _ in answers)
    assert [a["digit"] for _, a in answers] == [a["digit"] for _, a in answers[:10]] * 2 + \
        [a["digit"] for _, a in answers[:4]]


# ---------------------------------------------------------------- the command


def demo_process(*args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "tinymnist.cli", "demo", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def test_busy_port_and_bad_checkpoint_are_one_line(server, model_path, tmp_path):
    port = server.rsplit(":", 1)[1]
    p = demo_process(str(model_path), "--port", port)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and err.count("\n") == 1 and "already in use" in err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    p = demo_process(str(tmp_path / "bad.pt"), "--port", "0")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and err.count("\n") == 1 and "not a tinymnist checkpoint" in err


def test_ctrl_c_stops_the_server_cleanly(model_path):
    p = demo_process(str(model_path), "--port", "0")
    line = p.stdout.readline()
    url = line.split("open ", 1)[1].split("/ ", 1)[0]
    assert alive(url)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and err.strip() == "tinymnist demo: stopped"


def test_checkpoint_choice(tmp_path, model_path):
    assert find_checkpoint(str(model_path)) == model_path
    assert find_checkpoint(None, tmp_path / "no-runs") == shipped_checkpoint()
    newest = tmp_path / "runs" / "b" / "model.pt"
    for p in (tmp_path / "runs" / "a" / "model.pt", newest):
        p.parent.mkdir(parents=True)
        shutil.copy(model_path, p)
    os.utime(tmp_path / "runs" / "a" / "model.pt", (1, 1))
    assert find_checkpoint(None, tmp_path / "runs") == newest


# ---------------------------------------------------------------- a real browser


@pytest.fixture(scope="module")
def page(server):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if not chromium:
        msg = "Chromium (Debian package chromium) or Playwright for Python is missing"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        pg = browser.new_page(viewport={"width": 900, "height": 700})
        pg.goto(server + "/")
        yield pg
        browser.close()


def stroke(page, points, box):
    """A mouse stroke through canvas points (0..280 coordinates)."""
    page.mouse.move(box["x"] + points[0][0], box["y"] + points[0][1])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x, box["y"] + y, steps=6)
    page.mouse.up()


def shown_digit(page) -> str:
    """The digit on show once the page answers the final drawing (not a request sent mid-stroke)."""
    page.wait_for_function("() => { const d = document.body.dataset; "
                           "return d.digit !== undefined && d.digit !== '' && d.answered === d.drawn; }",
                           timeout=30000)
    return page.inner_text("#digit")


DRAWINGS = {
    "1": [[(140, 40), (140, 240)]],
    "7": [[(70, 50), (210, 50), (120, 240)]],
    "0": [[(140, 40), (95, 70), (80, 140), (95, 210), (140, 240), (185, 210), (200, 140), (185, 70), (140, 40)]],
}


@pytest.mark.parametrize("digit", list(DRAWINGS))
def test_drawn_strokes_are_recognised(page, digit):
    page.click("#clear")
    box = page.locator("#pad").bounding_box()
    for s in DRAWINGS[digit]:
        stroke(page, s, box)
    assert shown_digit(page) == digit
    assert page.locator("#top li").count() == 3


def test_twenty_real_test_digits_painted_on_the_canvas(page, test_digits, tmp_path):
    images, labels = test_digits
    right = 0
    for img, label in zip(images, labels):
        page.click("#clear")
        big = Image.fromarray(255 - img).resize((200, 200), Image.BILINEAR)
        canvas = Image.new("L", (280, 280), 255)
        canvas.paste(big, (40, 40))
        pixels = np.asarray(canvas).flatten().tolist()
        page.evaluate("""(px) => {
            const pad = document.getElementById('pad'), c = pad.getContext('2d');
            const img = c.createImageData(280, 280);
            px.forEach((v, i) => { img.data[4*i] = img.data[4*i+1] = img.data[4*i+2] = v; img.data[4*i+3] = 255; });
            c.putImageData(img, 0, 0);
            window.tinymnist.send();
        }""", pixels)
        right += shown_digit(page) == str(label)
    page.screenshot(path=str(tmp_path / "page.png"))
    assert right >= 19


def test_clear_removes_the_prediction(page):
    box = page.locator("#pad").bounding_box()
    stroke(page, DRAWINGS["1"][0], box)
    shown_digit(page)
    page.click("#clear")
    page.wait_for_timeout(700)
    assert page.inner_text("#digit") == "–" and page.locator("#top li").count() == 0


def test_the_shipped_model_scores_what_its_history_recorded(real_data_dir):
    from tinymnist.data import load_mnist
    from tinymnist.mistakes import collect_errors
    from tinymnist.runs import load_checkpoint

    shipped = shipped_checkpoint()
    history = json.loads((shipped.parent / "history.json").read_text())
    model, cfg = load_checkpoint(shipped)
    result = collect_errors(model, load_mnist(real_data_dir, progress=False), cfg.memory_format)
    assert result["test_acc"] == history[-1]["test_acc"]
