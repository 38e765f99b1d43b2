"""The draw-a-digit demo: its HTTP API without a browser, then the page in a real Chromium driven by Playwright."""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinymnist.apps.demo import find_checkpoint, make_server, shipped_checkpoint


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
    from tinymnist.core.data import load_mnist

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
    from tinymnist.apps.predict import load_image

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


def _sigint_default():
    # a shell without job control starts background jobs with SIGINT ignored (`nohup pytest &`), and a Python that
    # starts with SIGINT ignored installs no KeyboardInterrupt: give the demo the disposition a terminal gives it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def demo_process(*args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "tinymnist.cli", "demo", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, preexec_fn=_sigint_default)


def raw_request(url: str, data: bytes, read: bool = True) -> bytes:
    """Send raw bytes to the server; return what it answers (until it closes), or b"" without reading."""
    host, port = url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(data)
        if not read:
            return b""
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def wait_for_lines(capfd, count: int, timeout: float = 10.0) -> str:
    """stderr so far, once it holds `count` lines (or the time is up)."""
    import time

    text, deadline = "", time.time() + timeout
    while time.time() < deadline:
        text += capfd.readouterr().err
        if text.count("\n") >= count:
            break
        time.sleep(0.05)
    return text


def test_clients_that_leave_mid_request_leave_one_line_each_and_no_traceback(server, capfd, test_digits):
    capfd.readouterr()
    head = b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
    raw_request(server, head + b"\x89PNG" + bytes(96), read=False)  # half a request, then gone
    err = wait_for_lines(capfd, 1)
    assert "Traceback" not in err and err.count("\n") <= 1
    assert "closed the connection mid-request" in err or not err
    # many at once, as a load probe does: at most one line each, and the server goes on answering
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: raw_request(server, head + bytes(10), read=False), range(60)))
    err = wait_for_lines(capfd, 60)
    assert "Traceback" not in err and err.count("\n") <= 60
    images, labels = test_digits
    status, body = post(server, drawn(images[0]))
    assert status == 200 and body["digit"] == labels[0]


@pytest.mark.parametrize("headers, status", [
    ("", 411),  # no Content-Length
    ("Content-Length: abc\r\n", 400),
    ("Content-Length: -5\r\n", 400),
    ("Content-Length: 1e3\r\n", 400),
    ("Content-Length: 10\r\nContent-Length: 12\r\n", 400),
    ("Transfer-Encoding: chunked\r\n", 411),
])
def test_a_post_without_a_usable_content_length_gets_411_or_400(server, capfd, headers, status):
    capfd.readouterr()
    for path in ("/api/predict", "/api/predict?x=1"):
        answer = raw_request(server, f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\nabcdefghij".encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == str(status).encode(), answer
        assert "error" in json.loads(body)
    # on any other path, a POST is a 404 whose unread body is never taken for a next request
    answer = raw_request(server, f"POST /elsewhere HTTP/1.1\r\nHost: x\r\n{headers}\r\nGET / HTTP/1.1\r\n\r\n".encode())
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 404")
    assert "Traceback" not in capfd.readouterr().err


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
    """Given none, the demo shows the answer: the newest run of the answer's recipe, else the shipped one."""
    from dataclasses import replace

    from tinymnist.lab.series import answer, get_step

    assert find_checkpoint(str(model_path)) == model_path
    assert find_checkpoint(None, tmp_path / "no-runs") == shipped_checkpoint()
    runs = tmp_path / "runs"
    recipes = {"old-answer": replace(answer().config, seed=3, kernels="native"),
               "answer": answer().config, "other": replace(get_step("half").config), "broken": None}
    for i, (name, cfg) in enumerate(recipes.items()):
        (runs / name).mkdir(parents=True)
        shutil.copy(model_path, runs / name / "model.pt")
        config = "{not json" if cfg is None else json.dumps({"config": cfg.to_dict()})
        (runs / name / "config.json").write_text(config)
        os.utime(runs / name / "model.pt", (i + 1, i + 1))  # older to newer, in this order
    assert find_checkpoint(None, runs) == runs / "answer" / "model.pt"
    os.utime(runs / "old-answer" / "model.pt", (10, 10))  # another seed, another machine: the same recipe
    assert find_checkpoint(None, runs) == runs / "old-answer" / "model.pt"
    for name in ("answer", "old-answer"):
        shutil.rmtree(runs / name)
    assert find_checkpoint(None, runs) == shipped_checkpoint()


# ---------------------------------------------------------------- a real browser


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import demo_screenshot as shot  # noqa: E402  the browser helpers that also make docs/demo.png

DRAWINGS, stroke, shown_digit = shot.DRAWINGS, shot.stroke, shot.shown_digit


def need_chromium() -> None:
    if shot.chromium_path() is None:
        msg = "Chromium (Debian package chromium) or Playwright for Python is missing"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def page(server):
    need_chromium()
    with shot.open_page(server + "/") as pg:
        yield pg


@pytest.mark.parametrize("digit", list(DRAWINGS))
def test_drawn_strokes_are_recognised(page, digit):
    shot.draw(page, digit)
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
    from playwright.sync_api import expect

    box = page.locator("#pad").bounding_box()
    stroke(page, DRAWINGS["1"][0], box)
    shown_digit(page)
    page.click("#clear")
    # the page has answered its blank canvas (an answer still in flight is dropped), and shows nothing
    page.wait_for_function("document.body.dataset.answered === document.body.dataset.drawn")
    expect(page.locator("#digit")).to_have_text("–")
    expect(page.locator("#top li")).to_have_count(0)


def test_the_shipped_model_scores_what_its_history_recorded(real_data_dir):
    from tinymnist.core.data import load_mnist
    from tinymnist.apps.misclassified import collect_errors
    from tinymnist.core.runs import load_checkpoint

    shipped = shipped_checkpoint()
    history = json.loads((shipped.parent / "history.json").read_text())
    model, cfg = load_checkpoint(shipped)
    result = collect_errors(model, load_mnist(real_data_dir, progress=False), cfg.memory_format)
    assert result["test_acc"] == history[-1]["test_acc"]


def test_the_screenshot_script_draws_a_7_and_shows_the_answer(tmp_path, model_path):
    """scripts/demo_screenshot.py, which makes docs/demo.png, run as a script on the same model: the page it
    pictures holds a drawn 7 and the answer 7."""
    need_chromium()
    out = tmp_path / "demo.png"
    script = Path(__file__).resolve().parents[1] / "scripts" / "demo_screenshot.py"
    p = subprocess.run([sys.executable, str(script), "--out", str(out), "--checkpoint", str(model_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"wrote {out}: a drawn 7, answered 7"
    with Image.open(out) as img:
        assert img.size == (shot.VIEWPORT["width"], shot.VIEWPORT["height"])
    assert (Path(__file__).resolve().parents[1] / "docs" / "demo.png").is_file()
