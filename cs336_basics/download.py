"""Download the CS336 training corpora (TinyStoriesV2-GPT4, an OpenWebText sample) from Hugging Face.

    uv run python -m cs336_basics.download tinystories [--output-dir data]
    uv run python -m cs336_basics.download owt [--output-dir data]

Streams with urllib (no extra dependencies) into a temporary file that is renamed when complete,
shows a progress bar, and skips files already present with the size the server reports. Set
``HF_ENDPOINT`` (as for ``huggingface_hub``) to use a mirror.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cs336_basics.common import UserError
from cs336_basics.fileio import atomic_output

DEFAULT_ENDPOINT = "https://huggingface.co"
_BLOCK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    repo: str  # Hugging Face dataset repo
    name: str  # file name in the repo
    gunzip: bool = False  # store decompressed, without the .gz suffix

    @property
    def local_name(self) -> str:
        return self.name.removesuffix(".gz") if self.gunzip else self.name

    def url(self, endpoint: str | None = None) -> str:
        endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        return f"{endpoint}/datasets/{self.repo}/resolve/main/{self.name}"


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


def download(url: str, dest: str | Path, *, progress: bool = False, timeout: float = 30.0) -> bool:
    """Stream ``url`` to ``dest`` atomically; return False (and skip) when ``dest`` already has the remote size.

    Raises DownloadError when the server cannot be reached, answers with an error, or the transfer
    ends early.
    """
    dest = Path(dest)
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"cannot download {url}: the server answered {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"cannot download {url}: {reason} (are you offline? set HF_ENDPOINT for a mirror, "
            f"or download the file by hand into {dest.parent}/)"
        ) from None
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if total is not None and dest.is_file() and dest.stat().st_size == total:
            return False
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name)
        received = 0
        try:
            with atomic_output(dest) as tmp, open(tmp, "wb") as out:
                while block := response.read(_BLOCK):
                    out.write(block)
                    received += len(block)
                    if bar is not None:
                        bar.update(len(block))
                if total is not None and received != total:
                    raise DownloadError(f"download of {url} ended early: got {received:,} of {total:,} bytes; run again")
        except (OSError, http.client.HTTPException) as e:
            raise DownloadError(f"download of {url} failed after {received:,} bytes: {e}; run again") from None
        finally:
            if bar is not None:
                bar.close()
    return True


def fetch(remote: RemoteFile, output_dir: str | Path, *, progress: bool = False, endpoint: str | None = None) -> Path:
    """Download one dataset file into ``output_dir`` (decompressing ``.gz`` files); return the local path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / remote.local_name
    if not remote.gunzip:
        if not download(remote.url(endpoint), final, progress=progress) and progress:
            print(f"{final} is already complete, skipping", file=sys.stderr)
        return final
    if final.is_file():  # written atomically, so its presence means it is complete
        if progress:
            print(f"{final} already exists, skipping", file=sys.stderr)
        return final
    compressed = output_dir / remote.name
    download(remote.url(endpoint), compressed, progress=progress)
    try:
        with gzip.open(compressed, "rb") as src, atomic_output(final) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, _BLOCK)
    except (OSError, EOFError) as e:
        raise DownloadError(f"cannot decompress {compressed}: {e}; delete it and run again") from None
    compressed.unlink()
    return final


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cs336_basics.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(DATASETS), help="tinystories: TinyStoriesV2-GPT4 train/valid; owt: OpenWebText sample")
    parser.add_argument("--output-dir", default="data", help="folder for the text files (default: data)")
    args = parser.parse_args(argv)
    try:
        for remote in DATASETS[args.dataset]:
            path = fetch(remote, args.output_dir, progress=True)
            print(f"✓ {path} ({path.stat().st_size / 1024**2:.2f} MB)")
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write into {args.output_dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; partial downloads were removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
