"""Draw a digit: a local web page whose server classifies the drawing with the same code as `tinymnist predict`.

The server is the standard library's ThreadingHTTPServer: one thread per request, so requests run concurrently,
and nothing to install. A page for one person on loopback needs no framework; the handler only parses, calls
predict.preprocess_image and predict.classify, and serialises, and it limits what it reads."""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Optional

import torch

from ..errors import TinyMnistError, one_line

DEFAULT_PORT = 8000

MAX_BODY = 1 << 20  # bytes: a 280x280 canvas as PNG is a few kilobytes
IDLE_TIMEOUT = 20  # seconds a connection may stall (no request, or a body that stops arriving) before it is dropped
DRAIN_LIMIT = 16 << 20  # a larger body is not even read before the 413
SHIPPED = "model.pt"  # the trained final model inside the package, with its config.json and history.json
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}


def shipped_checkpoint() -> Path:
    """The trained answer of the series (experiments.answer()) that ships in the package."""
    return Path(str(resources.files("tinymnist") / "assets" / SHIPPED))


def find_checkpoint(explicit: Optional[str] = None, runs: str | os.PathLike = "runs") -> Path:
    """An explicit checkpoint, else the newest finished run of the series' answer under `runs` (what the README's
    first command trains), else the shipped answer."""
    from ..core.config import TrainConfig
    from ..lab.series import answer
    from ..fileio import read_json

    if explicit:
        return Path(explicit)
    found = sorted(Path(runs).glob("**/model.pt"), key=lambda p: p.stat().st_mtime) if Path(runs).is_dir() else []
    want = answer().config.recipe()
    for path in reversed(found):
        try:
            if TrainConfig.from_dict(read_json(path.parent / "config.json")["config"]).recipe() == want:
                return path
        except (OSError, ValueError, KeyError, TypeError, TinyMnistError):  # not a run directory we can read
            continue
    return shipped_checkpoint()


class Classifier:
    """A loaded model and the one function the page needs: PNG bytes -> prediction and the 28x28 input."""

    def __init__(self, checkpoint: Path, models: Optional[str] = None):
        from ..core.runs import load_checkpoint

        self.model, self.config = load_checkpoint(checkpoint, models=models)
        self.checkpoint = checkpoint

    def __call__(self, png: bytes) -> dict:
        from PIL import Image, UnidentifiedImageError

        from .predict import ImageError, classify, preprocess_image

        try:
            with Image.open(io.BytesIO(png)) as img:
                img.load()
                x = preprocess_image(img, "canvas")
        except ImageError as e:
            if "blank" in str(e):
                return {"digit": None, "top": [], "input28": None, "message": "draw a digit"}
            raise BadInput(str(e)) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadInput(f"not an image ({e.__class__.__name__})") from None
        with torch.inference_mode():
            pred = classify(self.model, x.unsqueeze(0), ["canvas"], top=3)[0]
        return {"digit": pred.digit, "top": [{"digit": d, "probability": round(p, 6)} for d, p in pred.top],
                "input28": x.tolist()}


class BadInput(Exception):
    """The request's body is not something we can classify: a 400 with a JSON error."""


class ClientGone(Exception):
    """The client closed the connection before its request was complete: nobody to answer."""


