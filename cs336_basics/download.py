"""Download the CS336 training corpora (TinyStoriesV2-GPT4, an OpenWebText sample) from the Hugging Face Hub.

    uv run python -m cs336_basics.download tinystories [--output-dir data]
    uv run python -m cs336_basics.download owt [--output-dir data]

Everything goes through ``huggingface_hub``: ``HF_ENDPOINT`` (mirrors), ``HF_TOKEN``, ``HF_HUB_OFFLINE``, and its
retries, which resume a dropped connection with a range request. On top of that an interrupted run (Ctrl-C, a
killed process, a network outage that outlasts the retries) resumes where it stopped: the bytes received are kept
in ``.NAME.ETAG.part`` beside the target, named after the file's version so a file changed on the Hub starts over.
A complete download is checked against the checksum the Hub gives (the sha256 of LFS files, the git blob id of
others) before it is renamed into place. A file already in the ``huggingface_hub`` cache (``hf download``, another
project) is taken from there, hard-linked when possible, instead of downloaded again. ``.gz`` files are decompressed
as a stream into a temporary file renamed when complete.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cs336_basics.common import UserError, disk_full_error, fmt_bytes, is_disk_full, one_line, run_command
from cs336_basics.fileio import atomic_output, temp_path

DEFAULT_ENDPOINT = "https://huggingface.co"
REVISION = "main"
_BLOCK = 1 << 20
_RETRY_STATUS = (429, 500, 502, 503, 504)  # worth retrying: rate limit, server trouble


@dataclass(frozen=True)
class RemoteFile:
    repo: str  # Hugging Face dataset repo
    name: str  # file name in the repo
    gunzip: bool = False  # store decompressed, without the .gz suffix

    @property
    def local_name(self) -> str:
        return self.name.removesuffix(".gz") if self.gunzip else self.name

    def url(self, endpoint: str | None = None) -> str:
        """The file's ``resolve`` URL on the Hub (or ``HF_ENDPOINT``): what ``wget`` would fetch."""
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, self.name, repo_type="dataset", revision=REVISION, endpoint=_endpoint(endpoint))


DATASETS: dict[str, list[RemoteFile]] = {
    "tinystories": [
        RemoteFile("roneneldan/TinyStories", "TinyStoriesV2-GPT4-train.txt"),
        RemoteFile("roneneldan/TinyStories", "TinyStoriesV2-GPT4-valid.txt"),
    ],
    "owt": [
        RemoteFile("stanford-cs336/owt-sample", "owt_train.txt.gz", gunzip=True),
        RemoteFile("stanford-cs336/owt-sample", "owt_valid.txt.gz", gunzip=True),
    ],
}


class DownloadError(UserError):
    """A one-line, user-facing download failure."""


def _endpoint(endpoint: str | None) -> str:
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, when it is imported.
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the server could not be reached or the connection broke (not an HTTP answer)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):  # huggingface_hub's HTTP client (httpx2 since 1.x)
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _unreachable(remote: RemoteFile, endpoint: str, output_dir: Path, exc: BaseException) -> DownloadError:
    return DownloadError(
        f"cannot download {remote.name}: {endpoint} cannot be reached ({one_line(exc, 120) or type(exc).__name__}); "
        f"are you offline? Set HF_ENDPOINT for a mirror, or download {remote.url(endpoint)} by hand into "
        f"{output_dir}/"
    )


