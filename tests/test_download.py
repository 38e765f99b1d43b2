"""Downloading from a loopback HTTP server that the test starts itself."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from tinymnist.core.data import ensure_files, load_mnist
from tinymnist.errors import DataError

from conftest import synthetic_mnist


@pytest.fixture
def server(tmp_path):
    """Serve /good/<name> (correct bytes), /corrupt/<name> (wrong bytes), /short/<name> (cut off); 404 otherwise."""
    files = synthetic_mnist(tmp_path / "src")
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            kind, _, name = self.path.strip("/").partition("/")
            if name not in files or kind not in ("good", "corrupt", "short"):
                self.send_error(404)
                return
            body = files[name]
            if kind == "corrupt":
                body = body[:-1] + bytes([body[-1] ^ 0xFF])
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if kind == "short" else body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    resources = [(name, hashlib.md5(data).hexdigest()) for name, data in files.items()]
    yield base, resources, hits
    httpd.shutdown()
    httpd.server_close()


def test_falls_back_to_the_next_mirror(server, tmp_path):
    base, resources, hits = server
    root = tmp_path / "data"
    paths = ensure_files(root, resources, [f"{base}/missing/", f"{base}/good/"], progress=False)
    assert sorted(p.name for p in paths.values()) == sorted(n for n, _ in resources)
    assert any(h.startswith("/missing/") for h in hits) and any(h.startswith("/good/") for h in hits)
    assert sorted(p.name for p in root.iterdir()) == sorted(n for n, _ in resources)  # no temporary left over


@pytest.mark.parametrize("kind", ["corrupt", "short"])
def test_bad_download_is_rejected_and_leaves_nothing(server, tmp_path, kind):
    base, resources, _ = server
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(DataError) as e:
        ensure_files(root, resources, [f"{base}/{kind}/"], progress=False)
    msg = str(e.value)
    assert "missing" in msg and str(root) in msg and f"{base}/{kind}/" in msg
    assert all(n in msg for n, _ in resources)
    assert list(root.iterdir()) == []  # no partial or temporary file


def test_md5_mismatch_then_good_mirror(server, tmp_path):
    base, resources, _ = server
    root = tmp_path / "data"
    ensure_files(root, resources, [f"{base}/corrupt/", f"{base}/good/"], progress=False)
    for name, md5 in resources:
        assert hashlib.md5((root / name).read_bytes()).hexdigest() == md5


def test_unreachable_mirror_gives_clear_error_and_removes_new_dir(tmp_path):
    root = tmp_path / "new" / "data"
    with pytest.raises(DataError, match="every mirror failed") as e:
        ensure_files(root, mirrors=["http://127.0.0.1:9/"], progress=False)  # port 9: nothing listens
    assert "copy the four original files" in str(e.value)
    assert not root.exists()


def test_present_files_are_not_downloaded(server, tmp_path):
    base, resources, hits = server
    root = tmp_path / "data"
    ensure_files(root, resources, [f"{base}/good/"], progress=False)
    n = len(hits)
    ensure_files(root, resources, [f"{base}/good/"], progress=False)
    assert len(hits) == n


def test_mirrors_from_environment(server, tmp_path, monkeypatch):
    base, resources, _ = server
    # the real MD5s cannot match synthetic bytes, so load_mnist must fail on every file, naming the env mirror
    monkeypatch.setenv("TINYMNIST_MIRRORS", f"{base}/good")
    with pytest.raises(DataError, match=f"{base}/good/"):
        load_mnist(tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()
