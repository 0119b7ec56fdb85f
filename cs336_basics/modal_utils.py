"""Move tokenized data and checkpoints between this machine and the Modal volume.

    modal run cs336_basics/modal_utils.py --action upload --local-path data/train.bin --remote-name train.bin --data-type data
    modal run cs336_basics/modal_utils.py --action list --data-type checkpoint
    modal run cs336_basics/modal_utils.py --action download --remote-name checkpoint_final.pt --local-path checkpoints/checkpoint_final.pt
    modal run cs336_basics/modal_utils.py --action delete --remote-name checkpoint_iter_5000.pt

Inside the volume ``transformer-training-vol`` tokenized data lives under ``/data/`` and checkpoints under
``/checkpoints/``. ``--data-type`` defaults to ``data`` for upload and to ``checkpoint`` for download and delete
(the workflow's examples); list without it shows both folders.

The operations are plain functions taking the volume object, so they run the same against ``modal.Volume`` and
the in-process stand-in the tests use; the local entrypoint only parses and dispatches. Under ``modal run`` the
arguments are checked when the file is imported, before the credentials and before Modal connects; problems print
one ``error: ...`` line and exit 2 (a user error; 1 when Modal could not be reached), as cs336_basics.common says.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NoReturn

import modal
import modal.config
import modal.exception
from modal.types import FileEntryType

from cs336_basics.common import EXIT_CRASH, EXIT_USER_ERROR, UserError, one_line
from cs336_basics.fileio import atomic_output

VOLUME_NAME = "transformer-training-vol"
REMOTE_DIRS = {"data": "data", "checkpoint": "checkpoints"}  # data type -> folder at the volume's root
DEFAULT_DATA_TYPE = {"upload": "data", "download": "checkpoint", "delete": "checkpoint"}
LOCAL_DIRS = {"data": Path("data"), "checkpoint": Path("checkpoints")}  # where a download goes without --local-path
ACTIONS = ("upload", "list", "download", "delete")
SETUP_HINT = "run `modal setup` (or set MODAL_TOKEN_ID / MODAL_TOKEN_SECRET) and try again"

app = modal.App("cs336-volume-utils")


class VolumeError(UserError):
    """A user-facing problem with a volume operation; its message is the one line the CLI prints."""


@dataclass(frozen=True)
class RemoteFile:
    """One file in the volume, named relative to its data-type folder."""

    name: str
    size: int
    mtime: float


def metadata_name(bin_name: str) -> str:
    """Name of the metadata JSON that tokenize_data writes beside ``bin_name`` (same folder)."""
    from cs336_basics.data import metadata_path

    return metadata_path(Path(bin_name)).as_posix()


def remote_path(remote_name: str, data_type: str) -> str:
    """Path inside the volume of ``remote_name`` for ``data_type`` ("data" or "checkpoint")."""
    if data_type not in REMOTE_DIRS:
        raise VolumeError(f"unknown --data-type {data_type!r}: use 'data' or 'checkpoint'")
    name = remote_name.strip().lstrip("/")
    parts = PurePosixPath(name).parts
    if not name or name.endswith("/") or ".." in parts:
        raise VolumeError(f"invalid --remote-name {remote_name!r}: give a file name such as 'train.bin'")
    return f"{REMOTE_DIRS[data_type]}/{name}"


def human_size(num_bytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while abs(num_bytes) >= 1024 and i < len(units) - 1:
        num_bytes /= 1024
        i += 1
    return f"{num_bytes:.0f} B" if i == 0 else f"{num_bytes:.1f} {units[i]}"


def list_files(volume: Any, data_type: str) -> list[RemoteFile]:
    """Files under the data type's folder, sorted by name; an empty list when the folder does not exist yet."""
    folder = REMOTE_DIRS.get(data_type)
    if folder is None:
        raise VolumeError(f"unknown --data-type {data_type!r}: use 'data' or 'checkpoint'")
    try:
        entries = volume.listdir(f"/{folder}", recursive=True)
    except (FileNotFoundError, modal.exception.NotFoundError):
        return []
    prefix = folder + "/"
    files = []
    for entry in entries:
        if entry.type != FileEntryType.FILE:
            continue
        path = entry.path.lstrip("/")
        name = path[len(prefix) :] if path.startswith(prefix) else path
        files.append(RemoteFile(name=name, size=int(entry.size), mtime=float(entry.mtime)))
    return sorted(files, key=lambda f: f.name)


