"""An in-process stand-in for ``modal.Volume`` with Modal's semantics, keeping its files in local folders.

``FakeVolume(root)``: ``root`` holds the volume's *committed* state, what Modal's servers hold. The local client's
operations (listdir, iterdir, read_file, remove_file, batch_upload) act on it directly, as the real client's do; a
batch upload is all-or-nothing and refuses to overwrite an existing file unless ``force``.

``FakeVolume.mount(folder)`` starts a container: ``folder`` gets a copy of the committed state at that moment, and
the returned :class:`MountedVolume` is what the container's ``volume`` is. Writes in ``folder`` stay invisible to the
volume (and to other containers) until ``commit()``, which publishes this container's changes since its view was last
synced (files written or removed) file by file: containers committing different files concurrently keep each
other's files, and for the same file the last commit wins, losing what its writer had not seen (Modal's documented
semantics). Like the real client, ``commit()`` then reloads the container's view; ``reload()`` brings in what others
committed. Both refuse (RuntimeError) while a process of this container (this one or a child) holds a file of the
volume open or memory-mapped (checked through /proc, so on Linux). ``reload()`` also refuses while the container has
uncommitted changes: Modal "may implicitly" commit them, so code must not depend on either outcome. ``fail_commits``
makes the next commits raise the way the real client's do (RuntimeError), and ``after_commit`` runs after each
successful commit (e.g. to preempt the container).

Method signatures match the installed modal (a test compares them), listings are ``modal.types.FileEntry``, and a
missing path raises what modal raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import modal.exception
from modal.types import FileEntry, FileEntryType

CHUNK = 1 << 16


class FakeUploadBatch:
    """What ``FakeVolume.batch_upload`` yields: queues files, written when the ``with`` block ends cleanly."""

    def __init__(self, volume: FakeVolume):
        self._volume = volume
        self._pending: list[tuple[bytes, str]] = []

    def put_file(
        self,
        local_file: Path | str | BinaryIO | BytesIO,
        remote_path: PurePosixPath | str,
        mode: int | None = None,
    ):
        remote_path = PurePosixPath(remote_path).as_posix()
        if str(remote_path).endswith("/"):
            raise ValueError(f"remote_path ({remote_path}) must refer to a file - cannot end with /")
        if isinstance(local_file, (str, Path)):
            data = Path(local_file).read_bytes()
        else:
            local_file.seek(0)
            data = local_file.read()
        self._pending.append((data, remote_path))


def _mirror(src: Path, dst: Path) -> None:
    """Make ``dst`` hold exactly the files of ``src`` (copied; files that vanish while copying are skipped)."""
    staging = dst.with_name(dst.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for folder, dirs, files in os.walk(src):
        rel = Path(folder).relative_to(src)
        for d in dirs:
            (staging / rel / d).mkdir(exist_ok=True)
        for f in files:
            try:
                shutil.copy2(Path(folder) / f, staging / rel / f)
            except FileNotFoundError:  # renamed or removed by a writer meanwhile: not part of this snapshot
                pass
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(staging, dst)
    shutil.rmtree(old, ignore_errors=True)


def _digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder``: its path relative to ``folder`` -> a hash of its bytes (files that vanish while
    hashing, renamed by a writer meanwhile, are left out)."""
    found = {}
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                found[path.relative_to(folder).as_posix()] = hashlib.sha1(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            pass
    return found


def _put(src: Path, dst: Path) -> None:
    """Copy ``src`` over ``dst`` atomically (a reader sees the old file or the new one); a vanished ``src`` is skipped."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    staged = dst.with_name(f".{dst.name}.syncing")
    try:
        shutil.copy2(src, staged)
    except FileNotFoundError:
        return
    os.replace(staged, dst)


def _descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (Linux /proc; just ``pid`` elsewhere)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = {pid}, [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier and c not in found]
        found.update(children)
        frontier = children
    return found


def open_files_under(folder: Path) -> list[str]:
    """Files under ``folder`` that this process or its children hold open or memory-mapped (Linux; [] elsewhere)."""
    prefix = str(Path(folder).resolve()) + os.sep
    found = []
    for pid in _descendants(os.getpid()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(prefix):
                    found.append(target)
            with open(f"/proc/{pid}/maps") as f:
                mapped = (line.split(None, 5) for line in f)
                found += [parts[5].strip() for parts in mapped if len(parts) == 6 and parts[5].startswith(prefix)]
        except OSError:
            continue
    return sorted(set(found))


class FakeVolume:
    """A volume whose committed state is the folder ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.commits = 0  # successful commits by all containers
        self.uploads: list[str] = []  # volume paths written by batch uploads, in order

    def _local(self, path: str) -> Path:
        parts = PurePosixPath("/" + str(path).lstrip("/")).parts[1:]
        if ".." in parts:
            raise ValueError(f"path {path!r} escapes the volume")
        return self.root.joinpath(*parts)

    def _entry(self, local: Path) -> FileEntry:
        st = local.stat()
        kind = FileEntryType.DIRECTORY if local.is_dir() else FileEntryType.FILE
        return FileEntry(
            path=local.relative_to(self.root).as_posix(),
            type=kind,
            mtime=int(st.st_mtime),
            size=0 if local.is_dir() else st.st_size,
        )

    def iterdir(self, path: str, *, recursive: bool = True) -> Iterator[FileEntry]:
        local = self._local(path)
        if not local.exists():
            raise modal.exception.NotFoundError(f"No such file or directory: {path}")
        if local.is_file():
            yield self._entry(local)
            return
        children = local.rglob("*") if recursive else local.iterdir()
        for child in sorted(children):
            yield self._entry(child)

    def listdir(self, path: str, *, recursive: bool = False) -> list[FileEntry]:
        return list(self.iterdir(path, recursive=recursive))

    def read_file(self, path: str) -> Iterator[bytes]:
        local = self._local(path)
        if not local.is_file():
            raise FileNotFoundError(f"No such file: {path}")
        with open(local, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def remove_file(self, path: str, recursive: bool = False) -> None:
        local = self._local(path)
        if not local.exists():
            raise FileNotFoundError(f"No such file or directory: {path}")
        if local.is_dir():
            if not recursive and any(local.iterdir()):
                raise modal.exception.InvalidError(f"{path} is a non-empty directory; pass recursive=True")
            shutil.rmtree(local)
        else:
            local.unlink()

    @contextlib.contextmanager
    def batch_upload(self, force: bool = False) -> Iterator[FakeUploadBatch]:
        batch = FakeUploadBatch(self)
        yield batch
        for _, remote in batch._pending:
            target = self._local(remote)
            if target.is_dir() or (target.exists() and not force):
                raise FileExistsError(f"{remote}: already exists")
        for data, remote in batch._pending:
            target = self._local(remote)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            self.uploads.append(remote)

    def commit(self):
        raise RuntimeError("Volume.commit() must be called inside a container that mounts the volume (FakeVolume.mount)")

    def reload(self):
        raise RuntimeError("Volume.reload() must be called inside a container that mounts the volume (FakeVolume.mount)")

    def mount(self, folder: str | Path, *, fail_commits: int = 0,
              after_commit: Callable[[int], None] | None = None) -> MountedVolume:
        """Start a container: ``folder`` (its mount point) gets a copy of the committed state."""
        return MountedVolume(self, Path(folder), fail_commits=fail_commits, after_commit=after_commit)


class MountedVolume:
    """The volume as one container sees it: a private copy at ``path``, published by ``commit()``."""

    def __init__(self, volume: FakeVolume, path: Path, *, fail_commits: int = 0,
                 after_commit: Callable[[int], None] | None = None):
        self.volume, self.path = volume, path
        self.fail_commits = fail_commits  # the next this-many commits raise
        self.after_commit = after_commit
        self.commits = 0  # successful commits by this container
        _mirror(volume.root, path)
        self._base = _digests(path)  # the committed state this container's view was last synced to

    def _sync(self) -> None:
        """Bring the committed state into this container's view (after a commit, and on reload), file by file in
        place: a file this container is writing meanwhile (a torchrun worker's temporary checkpoint) is left alone."""
        committed = _digests(self.volume.root)
        mine = _digests(self.path)
        for rel, digest in committed.items():
            if mine.get(rel) != digest:
                _put(self.volume.root / rel, self.path / rel)
        for rel in set(self._base) - set(committed):  # removed by a commit (this container's files are not touched)
            (self.path / rel).unlink(missing_ok=True)
        self._base = committed

    def _changes(self) -> tuple[list[str], list[str]]:
        """(files written, files removed) in this container since its view was last synced, relative paths."""
        now = _digests(self.path)
        return sorted(f for f, d in now.items() if self._base.get(f) != d), sorted(set(self._base) - set(now))

    def _refuse_open_files(self) -> None:
        held = open_files_under(self.path)
        if held:
            raise RuntimeError(f"there are open files preventing the operation: {held[0]} (stand-in)")

    def commit(self):
        if self.fail_commits > 0:
            self.fail_commits -= 1
            raise RuntimeError("Volume commit failed: conflict (stand-in)")
        self._refuse_open_files()
        written, removed = self._changes()
        for rel in removed:
            (self.volume.root / rel).unlink(missing_ok=True)
        for rel in written:
            _put(self.path / rel, self.volume.root / rel)
        self._sync()
        self.commits += 1
        self.volume.commits += 1
        if self.after_commit is not None:
            self.after_commit(self.commits)

    def reload(self):
        self._refuse_open_files()
        written, removed = self._changes()
        if written or removed:
            raise RuntimeError(f"reload() with uncommitted changes ({', '.join(written + removed)}): Modal may or may "
                               "not commit them implicitly; commit first (stand-in)")
        self._sync()


def parse_entrypoint_args(entrypoint, argv: list[str]) -> dict:
    """Parse ``argv`` for a ``@app.local_entrypoint()`` exactly as ``modal run file.py ARGS`` does, without running it.

    Uses the option builder of the installed modal CLI, so flag names, bool ``--x/--no-x`` flags and Literal choices
    behave as they will for the user. Raises ``click.UsageError`` (e.g. ``click.BadParameter``) for bad arguments.
    """
    import click
    from modal.cli.run import _add_click_options, _get_cli_runnable_signature, _get_signature, safe_get_type_hints

    func = entrypoint.info.raw_f
    signature = _get_cli_runnable_signature(_get_signature(func), safe_get_type_hints(func))
    parsed: dict = {}

    def record(**kwargs):
        parsed.update(kwargs)

    command = click.command()(_add_click_options(record, signature.parameters))
    command.main(list(argv), standalone_mode=False)
    return parsed
