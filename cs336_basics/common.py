"""What every command shares: the user-error contract, exit codes, and the one CLI wrapper.

A problem the user can fix (a missing file, a bad flag, a diverged run) is raised as a :class:`UserError` whose
message is one line saying what is wrong and how to fix it; :func:`run_cli` prints it as ``error: ...`` with no
traceback and exits with the error's code. Anything else is a crash: Python prints the traceback and exits 1.

Exit codes tell callers (torchrun on Modal, the sweep runner, shell scripts) whether a retry can help:

====  ==================================================================================================
0     success
1     crash: an unexpected exception with a traceback (a bug, or a transient failure worth retrying)
2     user error: bad input, config or setup; the one-line message says how to fix it (argparse's usage errors
      exit 2 too); running the same command again cannot succeed
3     diverged: the training loss became non-finite or exploded; retrying the same config cannot help
130   interrupted (Ctrl-C / SIGINT); a training run continues with ``--resume``
====  ==================================================================================================
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
NO_RETRY_EXIT_CODES = (EXIT_USER_ERROR, EXIT_DIVERGED)  # a retry of the same command fails the same way


class UserError(Exception):
    """A problem the user can fix; ``str(error)`` is one line saying what is wrong and how to fix it."""

    exit_code = EXIT_USER_ERROR


class DivergedError(UserError):
    """Training diverged (non-finite or exploding loss); the message names the last good checkpoint."""

    exit_code = EXIT_DIVERGED


class DiskFullError(UserError):
    """No space left where an output is written; the message names the folder and the space needed."""

    def __init__(self, message: str, path: Path | None = None, needed_bytes: int | None = None):
        super().__init__(message)
        self.path, self.needed_bytes = path, needed_bytes


def one_line(text: str, limit: int = 500) -> str:
    """Collapse a (possibly multi-line) message into one line of at most ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KB', in powers of 1024."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def is_disk_full(exc: BaseException) -> bool:
    """True for 'no space left on device' and 'disk quota exceeded'."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(path: str | os.PathLike, needed_bytes: int | None = None) -> DiskFullError:
    """The one-line error for a write to ``path`` that ran out of space."""
    folder = Path(path).parent
    try:
        free = f"{fmt_bytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    need = f"about {fmt_bytes(needed_bytes)} needed, " if needed_bytes else ""
    return DiskFullError(f"no space left in {folder}/ to write {Path(path).name} ({need}{free}): "
                         "free some space there or choose another output folder", Path(path), needed_bytes)


def run_cli(main: Callable[[], object], *, quiet: bool = False,
            interrupted: str = "interrupted") -> int:
    """Run a command's body; return its exit code (see the module docstring) instead of raising.

    ``quiet`` suppresses the error line (torchrun ranks other than 0 fail the same way and stay silent).
    ``interrupted`` is printed on Ctrl-C (e.g. how to continue).
    """
    try:
        main()
    except UserError as exc:
        if not quiet:
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        if not quiet:
            print(f"\n{interrupted}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into e.g. `head`, which exited: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def run_command(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], object],
                argv: Sequence[str] | None = None, **kwargs) -> int:
    """A command's ``main``: parse ``argv`` with ``parser``, run ``body(args)`` under :func:`run_cli`."""
    args = parser.parse_args(argv)
    return run_cli(lambda: body(args), **kwargs)


def fmt_duration(seconds: float | None) -> str:
    """Seconds as the two largest units: 183_600 -> '2 d 3 h', 4_000 -> '1 h 6 min', 75 -> '1 min 15 s'."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{max(seconds, 0.0):.1f} s"
    total = int(round(seconds))
    for big, big_unit, small, small_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "min"), (60, "min", 1, "s")):
        if total >= big:
            high, rest = divmod(total, big)
            return f"{high} {big_unit} {rest // small} {small_unit}"
    raise AssertionError("unreachable")


def fmt_si(n: float | None, unit: str = "") -> str:
    """Three significant digits with an SI prefix: 3.2768e8 -> '328M', (5.92e17, 'FLOP') -> '592 PFLOP'; None -> '-'."""
    if n is None or not math.isfinite(n):
        return "-"
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
            return f"{value:.{digits}f}{' ' if unit else ''}{prefix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def fmt_loss(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] | None = None) -> str:
    """Columns padded to their widest cell, a dashed rule under the headers; ``right[i]`` right-aligns column i."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    right = list(right) if right is not None else [False] * len(headers)

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
