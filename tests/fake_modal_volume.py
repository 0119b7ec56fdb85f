"""An in-process stand-in for ``modal.Volume`` that keeps its files in a local folder.

It offers the subset of the Volume API the project uses, with the same method signatures (a test compares them
with the installed modal so they cannot drift) and the same observable behaviour: paths are relative to the volume
root, listings return ``modal.types.FileEntry``, reading a missing file raises FileNotFoundError, and a batch upload
is all-or-nothing and refuses to overwrite an existing file unless ``force``.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
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


class FakeVolume:
    """A volume whose root is ``root`` on the local disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.commits = 0
        self.reloads = 0
        self.uploads: list[str] = []  # volume paths written, in order

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
        self.commits += 1

    def reload(self):
        self.reloads += 1


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
