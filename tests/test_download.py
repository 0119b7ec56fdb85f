"""cs336_basics.download, offline: a local HTTP server on 127.0.0.1 stands in for the Hugging Face Hub.

The stand-in answers like the Hub: ``HEAD /datasets/REPO/resolve/main/NAME`` gives the commit, the etag (sha256 of
the content) and the size, and redirects to a second "CDN" server (another origin, as on the Hub) that serves the
bytes with range requests. Faults are injected per test: dropped connections, a stalled transfer, corrupted
bytes, a required token.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cs336_basics import download as dl
from cs336_basics.common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR, DiskFullError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 1 << 16
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Hub:
    """Files by (repo, name), a request log, and fault switches; serves the Hub API and its CDN."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.token: str | None = None  # required as "Authorization: Bearer ..." when set
        self.drop_after: int | None = None  # CDN sends this many bytes per response, then closes the connection
        self.drops = 0  # how many responses to cut that way (then serve normally)
        self.stall_after: int | None = None  # CDN sends this many bytes, then waits until `release` is set
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.corrupt = False  # CDN flips the first byte
        self.api = self._serve(self._api_handler())
        self.cdn = self._serve(self._cdn_handler())
        self.endpoint = f"http://127.0.0.1:{self.api.server_address[1]}"

    def publish(self, remote: dl.RemoteFile, data: bytes) -> None:
        self.files[(remote.repo, remote.name)] = data

    def ranges(self) -> list[str | None]:
        return [r for method, path, r in self.log if method == "GET" and path.startswith("/cdn/")]

    def _serve(self, handler) -> http.server.ThreadingHTTPServer:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server

    def close(self) -> None:
        self.release.set()
        for server in (self.api, self.cdn):
            server.shutdown()
            server.server_close()

    def _api_handler(hub):
        class Api(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub.log.append(("HEAD", self.path, None))
                parts = self.path.split("/")  # /datasets/OWNER/NAME/resolve/main/FILE
                if len(parts) != 7 or parts[1] != "datasets" or parts[4] != "resolve":
                    return self._error(404, "RepoNotFound")
                if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._error(401, "GatedRepo")
                data = hub.files.get((f"{parts[2]}/{parts[3]}", parts[6]))
                if data is None:
                    return self._error(404, "EntryNotFound")
                sha = hashlib.sha256(data).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{hub.cdn.server_address[1]}/cdn/{sha}")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", '"W/not-the-content"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD

            def _error(self, code: int, error_code: str):
                self.send_response(code)
                self.send_header("X-Error-Code", error_code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        return Api

    def _cdn_handler(hub):
        class Cdn(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                hub.log.append(("GET", self.path, self.headers.get("Range")))
                sha = self.path.rsplit("/", 1)[-1]
                data = next((d for d in hub.files.values() if hashlib.sha256(d).hexdigest() == sha), None)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if hub.corrupt:
                    data = bytes([data[0] ^ 1]) + data[1:]
                start = 0
                if (r := self.headers.get("Range")) and r.startswith("bytes="):
                    start = int(r[len("bytes="):].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Connection", "close")
                self.end_headers()
                body = data[start:]
                if hub.drops > 0 and hub.drop_after is not None:
                    hub.drops -= 1
                    self.wfile.write(body[: hub.drop_after])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if hub.stall_after is not None:
                    self.wfile.write(body[: hub.stall_after])
                    self.wfile.flush()
                    hub.stalled.set()
                    hub.release.wait(30)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return Cdn


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    """The Hub stand-in, with HF_ENDPOINT pointing at it and an empty huggingface_hub cache and token store."""
    import huggingface_hub.constants as constants
    import huggingface_hub.file_download as file_download

    server = Hub()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(file_download.time, "sleep", lambda s: None)  # the library's pause between retries
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)  # bytes reach the file a chunk at a time
    yield server
    server.close()


def _payload(n: int, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32) + b"tail"


def test_urls_follow_hugging_face_layout(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    train, valid = dl.DATASETS["tinystories"]
    assert train.url() == "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt"
    assert valid.url().endswith("/TinyStoriesV2-GPT4-valid.txt")
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    assert train.url().startswith("https://mirror.example/datasets/")
    assert dl.DATASETS["owt"][0].local_name == "owt_train.txt"


def test_download_checked_skip_if_present_and_atomic(tmp_path, hub, capsys):
    payload = _payload(3 << 20)
    for remote in dl.DATASETS["tinystories"]:
        hub.publish(remote, payload)
    out = tmp_path / "data"
    assert dl.main(["tinystories", "--output-dir", str(out)]) == EXIT_OK
    assert (out / "TinyStoriesV2-GPT4-train.txt").read_bytes() == payload
    assert sorted(p.name for p in out.iterdir()) == ["TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"]
    captured = capsys.readouterr()
    assert "TinyStoriesV2-GPT4-train.txt" in captured.err and "100%" in captured.err  # the progress bar ran
    assert "✓" in captured.out and "TinyStoriesV2-GPT4-valid.txt (3.00 MB)" in captured.out
    assert hub.ranges() == [None, None]  # one plain GET per file

    # Same size: skipped (nothing rewritten). Different size: downloaded again.
    target = out / "TinyStoriesV2-GPT4-train.txt"
    os.utime(target, (1, 1))
    (out / "TinyStoriesV2-GPT4-valid.txt").write_bytes(b"partial")
    assert dl.main(["tinystories", "--output-dir", str(out)]) == EXIT_OK
    assert target.stat().st_mtime == 1
    assert (out / "TinyStoriesV2-GPT4-valid.txt").read_bytes() == payload
    assert len(hub.ranges()) == 3


def test_dropped_connections_resume_within_the_run(tmp_path, hub):
    remote = dl.DATASETS["tinystories"][1]
    payload = _payload(1 << 20)
    hub.publish(remote, payload)
    hub.drop_after, hub.drops = 4 * CHUNK, 2
    path = dl.fetch(remote, tmp_path)
    assert path.read_bytes() == payload
    # The library retried twice, each time asking only for the bytes it did not have yet.
    assert hub.ranges() == [None, f"bytes={4 * CHUNK}-", f"bytes={8 * CHUNK}-"]
    assert [p.name for p in tmp_path.iterdir()] == [remote.name]


def test_interrupted_download_resumes_in_the_next_run(tmp_path, hub, capsys):
    """Ctrl-C mid-transfer keeps the bytes received; the next run asks only for the rest."""
    remote = dl.DATASETS["tinystories"][0]
    payload = _payload(2 << 20)
    hub.publish(remote, payload)
    hub.stall_after = 11 * CHUNK

    def interrupt_when_stalled():
        if _wait_for_part(tmp_path, 11 * CHUNK):
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_stalled, daemon=True).start()
    assert dl.main(["tinystories", "--output-dir", str(tmp_path)]) == EXIT_INTERRUPTED
    assert "run the same command again to resume" in capsys.readouterr().err
    parts = list(tmp_path.glob(".*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == 11 * CHUNK
    assert not (tmp_path / remote.name).exists()

    hub.stall_after = None
    hub.release.set()
    assert dl.fetch(remote, tmp_path).read_bytes() == payload
    assert hub.ranges()[-1] == f"bytes={11 * CHUNK}-"
    assert [p.name for p in tmp_path.iterdir()] == [remote.name]


def test_killed_download_resumes(tmp_path, hub):
    """A download process killed with SIGKILL (no clean-up runs) is resumed by the next run."""
    remote = dl.DATASETS["tinystories"][0]
    payload = _payload(12 << 20, seed=1)
    hub.publish(remote, payload)
    hub.stall_after = 10 << 20  # huggingface_hub writes 10 MB at a time
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
           "HF_TOKEN_PATH": str(tmp_path / "no-token")}
    proc = subprocess.Popen([sys.executable, "-m", "cs336_basics.download", "tinystories", "--output-dir",
                             str(tmp_path / "data")], cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert _wait_for_part(tmp_path / "data", 10 << 20), "the download did not get going"
    finally:
        proc.kill()
        proc.wait()
    hub.stall_after = None
    hub.release.set()
    assert dl.fetch(remote, tmp_path / "data").read_bytes() == payload
    assert hub.ranges()[-1] == f"bytes={10 << 20}-"


def _wait_for_part(folder: Path, size: int, timeout: float = 60) -> bool:
    """Wait until a .part file in ``folder`` holds ``size`` bytes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.stat().st_size >= size for p in folder.glob(".*.part")):
            return True
        time.sleep(0.02)
    return False


def test_owt_is_decompressed(tmp_path, hub):
    text = b"OpenWebText sample line\n" * 1000
    remote = dl.DATASETS["owt"][1]
    hub.publish(remote, gzip.compress(text))
    out = tmp_path / "out"
    path = dl.fetch(remote, out)
    assert path == out / "owt_valid.txt" and path.read_bytes() == text
    assert [p.name for p in out.iterdir()] == ["owt_valid.txt"]  # the .gz is removed after decompressing
    assert dl.fetch(remote, out) == path and len(hub.ranges()) == 1  # present: no network at all


def test_corrupt_gz_is_one_line_and_leaves_no_output(tmp_path, hub):
    remote = dl.DATASETS["owt"][1]
    hub.publish(remote, gzip.compress(b"x" * 10_000)[:-20])  # truncated gzip: intact transfer, bad content
    with pytest.raises(dl.DownloadError, match="cannot decompress"):
        dl.fetch(remote, tmp_path)
    assert not (tmp_path / "owt_valid.txt").exists()


def test_full_disk_while_decompressing_is_disk_full(tmp_path, hub, monkeypatch):
    remote = dl.DATASETS["owt"][1]
    hub.publish(remote, gzip.compress(b"x" * 100_000))
    real_open = open

    class Full:
        def __init__(self, f) -> None:
            self.f = f

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    def full_disk_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if mode == "wb" else f

    monkeypatch.setattr(dl, "open", full_disk_open, raising=False)
    with pytest.raises(DiskFullError, match="no space left in .* to write owt_valid.txt"):
        dl.fetch(remote, tmp_path)
    assert not (tmp_path / "owt_valid.txt").exists() and not list(tmp_path.glob(".owt_valid.txt.*.tmp"))


def test_checksum_mismatch_is_refused_and_deleted(tmp_path, hub):
    remote = dl.DATASETS["tinystories"][1]
    hub.publish(remote, _payload(100_000))
    hub.corrupt = True
    with pytest.raises(dl.DownloadError, match="checksum"):
        dl.fetch(remote, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_token_is_sent_and_a_missing_one_is_named(tmp_path, hub, monkeypatch, capsys):
    remote = dl.DATASETS["tinystories"][1]
    hub.publish(remote, b"gated story\n")
    hub.token = "hf_test_token"
    assert dl.main(["tinystories", "--output-dir", str(tmp_path)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HF_TOKEN" in err[0] and "gated" in err[0], err
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert dl.fetch(remote, tmp_path).read_bytes() == b"gated story\n"


def test_missing_file_on_the_hub(tmp_path, hub):
    with pytest.raises(dl.DownloadError, match="not in .*/datasets/roneneldan/TinyStories"):
        dl.fetch(dl.DATASETS["tinystories"][0], tmp_path)


def test_offline_gives_one_clear_line(tmp_path, monkeypatch, capsys):
    # A port nothing listens on behaves like no network.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    assert dl.main(["tinystories", "--output-dir", str(tmp_path)]) == EXIT_USER_ERROR
    assert time.monotonic() - start < 10  # no long back-off before saying so
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot download") and "offline" in err[0], err
    assert f"127.0.0.1:{port}" in err[0] and "HF_ENDPOINT" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_uses_the_huggingface_hub_cache(tmp_path, hub, monkeypatch):
    """A file already in the huggingface_hub cache is linked from there: no transfer, same bytes."""
    from huggingface_hub import hf_hub_download

    remote = dl.DATASETS["tinystories"][1]
    payload = _payload(200_000, seed=2)
    hub.publish(remote, payload)
    cached = hf_hub_download(remote.repo, remote.name, repo_type="dataset", endpoint=hub.endpoint)
    transfers = len(hub.ranges())
    path = dl.fetch(remote, tmp_path / "data")
    assert path.read_bytes() == payload and len(hub.ranges()) == transfers
    assert os.path.samefile(path, cached)  # hard-linked: no second copy on disk

    # Offline, the cache still serves it; without it, one clear line.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path.unlink()
    assert dl.fetch(remote, tmp_path / "data").read_bytes() == payload
    with pytest.raises(dl.DownloadError, match="HF_HUB_OFFLINE"):
        dl.fetch(dl.DATASETS["tinystories"][0], tmp_path / "data")


def test_unwritable_output_dir(tmp_path, hub, capsys):
    (tmp_path / "afile").write_text("x")
    assert dl.main(["tinystories", "--output-dir", str(tmp_path / "afile")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "afile" in err[0], err