def format_listing(files: list[RemoteFile], data_type: str) -> str:
    """A table of name, size and modification time (UTC), or a line saying the folder is empty."""
    folder = REMOTE_DIRS[data_type]
    if not files:
        return f"/{folder}/ is empty in volume {VOLUME_NAME}"
    width = max(len(f.name) for f in files)
    lines = [f"/{folder}/ in volume {VOLUME_NAME}:"]
    for f in files:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(f.mtime))
        lines.append(f"  {f.name:<{width}}  {human_size(f.size):>10}  {stamp}")
    total = sum(f.size for f in files)
    lines.append(f"  {len(files)} file(s), {human_size(total)}")
    return "\n".join(lines)


def _find(volume: Any, remote_name: str, data_type: str) -> RemoteFile | None:
    name = remote_path(remote_name, data_type).split("/", 1)[1]
    return next((f for f in list_files(volume, data_type) if f.name == name), None)


def _not_found(volume: Any, remote_name: str, data_type: str) -> VolumeError:
    names = [f.name for f in list_files(volume, data_type)]
    folder = REMOTE_DIRS[data_type]
    available = ", ".join(names) if names else "nothing"
    other = "checkpoint" if data_type == "data" else "data"
    return VolumeError(
        f"{remote_name!r} not found in /{folder}/ of volume {VOLUME_NAME} (it holds: {available}); "
        f"check the name, or pass --data-type {other} if it is a {other} file"
    )


def upload(
    volume: Any,
    local_path: str | Path,
    remote_name: str | None,
    data_type: str,
    force: bool = False,
    *,
    progress: bool = False,
) -> list[tuple[str, str]]:
    """Upload ``local_path`` (and the metadata JSON beside a .bin) to the volume; returns (local, volume path) pairs.

    Refuses to replace an existing remote file unless ``force``.
    """
    local = _local_file(local_path)
    remote_name = remote_name or local.name
    targets = [(local, remote_path(remote_name, data_type))]
    local_meta = Path(metadata_name(str(local)))
    if local.suffix == ".bin" and local_meta.is_file():
        targets.append((local_meta, remote_path(metadata_name(remote_name), data_type)))

    existing = {f"{REMOTE_DIRS[data_type]}/{f.name}" for f in list_files(volume, data_type)}
    clashes = [dst for _, dst in targets if dst in existing]
    if clashes and not force:
        raise VolumeError(
            f"/{clashes[0]} already exists in volume {VOLUME_NAME}; pass --force to replace it "
            "(or choose another --remote-name)"
        )
    total = sum(src.stat().st_size for src, _ in targets)
    transfer = _TqdmTransfer(None) if progress else None
    batch_context, reports_bytes = _upload_context(volume, force, transfer)
    with _upload_progress(total, transfer, batch_context, reports_bytes) as batch:
        for src, dst in targets:
            batch.put_file(str(src), "/" + dst)  # a path: the client opens the file itself, once per reader
    return [(str(src), "/" + dst) for src, dst in targets]


def _local_file(path: str | Path) -> Path:
    local = Path(path)
    if not local.is_file():
        hint = " (tokenize first: uv run python prepare_data.py ...)" if local.suffix == ".bin" else ""
        raise VolumeError(f"local file {str(local)!r} does not exist or is not a file{hint}")
    return local


