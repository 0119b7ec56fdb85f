"""cs336_basics.download, offline: a local HTTP server stands in for Hugging Face."""

from __future__ import annotations

import gzip
import http.server
import os
import socket
import threading
from functools import partial

import pytest

from cs336_basics import download as dl


@pytest.fixture()
def server(tmp_path):
    """Serve ``tmp_path/www`` on 127.0.0.1; yields (root folder, endpoint URL, request log)."""
    root = tmp_path / "www"
    root.mkdir()
    log: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            log.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", log
    httpd.shutdown()
    httpd.server_close()


def _publish(root, remote: dl.RemoteFile, data: bytes):
    path = root / "datasets" / remote.repo / "resolve" / "main" / remote.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_urls_follow_hugging_face_layout(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    train, valid = dl.DATASETS["tinystories"]
    assert train.url() == "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt"
    assert valid.url().endswith("/TinyStoriesV2-GPT4-valid.txt")
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    assert train.url().startswith("https://mirror.example/datasets/")
    assert dl.DATASETS["owt"][0].local_name == "owt_train.txt"


def test_download_skip_if_present_and_atomic(tmp_path, server, monkeypatch, capsys):
    root, endpoint, log = server
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    payload = os.urandom(3 << 20)
    for remote in dl.DATASETS["tinystories"]:
        _publish(root, remote, payload)
    out = tmp_path / "data"
    assert dl.main(["tinystories", "--output-dir", str(out)]) == 0
    assert (out / "TinyStoriesV2-GPT4-train.txt").read_bytes() == payload
    assert sorted(p.name for p in out.iterdir()) == ["TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"]
    err = capsys.readouterr().err
    assert "TinyStoriesV2-GPT4-train.txt" in err and "100%" in err  # the progress bar ran

    # Same size: skipped (nothing rewritten). Different size: downloaded again.
    target = out / "TinyStoriesV2-GPT4-train.txt"
    os.utime(target, (1, 1))
    (out / "TinyStoriesV2-GPT4-valid.txt").write_bytes(b"partial")
    assert dl.main(["tinystories", "--output-dir", str(out)]) == 0
    assert target.stat().st_mtime == 1
    assert (out / "TinyStoriesV2-GPT4-valid.txt").read_bytes() == payload


def test_owt_is_decompressed(tmp_path, server):
    root, endpoint, _ = server
    text = b"OpenWebText sample line\n" * 1000
    remote = dl.DATASETS["owt"][1]
    _publish(root, remote, gzip.compress(text))
    out = tmp_path / "out"
    path = dl.fetch(remote, out, endpoint=endpoint)
    assert path == out / "owt_valid.txt" and path.read_bytes() == text
    assert [p.name for p in out.iterdir()] == ["owt_valid.txt"]  # the .gz is removed after decompressing


def test_http_error_and_truncated_transfer(tmp_path, server):
    root, endpoint, _ = server
    with pytest.raises(dl.DownloadError, match="404"):
        dl.download(f"{endpoint}/missing.txt", tmp_path / "x.txt")

    class Truncating(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Truncating)
    threading.Thread(target=httpd.handle_request, daemon=True).start()
    with pytest.raises(dl.DownloadError, match="ended early|failed"):
        dl.download(f"http://127.0.0.1:{httpd.server_address[1]}/f", tmp_path / "y.txt", timeout=5)
    httpd.server_close()
    assert not (tmp_path / "y.txt").exists() and list(tmp_path.glob(".*")) == []  # no partial or temp file


def test_offline_gives_one_clear_line(tmp_path, monkeypatch, capsys):
    # A port nothing listens on behaves like no network.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert dl.main(["tinystories", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot download") and "offline" in err[0]
    assert list(tmp_path.iterdir()) == []
