"""The experiment log: one ``run.json`` per run beside its checkpoints, and a command that lists them.

    uv run python -m cs336_basics.runs [DIR] [--json]

``run.json`` says what was run (the full resolved config, the command line, the git commit and whether the tree had
uncommitted changes), where (device, GPU, processes), when (start and end, UTC), and how it ended (status, tokens,
iterations, losses). :class:`RunRecord` is its one definition: the training loop writes it at the start with status
``running`` and again when the run ends; sweeps and this command read it.

Floats that are not finite (a loss that became NaN) are written as ``null``, so every ``run.json`` is strict JSON that
any tool (``jq``, a browser, pandas) reads; the status and ``error`` say what happened.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cs336_basics.common import UserError, fmt_duration, fmt_loss, fmt_si, format_table, one_line, run_command
from cs336_basics.fileio import atomic_output

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"  # logger.py writes it beside run.json; plot.py draws it
STATUSES = ("running", "finished", "diverged", "out_of_time", "interrupted", "failed")
FINAL_STATUSES = STATUSES[1:]
DEFAULT_DIR = "checkpoints"
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_GIT_TIMEOUT_S = 5.0


class RunRecordError(UserError):
    """A ``run.json`` that cannot be read; the message names the file and how to fix it."""


def utc_now() -> str:
    """The current time as ISO 8601 UTC, e.g. ``2026-03-01T12:00:00.123+00:00`` (ms: runs of a sweep sort in order)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class RunRecord:
    """What ``run.json`` holds; see the module docstring. ``ended_at`` stays None while the run is running."""

    name: str
    status: str = "running"
    config: dict[str, Any] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    git: dict[str, Any] = field(default_factory=lambda: {"commit": None, "dirty": None})
    started_at: str | None = None
    ended_at: str | None = None
    device: str | None = None
    gpu: str | None = None
    world_size: int = 1
    tokens_seen: int = 0
    iterations: int = 0
    elapsed_s: float = 0.0
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    final_train_loss: float | None = None
    checkpoint_dir: str | None = None
    sweep: dict[str, Any] | None = None
    error: str | None = None

    @classmethod
    def start(cls, name: str, config: dict[str, Any], *, checkpoint_dir: str | os.PathLike, device: str | None = None,
              gpu: str | None = None, world_size: int = 1, sweep: dict[str, Any] | None = None,
              command: Sequence[str] | None = None) -> RunRecord:
        """A record for a run starting now: status ``running``, the git state, ``sys.argv`` unless ``command``."""
        return cls(name=name, config=config, command=list(sys.argv if command is None else command),
                   git=git_state(), started_at=utc_now(), device=device, gpu=gpu, world_size=world_size,
                   checkpoint_dir=str(checkpoint_dir), sweep=sweep)

    def finish(self, status: str, *, error: str | BaseException | None = None, **stats: Any) -> RunRecord:
        """Set the final ``status``, ``ended_at`` = now, a one-line ``error`` and any other fields (e.g. tokens_seen)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {', '.join(FINAL_STATUSES)}, got {status!r}")
        for key, value in stats.items():
            if key not in _FIELDS:
                raise TypeError(f"RunRecord has no field {key!r}")
            setattr(self, key, value)
        self.status, self.ended_at = status, utc_now()
        self.error = None if error is None else one_line(str(error) or type(error).__name__)
        return self

    def to_dict(self) -> dict[str, Any]:
        return _finite(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Any, source: str = RUN_FILE) -> RunRecord:
        """Build a record from parsed JSON, checking every field's type; unknown keys are ignored (newer files)."""
        if not isinstance(data, dict):
            raise RunRecordError(f"{source}: expected a JSON object, got {type(data).__name__}: {_FIX}")
        if not isinstance(data.get("name"), str) or not data["name"]:
            raise RunRecordError(f"{source}: missing or empty \"name\": {_FIX}")
        if data.get("status") not in STATUSES:
            raise RunRecordError(f"{source}: \"status\" must be one of {', '.join(STATUSES)}, "
                                 f"got {data.get('status')!r}: {_FIX}")
        kwargs = {}
        for key, kinds in _TYPES.items():
            if key not in data:
                continue
            value = data[key]
            if not _is(value, kinds):
                names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                raise RunRecordError(f"{source}: \"{key}\" must be {names}, got {value!r}: {_FIX}")
            if float in kinds and isinstance(value, int):
                value = float(value)
            elif int in kinds and isinstance(value, float):
                value = int(value)  # an integral float, e.g. 3.2e8 tokens written by another tool
            kwargs[key] = value
        if "command" in kwargs and not all(isinstance(a, str) for a in kwargs["command"]):
            raise RunRecordError(f"{source}: \"command\" must be a list of strings: {_FIX}")
        return cls(**kwargs)


_FIELDS = {f.name for f in dataclasses.fields(RunRecord)}
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "status": (str,), "config": (dict,), "command": (list,), "git": (dict,),
    "started_at": (str, type(None)), "ended_at": (str, type(None)), "device": (str, type(None)),
    "gpu": (str, type(None)), "world_size": (int,), "tokens_seen": (int,), "iterations": (int,),
    "elapsed_s": (float,), "final_val_loss": (float, type(None)), "best_val_loss": (float, type(None)),
    "final_train_loss": (float, type(None)), "checkpoint_dir": (str, type(None)), "sweep": (dict, type(None)),
    "error": (str, type(None)),
}
_FIX = "the training run writes this file; fix or delete it"


