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

import errno
import os
import shutil
import sys
from collections.abc import Callable
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
                         "free some space there or choose another output folder")


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


def fmt_duration(seconds: float) -> str:
    """A readable duration: '42 s', '12 min 5 s', '3 h 04 min', '2 d 5 h'."""
    s = max(0, int(round(seconds)))
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def fmt_si(n: float, unit: str = "") -> str:
    """5.92e17 -> '592 P' + unit: three significant digits with an SI prefix (k, M, G, T, P, E)."""
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
            return f"{value:.{digits}f} {prefix}{unit}"
    return f"{n:.3g} {unit}".rstrip()