def download(
    volume: Any,
    remote_name: str,
    local_path: str | Path | None,
    data_type: str,
    *,
    progress: bool = False,
) -> Path:
    """Stream a volume file into ``local_path`` via a temporary file renamed on completion; returns the path.

    ``local_path`` may be an existing folder; it defaults to ``data/`` or ``checkpoints/`` plus the file name.
    An existing local file is replaced, but only once the new copy is complete (the download is what was asked for;
    a failed download leaves the old file as it was).
    """
    found = _find(volume, remote_name, data_type)
    if found is None:
        raise _not_found(volume, remote_name, data_type)
    base = PurePosixPath(found.name).name
    dest = Path(local_path) if local_path else LOCAL_DIRS[data_type] / base
    if dest.is_dir():
        dest = dest / base
    _stream_to_file(volume, remote_path(found.name, data_type), dest, found.size, progress)
    if data_type == "data" and base.endswith(".bin"):  # keep the metadata beside the tokens
        meta = _find(volume, metadata_name(found.name), data_type)
        if meta is not None:
            meta_dest = Path(metadata_name(str(dest)))
            _stream_to_file(volume, remote_path(meta.name, data_type), meta_dest, meta.size, False)
    return dest


def delete(volume: Any, remote_name: str, data_type: str) -> list[str]:
    """Remove a file (and a .bin's metadata JSON) from the volume; returns the volume paths removed."""
    found = _find(volume, remote_name, data_type)
    if found is None:
        raise _not_found(volume, remote_name, data_type)
    removed = [remote_path(found.name, data_type)]
    if data_type == "data" and found.name.endswith(".bin") and _find(volume, metadata_name(found.name), data_type):
        removed.append(remote_path(metadata_name(found.name), data_type))
    for path in removed:
        volume.remove_file("/" + path)
    return ["/" + p for p in removed]


def _stream_to_file(volume: Any, path: str, dest: Path, size: int, progress: bool) -> None:
    from tqdm import tqdm

    with atomic_output(dest) as tmp:
        with (
            open(tmp, "wb") as out,
            tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress) as bar,
        ):
            for chunk in volume.read_file("/" + path):
                out.write(chunk)
                bar.update(len(chunk))
        written = os.path.getsize(tmp)
        if written != size:
            raise VolumeError(f"download of /{path} stopped after {written} of {size} bytes; run it again")


class _TqdmTransfer:
    """Adapts Modal's transfer progress callback (name/size, task_id+advance/reset/complete) to one tqdm bar.

    ``sent`` counts the bytes the client reported sending (minus retried ones), whether or not a bar is attached.
    """

    def __init__(self, bar: Any):
        self.bar = bar
        self.done: dict[Any, float] = {}
        self.sent = 0.0

    def __call__(self, task_id: Any = None, advance: float | None = None, name: str | None = None,
                 size: float | None = None, reset: bool | None = False, complete: bool | None = False) -> Any:
        if task_id is None:
            if name is not None and size is not None:
                self.done[len(self.done)] = 0.0
                return len(self.done) - 1
            return None
        if reset:
            self._update(-self.done.get(task_id, 0.0))
            self.done[task_id] = 0.0
        elif advance is not None:
            self.done[task_id] = self.done.get(task_id, 0.0) + advance
            self._update(advance)
        return None

    def _update(self, n: float) -> None:
        self.sent += n
        if self.bar is not None:
            self.bar.update(n)


