"""prepare_data.py under faults: interrupted after a new tokenizer was trained, a full disk, kill -9 leftovers."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import prepare_data
from cs336_basics import tokenize_data
from cs336_basics.common import EXIT_INTERRUPTED, EXIT_USER_ERROR
from cs336_basics.stories import write_corpus

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("corpus")
    return write_corpus(d / "train.txt", 150, seed=0), write_corpus(d / "val.txt", 20, seed=1)


def _args(tmp_path: Path, corpus, vocab: int) -> list[str]:
    train, val = corpus
    return [str(a) for a in ("--train-path", train, "--val-path", val, "--vocab-size", vocab, "--output-dir",
                             tmp_path / "data", "--tokenizer-dir", tmp_path / "tok", "--num-workers", 1)]


def _snapshot(tmp_path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tmp_path)): p.read_bytes()
            for d in ("data", "tok") for p in sorted((tmp_path / d).iterdir())}


def test_interrupt_while_tokenizing_val_after_a_new_tokenizer_changes_nothing(tmp_path, corpus, capsys, monkeypatch):
    assert prepare_data.main(_args(tmp_path, corpus, 300)) == 0
    before = _snapshot(tmp_path)
    real = tokenize_data.tokenize_file

    def interrupted_on_val(src, dst, *args, **kwargs):
        if Path(dst).name == "val.bin":
            raise KeyboardInterrupt
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(prepare_data, "tokenize_file", interrupted_on_val)
    capsys.readouterr()
    assert prepare_data.main(_args(tmp_path, corpus, 280)) == EXIT_INTERRUPTED  # a new tokenizer, then Ctrl-C
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: interrupted; nothing was replaced")
    assert _snapshot(tmp_path) == before  # the old tokenizer, train.bin and val.bin, all still together


def test_a_full_disk_names_the_folder(tmp_path, corpus, capsys, monkeypatch):
    def full(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(prepare_data, "tokenize_file", full)
    assert prepare_data.main(_args(tmp_path, corpus, 300)) == EXIT_USER_ERROR
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert len(err) == 1 and err[0].startswith("error: no space left in ")  # progress bars aside, one line
    assert err[0].startswith(f"error: no space left in {tmp_path / 'data'}/ to write train.bin (") and "free" in err[0]
    assert not (tmp_path / "data" / "train.bin").exists() and not (tmp_path / "tok" / "vocab.pkl").exists()
    assert not [p for d in ("data", "tok") for p in (tmp_path / d).iterdir()]  # no staging left behind


def test_kill_9_leftovers_are_removed_by_the_next_run(tmp_path, corpus):
    """A real prepare_data process killed with SIGKILL mid-run leaves hidden files; the next run removes them."""
    big = tmp_path / "big.txt"
    big.write_text(corpus[0].read_text(encoding="utf-8") * 40, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(PROJECT_ROOT / "prepare_data.py"), "--train-path", str(big), "--vocab-size", "300",
           "--output-dir", str(tmp_path / "data"), "--tokenizer-dir", str(tmp_path / "tok"), "--num-workers", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait until it is tokenizing: the staged tokenizer exists, the .bin is being written
        if line.startswith("Tokenizing ") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    hidden = [p for d in ("data", "tok") for p in (tmp_path / d).iterdir() if p.name.startswith(".")]
    assert hidden, "the killed run should have left its staging folders"
    assert not (tmp_path / "data" / "train.bin").exists()  # nothing half-written at the final names
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [p for p in hidden if p.exists()]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["train.bin", "train.bin.json"]
    assert socket.gethostname()  # the leftovers were recognised by host and process id