class _Reject(Exception):
    """A request refused before its body is read: the status and the message of the JSON error."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def _content_length(headers) -> int:
    """The body's length from a POST's headers; a missing one is a 411, one that is not a single non-negative
    integer a 400 (as _Reject)."""
    values = headers.get_all("Content-Length") or []
    if not values:
        raise _Reject(HTTPStatus.LENGTH_REQUIRED, "send the PNG with a Content-Length header")
    text = values[0].strip()
    if len(set(v.strip() for v in values)) > 1 or not text.isdigit() or not text.isascii():
        raise _Reject(HTTPStatus.BAD_REQUEST, f"Content-Length must be a number of bytes, got {', '.join(values)!r}")
    return int(text)


def make_handler(classify: Classifier):
    class Handler(BaseHTTPRequestHandler):
        server_version = "tinymnist-demo"
        protocol_version = "HTTP/1.1"
        timeout = IDLE_TIMEOUT  # a stalled client times out instead of holding a thread for ever

        def log_message(self, fmt, *args):  # one quiet server: no line per request
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path not in STATIC:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})
                return
            name, ctype = STATIC[path]
            body = (resources.files(__package__) / "web" / name).read_bytes()
            self._send(HTTPStatus.OK, body, ctype)

        def do_POST(self):
            if self.path.split("?", 1)[0] != "/api/predict":
                self.close_connection = True  # its body, unread, must not be taken for the next request
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {self.path}"})
                return
            try:
                length = _content_length(self.headers)
            except _Reject as e:
                self.close_connection = True
                self._json(e.status, {"error": str(e)})
                return
            if length > MAX_BODY:
                # Read (and drop) a moderately large body so that the client, still sending, gets the answer
                # instead of a reset; past DRAIN_LIMIT, just close.
                self.close_connection = True
                left = length if length <= DRAIN_LIMIT else 0
                while left > 0 and (chunk := self.rfile.read(min(1 << 16, left))):
                    left -= len(chunk)
                self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {MAX_BODY} bytes"})
                return
            body = self.rfile.read(length) if length > 0 else b""
            if len(body) < length:  # the client closed mid-body
                raise ClientGone(f"closed after {len(body)} of {length} bytes")
            if not body:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "empty body: send the drawing as PNG bytes"})
                return
            try:
                self._json(HTTPStatus.OK, classify(body))
            except BadInput as e:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except Exception as e:  # never let one request take the server down
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{e.__class__.__name__}: {e}"})

    return Handler


class DemoServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose failed requests are one line each on stderr, never a traceback: a client that
    disconnects or stalls mid-request is the client's business, and the server goes on."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        e = sys.exc_info()[1]
        if isinstance(e, ClientGone):
            why = f"client closed the connection mid-request ({e})"
        elif isinstance(e, (TimeoutError, socket.timeout)):
            why = f"client stalled for more than {IDLE_TIMEOUT} s"
        elif isinstance(e, ConnectionError):
            why = f"client closed the connection ({e.__class__.__name__})"
        else:
            why = f"request failed: {one_line(e)}"
        print(f"tinymnist demo: {client_address[0]}:{client_address[1]}: {why}", file=sys.stderr, flush=True)


def make_server(checkpoint: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                models: Optional[str] = None) -> ThreadingHTTPServer:
    """A ready server (bound, not yet serving); a busy port or a bad checkpoint is one TinyMnistError. A
    checkpoint of a user's model needs its models file, `models`."""
    classify = Classifier(checkpoint, models)
    try:
        server = DemoServer((host, port), make_handler(classify))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise TinyMnistError(f"port {port} on {host} is already in use: pick another with --port") from None
        raise TinyMnistError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.classifier = classify  # type: ignore[attr-defined]
    return server


def serve(checkpoint: Optional[str] = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          models: Optional[str] = None) -> None:
    """Serve the page until Ctrl-C."""
    path = find_checkpoint(checkpoint)
    server = make_server(path, host, port, models)
    shown = f"[{host}]" if ":" in host else host
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    try:
        thread.start()
        # announced inside the try: whoever reads this line and presses Ctrl-C gets a clean stop, even on a loaded
        # machine where the main thread was not yet back from starting the server thread
        print(f"tinymnist demo: {path} ({server.classifier.config.model}); open http://{shown}:{server.server_port}/ "
              "(Ctrl-C stops)", flush=True)
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        print("tinymnist demo: stopped", file=sys.stderr, flush=True)
    finally:
        # shutdown() waits for serve_forever, which a request still being answered can hold: wait a bounded time,
        # then close; the serving thread is a daemon and ends with the process
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        stopper.join(5)
        server.server_close()