def _upload_context(volume: Any, force: bool, progress_cb: _TqdmTransfer | None) -> tuple[Any, bool]:
    """The upload batch for ``volume`` and whether it reports the bytes it sends to ``progress_cb``.

    ``Volume.batch_upload`` takes no progress callback. ``modal volume put`` builds the same upload context with one
    (``AbstractVolumeUploadContextManager.resolve``), which needs the volume's file-system version; the public
    wrapper has no ``_metadata`` attribute but does have ``_get_metadata()``, the one non-public call made here.
    (A file object that counts its reads cannot stand in: for v2 volumes the client reads through a duplicate of its
    file descriptor, and for large v1 uploads it re-opens the file by name, so only hashing would be counted.)
    Any other volume, or a modal client without these, gets the public ``batch_upload`` and no byte counts.
    """
    if progress_cb is not None and isinstance(volume, modal.Volume):
        try:
            volume.hydrate()
            version = volume._get_metadata().version
            context = modal.volume.AbstractVolumeUploadContextManager.resolve(
                version, volume.object_id, volume.client, progress_cb=progress_cb, force=force
            )
            return context, True
        except (AttributeError, TypeError, RuntimeError):
            pass
    return volume.batch_upload(force=force), False


@contextlib.contextmanager
def _upload_progress(total: int, transfer: _TqdmTransfer | None, batch_context: Any, reports_bytes: bool) -> Iterator[Any]:
    """Enter ``batch_context`` (the upload happens when it exits) under a progress display unless ``transfer`` is None.

    With byte reports a tqdm bar counts the bytes sent; without them the display says so and shows the time taken,
    rather than a bar that sits at 0 and then jumps to 100 %.
    """
    if transfer is None:
        with batch_context as batch:
            yield batch
        return
    from tqdm import tqdm

    print(f"Hashing and uploading {human_size(total)} (blocks the volume already holds are skipped)...", flush=True)
    if not reports_bytes:
        start = time.monotonic()
        with batch_context as batch:
            yield batch
        print(f"Uploaded in {time.monotonic() - start:.0f} s (this volume reports no byte progress)", flush=True)
        return
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="upload") as bar:
        transfer.bar = bar
        with batch_context as batch:
            yield batch
        bar.update(total - bar.n)  # blocks the volume already held were never sent


def check_action_args(action: str, local_path: str = "", remote_name: str = "", data_type: str = "",
                      force: bool = False) -> None:
    """VolumeError for arguments no volume could satisfy; checked before Modal is contacted (and again by run_action)."""
    if action not in ACTIONS:
        raise VolumeError(f"unknown --action {action!r}: use one of {', '.join(ACTIONS)}")
    if data_type and data_type not in REMOTE_DIRS:
        raise VolumeError(f"unknown --data-type {data_type!r}: use 'data' or 'checkpoint'")
    if action == "list":
        return
    data_type = data_type or DEFAULT_DATA_TYPE[action]
    if action == "upload":
        if not local_path:
            raise VolumeError("--action upload needs --local-path (e.g. --local-path data/train.bin)")
        remote_path(remote_name or _local_file(local_path).name, data_type)
        return
    if not remote_name:
        raise VolumeError(f"--action {action} needs --remote-name (see --action list --data-type {data_type})")
    remote_path(remote_name, data_type)


def run_action(
    volume: Any,
    action: str,
    local_path: str = "",
    remote_name: str = "",
    data_type: str = "",
    force: bool = False,
    *,
    progress: bool = True,
) -> str:
    """Perform one CLI action and return what to print; raises VolumeError for anything the user must fix."""
    check_action_args(action, local_path, remote_name, data_type, force)
    if action == "list":
        types = [data_type] if data_type else list(REMOTE_DIRS)
        return "\n".join(format_listing(list_files(volume, t), t) for t in types)
    data_type = data_type or DEFAULT_DATA_TYPE[action]
    if action == "upload":
        pairs = upload(volume, local_path, remote_name or None, data_type, force, progress=progress)
        return "\n".join(f"Uploaded {src} -> {VOLUME_NAME}:{dst}" for src, dst in pairs)
    if action == "download":
        existed = _local_target_exists(local_path, remote_name, data_type)
        dest = download(volume, remote_name, local_path or None, data_type, progress=progress)
        note = " (replaced the existing local file)" if existed else ""
        return f"Downloaded {VOLUME_NAME}:{remote_path(remote_name, data_type)} -> {dest}{note}"
    removed = delete(volume, remote_name, data_type)
    return "\n".join(f"Deleted {VOLUME_NAME}:{p}" for p in removed)