def _is(value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # JSON true/false are not numbers here
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    if isinstance(value, float) and int in kinds:
        return value.is_integer()
    return isinstance(value, kinds)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(value: Any) -> str:
    """Strict, indented JSON (non-finite floats become null); for run.json and sweep.json."""
    return json.dumps(_finite(value), indent=2, allow_nan=False, default=str) + "\n"


# ----------------------------------------------------------------------------- git


def git_state(repo_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the checkout holding ``repo_dir`` (default: this project's code).

    ``dirty`` means tracked files differ from the commit (untracked files, such as outputs, do not count, as in
    ``git describe --dirty``). Both are None when there is no git, no checkout (e.g. code copied into a Modal
    container), or git fails or takes longer than a few seconds. Never raises.
    """
    where = str(Path(repo_dir) if repo_dir is not None else _PROJECT_ROOT)
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # `git status` must not take the index lock of a live checkout

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, env=env,
                                  timeout=_GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
        return proc.stdout if proc.returncode == 0 else None

    commit = git("rev-parse", "--verify", "HEAD")
    if commit is None or not commit.strip():
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


# ----------------------------------------------------------------------------- reading and writing


def write_run_record(directory: str | os.PathLike, record: RunRecord) -> Path:
    """Write ``directory/run.json`` atomically (complete or not at all); returns its path."""
    path = Path(directory) / RUN_FILE
    text = to_json(record.to_dict())
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def read_run_record(path: str | os.PathLike) -> RunRecord:
    """Read a ``run.json`` (or the one in a folder); garbage raises one clear :class:`RunRecordError`."""
    path = Path(path)
    if path.is_dir():
        path = path / RUN_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunRecordError(f"{path} not found: a run writes it when it starts") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunRecordError(f"cannot read {path}: {one_line(exc)}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunRecordError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): {_FIX}") from None
    return RunRecord.from_dict(data, str(path))


def find_runs(root: str | os.PathLike, problems: list[str] | None = None) -> list[tuple[Path, RunRecord]]:
    """Every readable ``run.json`` under ``root`` (recursively), as (path, record), oldest start first.

    A file that cannot be read is skipped; its one-line reason is appended to ``problems`` when given.
    A missing ``root`` raises :class:`UserError`.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root} not found: pass the folder that holds your runs (default: {DEFAULT_DIR}/)")
    paths = [root] if root.is_file() else sorted(root.rglob(RUN_FILE))
    found = []
    for path in paths:
        try:
            found.append((path, read_run_record(path)))
        except RunRecordError as exc:
            if problems is not None:
                problems.append(str(exc))
    return sorted(found, key=lambda item: (_start_key(item[1].started_at), str(item[0])))


def _start_key(started_at: str | None) -> float:
    if started_at:
        try:
            moment = datetime.fromisoformat(started_at)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return moment.timestamp()
        except ValueError:
            pass
    return math.inf  # unknown start: last


# ----------------------------------------------------------------------------- listing


def runs_table(runs: Sequence[tuple[Path, RunRecord]]) -> str:
    """The table printed by the command: one row per run."""
    rows = []
    for _, r in runs:
        where = r.device or "-"
        if r.gpu:
            where += f" ({r.gpu})"
        if r.world_size > 1:
            where += f" x{r.world_size}"
        started = r.started_at.replace("T", " ")[:16] if r.started_at else "-"
        rows.append([r.name, r.status, f"{r.iterations:,}", fmt_si(r.tokens_seen), fmt_loss(r.best_val_loss),
                     fmt_loss(r.final_val_loss), fmt_duration(r.elapsed_s), where, started])
    headers = ["name", "status", "iters", "tokens", "best val", "final val", "elapsed", "device", "started (UTC)"]
    return format_table(headers, rows, right=[False, False, True, True, True, True, True, False, False])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cs336_basics.runs",
                                     description="List the training runs (their run.json files) under a folder.")
    parser.add_argument("dir", nargs="?", default=DEFAULT_DIR, help=f"folder to search recursively (default {DEFAULT_DIR})")
    parser.add_argument("--json", action="store_true", help="print the records as a JSON list (with their paths)")
    return parser


def run(args: argparse.Namespace) -> None:
    """List the runs under a folder."""
    problems: list[str] = []
    runs = find_runs(args.dir, problems)
    for problem in problems:
        print(f"warning: skipped {problem}", file=sys.stderr)
    if args.json:
        print(to_json([{"path": str(path), **record.to_dict()} for path, record in runs]), end="")
    elif not runs:
        print(f"No runs found under {args.dir}/ (no {RUN_FILE}): each training run writes one beside its "
              "checkpoints, e.g. `uv run python cs336_basics/train.py data.checkpoint_dir=checkpoints/my-run`")
    else:
        print(runs_table(runs))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see cs336_basics.common)."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
