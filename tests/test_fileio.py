import pytest

from cs336_basics.fileio import atomic_output


def test_atomic_output_renames_on_success_and_creates_the_folder(tmp_path):
    target = tmp_path / "new" / "out.bin"
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"done")
        assert not target.exists()  # nothing at the final name until the block succeeds
    assert target.read_bytes() == b"done"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


def test_atomic_output_keeps_the_old_file_and_removes_the_temp_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half-writ")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


# ----------------------------------------------------------------------------- stale temporaries and staging

import errno  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from cs336_basics.common import DiskFullError, UserError  # noqa: E402
from cs336_basics.fileio import (  # noqa: E402
    prepare_output_dir,
    remove_stale_temporaries,
    staged_outputs,
    temp_path,
)

HOST = socket.gethostname().replace(".", "_")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "train.bin"
    dead = tmp_path / f".train.bin.{HOST}.{_dead_pid()}.tmp"
    alive = tmp_path / f".train.bin.{HOST}.{os.getppid()}.tmp"  # our parent: a live writer
    foreign_old = tmp_path / ".train.bin.otherbox.12.tmp"
    foreign_new = tmp_path / ".train.bin.otherbox.13.tmp"
    other_target = tmp_path / f".val.bin.{HOST}.{_dead_pid()}.tmp"
    for p in (dead, alive, foreign_old, foreign_new, other_target):
        p.write_bytes(b"partial")
    os.utime(foreign_old, (time.time() - 7200, time.time() - 7200))
    with atomic_output(target) as tmp:  # the next writer of train.bin cleans up after the dead ones
        assert tmp == temp_path(target)
        tmp.write_bytes(b"new")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"train.bin", alive.name, foreign_new.name, other_target.name}
    assert remove_stale_temporaries(tmp_path, whole_folder=True) == [other_target]


def test_atomic_output_turns_a_full_disk_into_one_line(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(DiskFullError) as info, atomic_output(target, size_hint=5 << 20) as tmp:
        tmp.write_bytes(b"x")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("unexpected pos 128 vs 0")  # noqa: B904  (how torch.save reports it)
    message = str(info.value)
    assert message.startswith(f"no space left in {tmp_path}/ to write out.bin (about 5.0 MB needed, ")
    assert "free" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_staged_outputs_are_all_new_or_all_old(tmp_path):
    a, b = tmp_path / "tok", tmp_path / "data"
    a.mkdir()
    (a / "vocab.pkl").write_bytes(b"old vocab")
    with staged_outputs() as stage:
        (stage(a) / "vocab.pkl").write_bytes(b"new vocab")
        (stage(b) / "train.bin").write_bytes(b"new train")
        (stage(b) / "train.bin.json").write_bytes(b"{}")
        assert not (b / "train.bin").exists() and (a / "vocab.pkl").read_bytes() == b"old vocab"
    assert (a / "vocab.pkl").read_bytes() == b"new vocab"
    assert sorted(p.name for p in b.iterdir()) == ["train.bin", "train.bin.json"]

    with pytest.raises(KeyboardInterrupt), staged_outputs() as stage:
        (stage(a) / "vocab.pkl").write_bytes(b"newer vocab")
        raise KeyboardInterrupt
    assert (a / "vocab.pkl").read_bytes() == b"new vocab"  # nothing replaced
    assert sorted(p.name for p in a.iterdir()) == ["vocab.pkl"]  # and the hidden folder is gone


def test_prepare_output_dir_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        prepare_output_dir(tmp_path / "file", "--output-dir")
    with pytest.raises(UserError, match="a part of the path is a file"):
        prepare_output_dir(tmp_path / "file" / "sub", "--output-dir")
    stale = tmp_path / "out" / f".x.pt.{HOST}.{_dead_pid()}.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"")
    assert prepare_output_dir(tmp_path / "out", "data.checkpoint_dir") == tmp_path / "out"
    assert not stale.exists()