def _local_target_exists(local_path: str | None, remote_name: str, data_type: str) -> bool:
    base = PurePosixPath(remote_name).name
    dest = Path(local_path) if local_path else LOCAL_DIRS[data_type] / base
    return (dest / base).exists() if dest.is_dir() else dest.exists()


# ----------------------------------------------------------------------------- command line (shared with train_modal)


def cli_error(exc: BaseException) -> tuple[str, int] | None:
    """(one line, exit code) for an error the user can act on (bad input, credentials, network), else None."""
    if isinstance(exc, UserError):
        return f"error: {one_line(exc)}", exc.exit_code
    if isinstance(exc, modal.exception.AuthError):
        return f"error: Modal rejected the credentials ({one_line(exc)}); {SETUP_HINT}", EXIT_USER_ERROR
    if isinstance(exc, modal.exception.PermissionDeniedError):
        return (f"error: Modal denied access ({one_line(exc)}); check the workspace (`modal profile current`) "
                f"or {SETUP_HINT}"), EXIT_USER_ERROR
    if isinstance(exc, modal.exception.ConnectionError):  # may pass: exit 1, like any failure worth retrying
        return (f"error: could not reach Modal ({one_line(exc)}); check the network, and if this machine was never "
                f"set up, {SETUP_HINT}"), EXIT_CRASH
    if isinstance(exc, FileExistsError):
        return f"error: {one_line(exc)}; pass --force to replace it", EXIT_USER_ERROR
    return None


