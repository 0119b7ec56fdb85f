"""Atomic file output: every file the project writes appears complete or not at all.

A writer fills a hidden temporary file beside the target, ``.NAME.HOST.PID.tmp``, and renames it over the target
when complete. A writer killed midway (SIGKILL, power loss) cannot remove its temporary file, so the next writer of
the same target, and every command preparing its output folder, removes the stale ones: those of a process on this
host that no longer exists, and those of another host (a previous Modal container, say) untouched for
``STALE_FOREIGN_S``.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cs336_basics.common import DiskFullError, UserError, disk_full_error, is_disk_full

STALE_FOREIGN_S = 3600.0  # a live writer on another host touches its file far more often than this


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name this process uses while writing ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike, *, whole_folder: bool = False) -> list[Path]:
    """Delete temporary files of ``path`` (or, with ``whole_folder``, of anything in the folder ``path``) left by
    writers that died; return what was removed."""
    path = Path(path)
    folder, prefix = (path, ".") if whole_folder else (path.parent, f".{path.name}.")
    removed = []
    try:
        candidates = [p for p in folder.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return removed
    host, now = _host(), time.time()
    for tmp in candidates:
        parts = tmp.name[: -len(".tmp")].rsplit(".", 2)
        if len(parts) != 3 or not parts[2].isdigit():
            continue
        owner, pid = parts[1], int(parts[2])
        try:
            if owner == host:
                stale = pid != os.getpid() and not _pid_alive(pid)
            else:
                stale = now - tmp.stat().st_mtime > STALE_FOREIGN_S
            if stale:
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
                removed.append(tmp)
        except OSError:
            continue
    return removed


def prepare_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` if needed, prove a file can be written there (before hours of work), and remove the
    temporary files that killed writers left in it.

    ``what`` names the setting in the error (e.g. "--output-dir" or "data.checkpoint_dir").
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temp_path(path / ".write-test")
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise UserError(f"{what} {path} is a file, not a folder: choose a folder path") from None
    except OSError as exc:
        if isinstance(exc, NotADirectoryError):
            raise UserError(f"{what} {path}: a part of the path is a file, not a folder: choose another path") from None
        if is_disk_full(exc):
            raise disk_full_error(path / ".write-test") from None
        reason = "read-only file system" if exc.errno == errno.EROFS else exc.strerror or str(exc)
        raise UserError(f"{what} {path} is not a writable folder ({reason}): choose a folder you can write to") from None
    remove_stale_temporaries(path, whole_folder=True)
    return path


def _ran_out_of_space(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it was raised from is a full disk (torch.save re-raises it as RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if is_disk_full(exc):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def atomic_output(path: str | os.PathLike, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary file is in the same folder (so the rename is atomic) and is removed on failure; stale
    temporaries of the same target from dead writers are removed first. The parent folder is created if needed.
    Running out of space raises :class:`~cs336_basics.common.DiskFullError` naming the folder (``size_hint``:
    the bytes the file needs, for that message).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as exc:
        if _ran_out_of_space(exc):
            tmp.unlink(missing_ok=True)  # first, so the message reports the space really free
            raise disk_full_error(path, size_hint) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


STAGE_NAME = "staged-outputs"


def _failed_path(exc: BaseException | None) -> Path | None:
    """The file named by the first OSError in ``exc``'s chain."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.filename:
            return Path(exc.filename)
        exc = exc.__cause__ or exc.__context__
    return None


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


@contextmanager
def staged_outputs() -> Iterator[Callable[[str | os.PathLike], Path]]:
    """Write several outputs, then put them all in place together: all new files, or all old ones.

    ``stage(folder)`` returns a hidden folder beside ``folder``'s contents to write into; when the block succeeds,
    every file written there replaces the file of the same name in ``folder`` (renames only, after everything is
    complete). When the block fails or is interrupted nothing in ``folder`` changes, and the hidden folders are
    removed (a killed writer's are removed by the next run, like any stale temporary).
    """
    stages: dict[Path, Path] = {}

    def stage(folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        if folder not in stages:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder / STAGE_NAME)
            stages[folder] = temp_path(folder / STAGE_NAME)
            stages[folder].mkdir()
        return stages[folder]

    try:
        yield stage
        for folder, staged in stages.items():
            for item in sorted(staged.iterdir()):
                os.replace(item, folder / item.name)
    except Exception as exc:
        if isinstance(exc, DiskFullError) or _ran_out_of_space(exc):
            written = exc.path if isinstance(exc, DiskFullError) else _failed_path(exc)
            folder = next((f for f, staged in stages.items() if written and written.parent == staged), None)
            if folder is None:  # name the folder the write went to; if unknown, the one with the least space
                folder = min(stages, key=_free_bytes, default=Path("."))
            name = written.name if written else "the new outputs"
            raise disk_full_error(folder / name, getattr(exc, "needed_bytes", None)) from None
        raise
    finally:
        for staged in stages.values():
            shutil.rmtree(staged, ignore_errors=True)
