"""Make docs/demo.png: the demo page in a real Chromium, with a 7 drawn by mouse strokes and the model's answer.

    python scripts/demo_screenshot.py [--out docs/demo.png] [--checkpoint MODEL.pt]

It serves the demo in this process (by default with the trained answer that ships in the package), drives Debian's
Chromium with Playwright for Python (pip install playwright; Playwright's own browser download is not needed), and
writes the screenshot atomically. The demo's browser tests use the same helpers, so the picture shows what the tests
check. It exits with 1 and one line when Chromium or Playwright is missing."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional

# canvas strokes (0..280 coordinates) that a person would draw for these digits
DRAWINGS = {
    "1": [[(140, 40), (140, 240)]],
    "7": [[(70, 50), (210, 50), (120, 240)]],
    "0": [[(140, 40), (95, 70), (80, 140), (95, 210), (140, 240), (185, 210), (200, 140), (185, 70), (140, 40)]],
}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 900, "height": 700}


def chromium_path() -> Optional[str]:
    """The installed Chromium, if there is one and Playwright for Python can drive it."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def open_page(url: str) -> Iterator:
    """A Chromium page on `url` (headless), closed afterwards."""
    from playwright.sync_api import sync_playwright

    chromium = chromium_path()
    if chromium is None:
        raise RuntimeError("Chromium (Debian package chromium) or Playwright for Python is missing")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            yield page
        finally:
            browser.close()


def stroke(page, points, box) -> None:
    """A mouse stroke through canvas points (0..280 coordinates)."""
    page.mouse.move(box["x"] + points[0][0], box["y"] + points[0][1])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x, box["y"] + y, steps=6)
    page.mouse.up()


def draw(page, digit: str) -> None:
    page.click("#clear")
    box = page.locator("#pad").bounding_box()
    for s in DRAWINGS[digit]:
        stroke(page, s, box)


def shown_digit(page) -> str:
    """The digit on show once the page answers the final drawing (not a request sent mid-stroke)."""
    page.wait_for_function("() => { const d = document.body.dataset; "
                           "return d.digit !== undefined && d.digit !== '' && d.answered === d.drawn; }",
                           timeout=30000)
    return page.inner_text("#digit")


@contextlib.contextmanager
def serving(checkpoint: Path) -> Iterator[str]:
    """The demo server on a free loopback port, in a thread; yields its URL."""
    from tinymnist.apps.demo import make_server

    server = make_server(checkpoint, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def screenshot(out: Path, checkpoint: Optional[Path] = None, digit: str = "7") -> str:
    """Draw `digit` on the demo page and write the screenshot to `out`; return the digit the page shows."""
    from tinymnist.apps.demo import shipped_checkpoint
    from tinymnist.fileio import atomic_path

    with serving(checkpoint or shipped_checkpoint()) as url, open_page(url + "/") as page:
        draw(page, digit)
        shown = shown_digit(page)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            Path(tmp).write_bytes(page.screenshot(type="png"))
    return shown


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/demo.png", type=Path, help="where to write the PNG")
    p.add_argument("--checkpoint", default=None, type=Path, help="model.pt to serve (default: the shipped answer)")
    args = p.parse_args(argv)
    try:
        shown = screenshot(args.out, args.checkpoint)
    except RuntimeError as e:
        print(f"demo_screenshot: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: a drawn 7, answered {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