def fail(line: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print one ``error: ...`` line to stderr and exit with ``code`` (``modal run`` passes it on)."""
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(code)


def exit_on_cli_error(exc: BaseException) -> None:
    """Exit with the one line for ``exc`` when the user can act on it; return (so the caller re-raises) otherwise."""
    found = cli_error(exc)
    if found is not None:
        fail(*found)


_RUN_OPTIONS_WITH_VALUE = {"-n", "--name", "-w", "--write-result", "-e", "--env", "--profile"}


def modal_run_args(argv: list[str], script: str) -> tuple[list[str], set[str]] | None:
    """(entrypoint arguments, ``modal run`` options) when ``argv`` is ``modal run [OPTIONS] <script> ARGS``, else None.

    ``script`` is the file name, e.g. "modal_utils.py"; ``-m cs336_basics.modal_utils`` and ``file.py::main`` count.
    """
    if len(argv) < 3 or Path(argv[0]).name not in ("modal", "__main__.py") or argv[1] != "run":
        return None
    options, module_mode, i = set(), False, 2
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        flag = argv[i].split("=", 1)[0]
        options.add(flag)
        module_mode = module_mode or flag == "-m"
        i += 2 if flag in _RUN_OPTIONS_WITH_VALUE and "=" not in argv[i] else 1
    if i >= len(argv):
        return None
    ref = argv[i].split("::", 1)[0]
    name = ref.rsplit(".", 1)[-1] + ".py" if module_mode else Path(ref).name
    return (argv[i + 1 :], options) if name == script else None


def parse_cli_args(tokens: list[str], entrypoint: Callable[..., Any],
                   repeatable: Collection[str] = ()) -> dict[str, Any] | None:
    """The keyword arguments ``modal run`` would pass ``entrypoint`` for ``tokens``; None when it would not parse them.

    Follows Modal's rules: ``local_path`` is ``--local-path VALUE`` (or ``--local-path=VALUE``), a bool is
    ``--force`` / ``--no-force``. Anything else (``--help``, unknown flags, missing values) gives None, and Modal's
    own parser reports it. A parameter named in ``repeatable`` gets the list of every value given: Modal's parser
    keeps only the last one of a repeated flag.
    """
    params = inspect.signature(entrypoint).parameters
    flags = {name.replace("_", "-"): p for name, p in params.items()}
    out: dict[str, Any] = {name: [] for name in repeatable}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            return None
        flag, has_value, value = token[2:].partition("=")
        param = flags.get(flag)
        if param is None and flag.startswith("no-") and isinstance(getattr(flags.get(flag[3:]), "default", None), bool):
            if has_value:
                return None
            out[flags[flag[3:]].name] = False
        elif param is None:
            return None
        elif isinstance(param.default, bool):
            if has_value:
                return None
            out[param.name] = True
        else:
            if not has_value:
                if i + 1 >= len(tokens):
                    return None
                value, i = tokens[i + 1], i + 1
            if param.name in repeatable:
                out[param.name].append(value)
            else:
                out[param.name] = value
        i += 1
    if any(p.default is inspect.Parameter.empty and name not in out for name, p in params.items()):
        return None
    return {name: out.get(name, p.default) for name, p in params.items()}


def has_credentials() -> bool:
    """True when this machine has a Modal token (``modal setup`` or MODAL_TOKEN_ID / MODAL_TOKEN_SECRET)."""
    settings = modal.config.config
    return any(settings.get(key) for key in ("token_id", "token_secret", "oauth_refresh_token", "oauth_client_id"))


@dataclass(frozen=True)
class ModalRun:
    """``modal run [OPTIONS] <script> ARGS`` on this machine, as :func:`check_before_connecting` found it."""

    options: set[str]  # modal run's own options (e.g. --detach)
    kwargs: dict[str, Any] | None  # the entrypoint's arguments; None when Modal's own parser is to report them
    checked: Any = None  # what the check returned for ``kwargs``


def check_before_connecting(argv: list[str], script: str, entrypoint: Callable[..., Any],
                            check: Callable[..., Any], repeatable: Collection[str] = ()) -> ModalRun | None:
    """Under ``modal run <script>`` on this machine: check the arguments, then the credentials, before Modal connects.

    Runs when the script is imported (``modal run`` imports the file before it parses the arguments and connects):
    ``check(**kwargs)`` raises UserError for bad arguments; without credentials the line says to run ``modal setup``.
    Either stops with one line and exit code 2. Returns the run: ``modal run``'s options, the parsed arguments (lists
    for the ``repeatable`` ones, see :func:`parse_cli_args`; None when Modal's own parser is to report them) and what
    ``check`` returned for them; or None when this is not such a run (tests, imports, the container).
    """
    found = modal_run_args(argv, script)
    if found is None or not modal.is_local():
        return None
    tokens, options = found
    kwargs = parse_cli_args(tokens, entrypoint, repeatable)
    if kwargs is None:
        return ModalRun(options, None)
    try:
        checked = check(**kwargs)
    except UserError as exc:
        exit_on_cli_error(exc)  # a UserError always has its one line: this exits
        raise
    if not has_credentials():
        fail(f"error: no Modal credentials on this machine: {SETUP_HINT}")
    return ModalRun(options, kwargs, checked)


def open_volume() -> Any:
    """The training volume, created on first use."""
    return modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)


def main(
    action: Literal["upload", "list", "download", "delete"],
    local_path: str = "",
    remote_name: str = "",
    data_type: str = "",
    force: bool = False,
) -> None:
    """Upload, list, download or delete files in the training volume."""
    try:
        print(run_action(open_volume(), action, local_path, remote_name, data_type, force))
    except Exception as exc:
        exit_on_cli_error(exc)
        raise


check_before_connecting(sys.argv, "modal_utils.py", main, check_action_args)
main = app.local_entrypoint()(main)

if __name__ == "__main__":
    fail("error: run this file with Modal's CLI, e.g. `modal run cs336_basics/modal_utils.py --action list` "
         "(see MODAL_GUIDE.md)")