def _http_error(remote: RemoteFile, endpoint: str, exc: BaseException) -> DownloadError:
    from huggingface_hub.errors import (GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"{endpoint}/datasets/{remote.repo}"
    if isinstance(exc, GatedRepoError):
        return DownloadError(f"cannot download {remote.name}: {where} is gated; accept its terms on that page and "
                             "set HF_TOKEN to a token of that account")
    if isinstance(exc, RepositoryNotFoundError):
        return DownloadError(f"cannot download {remote.name}: {where} was not found or needs a login; if it is "
                             "private or gated, set HF_TOKEN to a token with access to it")
    if isinstance(exc, (RemoteEntryNotFoundError, RevisionNotFoundError)):
        return DownloadError(f"cannot download {remote.name}: it is not in {where} (revision {REVISION}); "
                             "is HF_ENDPOINT a complete mirror?")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return DownloadError(f"cannot download {remote.name} from {where}: the server answered "
                         f"{status or one_line(exc, 120)}; try again later")


def remote_metadata(remote: RemoteFile, output_dir: Path, endpoint: str | None = None):
    """The file's ``huggingface_hub.HfFileMetadata`` (etag, size, commit, download location): one HEAD request."""
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = _endpoint(endpoint)
    url = remote.url(endpoint)
    try:
        try:
            # No retries when the server cannot be reached at all (offline, wrong HF_ENDPOINT): say so at once.
            meta = get_hf_file_metadata(url, endpoint=endpoint)
        except HfHubHTTPError as e:
            if getattr(e.response, "status_code", None) not in _RETRY_STATUS:
                raise
            meta = get_hf_file_metadata(url, endpoint=endpoint, retry_on_errors=True)  # with the library's backoff
    except HfHubHTTPError as e:
        raise _http_error(remote, endpoint, e) from None
    except _network_errors() as e:
        raise _unreachable(remote, endpoint, output_dir, e) from None
    if not meta.etag or meta.size is None:
        raise DownloadError(f"cannot download {remote.name}: {endpoint} did not answer like the Hugging Face Hub "
                            "(no ETag or size); is HF_ENDPOINT a Hugging Face mirror?")
    return meta


def _cached(remote: RemoteFile, etag: str | None, cache_dir: str | os.PathLike | None) -> Path | None:
    """The file in the huggingface_hub cache, if there (and, when ``etag`` is known, of that version)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(remote.repo, remote.name, cache_dir=cache_dir, revision=REVISION,
                                   repo_type="dataset")
    if not isinstance(found, str):
        return None
    blob = Path(found).resolve()  # snapshots/<commit>/NAME -> blobs/<etag>
    return blob if blob.is_file() and (etag is None or blob.name == etag) else None


def _part_path(output_dir: Path, remote: RemoteFile, etag: str) -> Path:
    return output_dir / f".{remote.name}.{re.sub(r'[^0-9A-Za-z]', '', etag)[:64]}.part"


def _checksum_ok(path: Path, etag: str, size: int, progress: bool, name: str) -> bool | None:
    """Whether ``path`` matches the Hub's etag: sha256 (LFS files) or git blob sha1 (others); None: other etag."""
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        digest = hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", etag):
        digest = hashlib.sha1(b"blob %d\0" % size)
    else:
        return None
    with open(path, "rb") as f, _bar(progress, size, f"checking {name}") as bar:
        while block := f.read(_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest() == etag


def _bar(progress: bool, total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress)


def _quiet_tqdm():
    from tqdm import tqdm

    class Quiet(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def _download(remote: RemoteFile, meta, output_dir: Path, progress: bool) -> Path:
    """Download (or finish downloading) the file into its ``.part`` file, checked; return that path."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    part = _part_path(output_dir, remote, meta.etag)
    for old in output_dir.glob(f".{remote.name}.*.part"):  # an older version of the file, partly downloaded
        if old != part:
            old.unlink(missing_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if have > meta.size:
        part.unlink()
        have = 0
    if have and progress:
        print(f"resuming {remote.name} at {fmt_bytes(have)} of {fmt_bytes(meta.size)}", file=sys.stderr, flush=True)
    try:
        with open(part, "ab") as f:
            http_get(meta.location, f, resume_size=have, headers=build_hf_headers(), expected_size=meta.size,
                     displayed_filename=remote.name, tqdm_class=None if progress else _quiet_tqdm())
    except HfHubHTTPError as e:
        raise _http_error(remote, _endpoint(None), e) from None
    except (*_network_errors(), OSError) as e:
        if is_disk_full(e):
            raise disk_full_error(output_dir / remote.name, meta.size - have) from None
        got = part.stat().st_size if part.is_file() else 0
        raise DownloadError(f"download of {remote.name} stopped at {fmt_bytes(got)} of {fmt_bytes(meta.size)} "
                            f"({one_line(e, 100) or type(e).__name__}); run the same command again to resume") from None
    if _checksum_ok(part, meta.etag, meta.size, progress, remote.name) is False:
        part.unlink()
        raise DownloadError(f"download of {remote.name} does not match the Hub's checksum {meta.etag[:12]}... "
                            "(corrupted in transit or by a proxy); it was deleted: run the same command again")
    return part


def _place(source: Path, final: Path, move: bool, gunzip: bool, progress: bool) -> None:
    """Put ``source`` at ``final`` atomically: decompressed, moved (our .part), or linked/copied (the HF cache)."""
    if gunzip:
        try:
            bar = _bar(progress, source.stat().st_size, f"decompressing {source.name}")
            with open(source, "rb") as raw, gzip.GzipFile(fileobj=raw) as src, atomic_output(final) as tmp, \
                    open(tmp, "wb") as out, bar:
                done = 0
                while block := src.read(_BLOCK):
                    out.write(block)
                    bar.update(raw.tell() - done)
                    done = raw.tell()
        except (OSError, EOFError, gzip.BadGzipFile) as e:  # a full disk is a DiskFullError from atomic_output
            raise DownloadError(f"cannot decompress {source}: {one_line(e, 100)}; delete it and run again") from None
        if move:
            source.unlink()
        return
    if move:
        os.replace(source, final)
        return
    tmp = temp_path(final)
    try:
        os.link(source, tmp)  # same file system: no copy, no extra space
        os.replace(tmp, final)
    except OSError:
        tmp.unlink(missing_ok=True)
        with open(source, "rb") as src, atomic_output(final, size_hint=source.stat().st_size) as tmp, \
                open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, _BLOCK)


def fetch(remote: RemoteFile, output_dir: str | Path, *, progress: bool = False, endpoint: str | None = None,
          cache_dir: str | os.PathLike | None = None) -> Path:
    """Make ``output_dir/remote.local_name`` the complete remote file (decompressed for ``.gz``); return its path.

    A complete file already there is kept (a plain file only if it has the remote size); one in the huggingface_hub
    cache (``cache_dir``, default its usual place) is used without downloading. Raises DownloadError (one line).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / remote.local_name

    def note(line: str) -> None:
        if progress:
            print(line, file=sys.stderr, flush=True)

    if remote.gunzip and final.is_file():  # written atomically, so its presence means it is complete
        note(f"{final} already exists, skipping")
        return final
    meta = None
    if not _offline():
        try:
            meta = remote_metadata(remote, output_dir, endpoint)
        except DownloadError:
            if final.is_file():
                note(f"warning: cannot check {final} against the Hub; keeping it")
                return final
            cached = _cached(remote, None, cache_dir)
            if cached is None:
                raise
            note(f"warning: cannot reach the Hub; using {remote.name} from the huggingface_hub cache")
            _place(cached, final, move=False, gunzip=remote.gunzip, progress=progress)
            return final
    if final.is_file() and (meta is None or final.stat().st_size == meta.size):
        note(f"{final} is already complete, skipping")
        return final
    cached = _cached(remote, meta.etag if meta else None, cache_dir)
    if cached is not None:
        note(f"using {remote.name} from the huggingface_hub cache ({cached.parent.parent})")
        _place(cached, final, move=False, gunzip=remote.gunzip, progress=progress)
        return final
    if meta is None:
        raise DownloadError(f"HF_HUB_OFFLINE is set and {remote.name} is neither in {output_dir}/ nor in the "
                            "huggingface_hub cache: unset HF_HUB_OFFLINE to download it")
    part = _download(remote, meta, output_dir, progress)
    _place(part, final, move=True, gunzip=remote.gunzip, progress=progress)
    return final


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cs336_basics.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(DATASETS),
                        help="tinystories: TinyStoriesV2-GPT4 train/valid; owt: OpenWebText sample")
    parser.add_argument("--output-dir", default="data", help="folder for the text files (default: data)")
    return parser


def run(args: argparse.Namespace) -> None:
    """Fetch every file of the dataset into --output-dir."""
    try:
        for remote in DATASETS[args.dataset]:
            path = fetch(remote, args.output_dir, progress=True)
            print(f"✓ {path} ({path.stat().st_size / 1024**2:.2f} MB)", flush=True)
    except OSError as e:  # the output folder: not writable, a file in the way, ...
        if is_disk_full(e):
            raise disk_full_error(Path(e.filename or args.output_dir)) from None
        raise DownloadError(f"cannot write into {args.output_dir}: {e.strerror or e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 download/user error, 130 interrupted)."""
    return run_command(build_parser(), run, argv,
                       interrupted="interrupted; run the same command again to resume the download")


if __name__ == "__main__":
    sys.exit(main())
