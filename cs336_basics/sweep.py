"""Sweeps: every combination of the given config values as its own run, then one table and one picture.

    --sweep training.max_lr=1e-4,3e-4,1e-3 [--sweep training.batch_size=32,64]

This module plans and bookkeeps a sweep; how one run is executed is the caller's ``run_one`` (a local training run,
or a Modal container). :func:`run_sweep` runs the grid one point after another; for parallel execution call
:func:`plan_sweep`, then :func:`run_point` for each point wherever it runs, then :func:`finish_sweep` on the results.

Each run gets its own folder ``OUT_DIR/<run name>`` (the name is built from the swept values, e.g.
``max_lr=1e-3_batch_size=64``) for its checkpoints, ``metrics.jsonl`` and ``run.json``. A run that diverges or fails is
recorded with its one-line error and the sweep goes on; Ctrl-C stops it after writing what finished. The results go
to ``OUT_DIR/sweep.json`` and ``OUT_DIR/sweep.csv`` (rewritten after every run, so a killed sweep leaves its table so
far) and the curves to ``OUT_DIR/curves.png``.

Resume: running the same sweep again with the same ``OUT_DIR`` skips every run whose ``run.json`` says ``finished``
or ``diverged`` (the same config ends the same way) and runs the others again (interrupted, failed, out of time, or
never started); ``run_one`` decides whether such a run continues from its last checkpoint.

Runs made elsewhere (one Modal container per point) build the same table from the runs' ``run.json`` files:
:func:`read_rows` (``pending`` for a run that has none yet), then :func:`finish_sweep`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cs336_basics.common import DivergedError, UserError, fmt_duration, fmt_loss, fmt_si, format_table, one_line
from cs336_basics.fileio import atomic_output
from cs336_basics.runs import (FINAL_STATUSES, METRICS_FILE, RUN_FILE, RunRecord, RunRecordError, read_run_record,
                               to_json, utc_now, write_run_record)

SWEEP_JSON, SWEEP_CSV, CURVES = "sweep.json", "sweep.csv", "curves.png"
SKIP_STATUSES = ("finished", "diverged")  # re-running these configs cannot change the outcome
SUMMARY_KEYS = ("status", "iterations", "tokens_seen", "elapsed_s", "final_val_loss", "best_val_loss")
MAX_NAME = 120  # characters of a run name (a folder name and a W&B run name)
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")

Axes = list[tuple[str, list[str]]]
RunOne = Callable[[list[str], str, Path], dict]


class SweepError(UserError):
    """A bad ``--sweep`` spec or sweep folder; the message is one line that says how to fix it."""


# ----------------------------------------------------------------------------- specs, grid, names


def _split_values(text: str) -> list[str]:
    """Split at commas outside brackets, so ``[0.9,0.95],[0.9,0.99]`` is two values."""
    values, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def parse_sweep(specs: Iterable[str], overrides: Iterable[str] = ()) -> Axes:
    """``["training.max_lr=1e-4,3e-4"]`` -> ``[("training.max_lr", ["1e-4", "3e-4"])]``, values as typed.

    Raises :class:`SweepError` for a spec that is not ``section.key=v1,v2,...``, an empty or repeated value, a key
    swept twice, or a key that is also among the plain ``overrides`` (which one should win is unclear).
    """
    axes: Axes = []
    fixed = {item.partition("=")[0].strip() for item in overrides}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            raise SweepError(f"--sweep {spec!r} must look like section.key=v1,v2,..., e.g. training.max_lr=1e-4,3e-4,1e-3")
        values = _split_values(text)
        if any(not v for v in values):
            raise SweepError(f"--sweep {spec!r} has an empty value: list the values separated by single commas, "
                             f"e.g. {key}=1e-4,3e-4")
        for i, v in enumerate(values):
            for w in values[:i]:
                if v == w or _same_number(v, w):
                    raise SweepError(f"--sweep {spec!r} lists the same value twice ({w} and {v}): remove one")
        if any(key == k for k, _ in axes):
            raise SweepError(f"--sweep {key} is given twice: put all its values in one --sweep {key}=v1,v2,...")
        if key in fixed:
            raise SweepError(f"{key} is both swept (--sweep {spec}) and set as an override ({key}=...): drop one of them")
        axes.append((key, values))
    if not axes:
        raise SweepError("no --sweep given: pass e.g. --sweep training.max_lr=1e-4,3e-4,1e-3")
    return axes


def grid(axes: Axes) -> list[dict[str, str]]:
    """Every combination of the axes' values, the first axis varying slowest (the order given)."""
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in axes))]


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """``training.max_lr`` -> ``max_lr``, unless another key has the same last part (then the full key)."""
    last = [k.rpartition(".")[2] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _safe(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-")


def run_name(values: dict[str, str], prefix: str | None = None) -> str:
    """A folder-safe, readable name: ``{"training.max_lr": "1e-3", "training.batch_size": "64"}`` ->
    ``max_lr=1e-3_batch_size=64`` (``PREFIX_...`` with a prefix).

    Only letters, digits and ``. _ + = -`` are kept (a value like ``/data/owt`` becomes ``data-owt``); the name never
    starts with ``.`` or ``-``; one longer than ``MAX_NAME`` characters is cut and ends in a hash of the values.
    """
    short = _short_keys(list(values))
    name = "_".join(f"{short[k]}={_safe(v) or 'x'}" for k, v in values.items())
    if prefix:
        name = f"{_safe(prefix)}_{name}" if _safe(prefix) else name
    name = name.lstrip(".-") or "run"
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 9]}-{_digest(values)}"
    return name


def _digest(values: dict[str, str]) -> str:
    return hashlib.sha1(repr(sorted(values.items())).encode()).hexdigest()[:8]


def run_names(points: Sequence[dict[str, str]], prefix: str | None = None) -> list[str]:
    """:func:`run_name` of each point, made unique (also ignoring case, for macOS and Windows folders)."""
    names = [run_name(p, prefix) for p in points]
    lowered = [n.lower() for n in names]
    return [f"{n}-{_digest(p)}" if lowered.count(n.lower()) > 1 else n for n, p in zip(names, points)]


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: its name, the swept values (as typed) and its folder."""

    name: str
    values: dict[str, str]
    run_dir: Path

    @property
    def overrides(self) -> list[str]:
        """The values as config overrides, e.g. ``["training.max_lr=1e-3"]``."""
        return [f"{k}={v}" for k, v in self.values.items()]


def default_name(axes: Axes, now: float | None = None) -> str:
    """``sweep-<last part of each key>-<UTC time>``, e.g. ``sweep-max_lr-batch_size-20260301-120000``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"sweep-{'-'.join(k.split('.')[-1] for k, _ in axes)}-{stamp}"


def check_name(name: str) -> str:
    """``name`` when it can name a sweep's folder (letters, digits and ``. _ + = -``, not starting with a dot or a
    dash); otherwise a :class:`SweepError` saying so."""
    if not name or _UNSAFE.search(name) or name[0] in ".-" or len(name) > MAX_NAME:
        raise SweepError(f"--sweep-name {name!r}: use up to {MAX_NAME} letters, digits and . _ + = - (not starting "
                         f"with . or -), e.g. --sweep-name {_safe(name).lstrip('.-')[:MAX_NAME] or 'lr-sweep'}")
    return name


def plan_sweep(axes: Axes, out_dir: str | os.PathLike, prefix: str | None = None) -> list[SweepPoint]:
    """The sweep's runs, in grid order, each in ``out_dir/<name>``."""
    points = grid(axes)
    return [SweepPoint(n, p, Path(out_dir) / n) for n, p in zip(run_names(points, prefix), points)]


# ----------------------------------------------------------------------------- running


def _row(point: SweepPoint, status: str, **fields: Any) -> dict[str, Any]:
    row = {"name": point.name, "run_dir": str(point.run_dir), "values": dict(point.values), "status": status,
           "iterations": None, "tokens_seen": None, "elapsed_s": None, "final_val_loss": None,
           "best_val_loss": None, "error": None, "resumed": False}
    row.update({k: v for k, v in fields.items() if k in row})
    return row


def _row_from_record(point: SweepPoint, record: RunRecord, **extra: Any) -> dict[str, Any]:
    return _row(point, record.status, iterations=record.iterations, tokens_seen=record.tokens_seen,
                elapsed_s=record.elapsed_s, final_val_loss=record.final_val_loss,
                best_val_loss=record.best_val_loss, error=record.error, **extra)


def _existing(point: SweepPoint) -> RunRecord | None:
    try:
        return read_run_record(point.run_dir / RUN_FILE)
    except RunRecordError:
        return None


def point_row(point: SweepPoint, record: RunRecord | None) -> dict[str, Any]:
    """A point's table row from its ``run.json`` record: its status and numbers, ``pending`` without a record."""
    return _row(point, "pending") if record is None else _row_from_record(point, record)


def read_rows(points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    """The table rows of ``points`` from the ``run.json`` in each run folder (for runs made elsewhere, in parallel)."""
    return [point_row(p, _existing(p)) for p in points]


def _fill_missing(row: dict[str, Any], point: SweepPoint) -> None:
    """Complete a row ``run_one`` gave no numbers for (it raised): from its ``run.json``, else its metrics.

    A diverged run's table row then shows how far it got and its best validation loss before it blew up.
    """
    record = _existing(point)
    if record is not None and record.status in FINAL_STATUSES and record.iterations:
        for key in SUMMARY_KEYS[1:]:
            if row[key] is None:
                row[key] = getattr(record, key)
        return
    from cs336_basics.plot import load_curves

    if not (point.run_dir / METRICS_FILE).is_file():
        return
    try:
        curves = load_curves(point.run_dir)
    except UserError:
        return
    train, val = curves.train, curves.val
    found: dict[str, Any] = {}
    if len(train):
        found["iterations"] = int(train.iteration[-1])
        for key, column in (("tokens_seen", train.tokens), ("elapsed_s", train.elapsed_s)):
            if math.isfinite(column[-1]):
                found[key] = int(column[-1]) if key == "tokens_seen" else float(column[-1])
    if len(val):
        found.update(final_val_loss=float(val.loss[-1]), best_val_loss=float(val.loss.min()))
    for key, value in found.items():
        if row[key] is None:
            row[key] = value


def _settle_record(point: SweepPoint, sweep_name: str, row: dict[str, Any], started: str) -> None:
    """Make ``run.json`` say how the run ended when ``run_one`` did not (it failed before or while writing it)."""
    record = _existing(point) or RunRecord(name=point.name, started_at=started,
                                           checkpoint_dir=str(point.run_dir), command=list(sys.argv))
    changed = False
    if record.sweep is None:
        record.sweep, changed = {"name": sweep_name, "values": dict(point.values)}, True
    if record.status not in FINAL_STATUSES or (row["status"] != "finished" and record.status == "finished"):
        stats = {k: row[k] for k in SUMMARY_KEYS[1:] if row[k] is not None}
        record.finish(row["status"], error=row["error"], **stats)
        changed = True
    else:  # run_one recorded the outcome; add the numbers it left out (e.g. how far a diverged run got)
        for key in SUMMARY_KEYS[1:]:
            if not getattr(record, key) and row[key]:
                setattr(record, key, row[key])
                changed = True
    if changed:
        try:
            write_run_record(point.run_dir, record)
        except OSError:
            pass  # the sweep table still has the outcome


def run_point(point: SweepPoint, run_one: RunOne, *, sweep_name: str, resume: bool = True,
              quiet: bool = False, raise_crashes: bool = False) -> dict[str, Any]:
    """Run one point (or skip it when ``resume`` and its ``run.json`` says finished/diverged); return its table row.

    A :class:`DivergedError` makes the row ``diverged``, another :class:`UserError` or any other exception
    ``failed``, each with its one-line message (an unexpected exception also prints its traceback unless
    ``quiet``). ``KeyboardInterrupt`` marks the run ``interrupted`` in its ``run.json`` and propagates.
    ``raise_crashes``: an unexpected exception is recorded as ``failed`` in ``run.json`` and then propagates, for a
    caller that retries crashes (Modal); a retry runs the point again, as a resumed sweep would.
    Safe to call in a worker process (a Modal container): the row is plain JSON-ready data.
    """
    say = (lambda *a: None) if quiet else print
    previous = _existing(point) if resume else None
    if previous is not None and previous.status in SKIP_STATUSES:
        say(f"skip {point.name}: already {previous.status} ({point.run_dir / RUN_FILE})")
        return _row_from_record(point, previous, resumed=True)
    started, t0, crash = utc_now(), time.time(), None
    try:
        summary = run_one(point.overrides, point.name, point.run_dir)
        if not isinstance(summary, dict) or summary.get("status") not in FINAL_STATUSES:
            raise TypeError(f"run_one must return a dict whose status is one of {', '.join(FINAL_STATUSES)}, "
                            f"got {summary!r}")
        row = _row(point, **{k: summary.get(k) for k in SUMMARY_KEYS}, error=summary.get("error"))
    except DivergedError as exc:
        row = _row(point, "diverged", error=one_line(exc))
    except UserError as exc:
        row = _row(point, "failed", error=one_line(exc))
    except KeyboardInterrupt:
        row = _row(point, "interrupted", error="interrupted (Ctrl-C)", elapsed_s=time.time() - t0)
        _settle_record(point, sweep_name, row, started)
        raise
    except Exception as exc:  # a crash in one run (a bug, a lost GPU) must not lose the rest of the sweep
        if not quiet and not raise_crashes:
            traceback.print_exc()
        row = _row(point, "failed", error=one_line(f"crash: {type(exc).__name__}: {exc}"))
        crash = exc
    if row["status"] != "finished":
        _fill_missing(row, point)
    if row["elapsed_s"] is None:
        row["elapsed_s"] = time.time() - t0
    _settle_record(point, sweep_name, row, started)
    if crash is not None and raise_crashes:
        raise crash
    return row


def run_sweep(axes: Axes, run_one: RunOne, out_dir: str | os.PathLike, *, name: str | None = None,
              plot: bool = True, validate: Callable[[list[str]], object] | None = None, resume: bool = True,
              quiet: bool = False) -> list[dict[str, Any]]:
    """Run every grid point of ``axes`` one after another with ``run_one(overrides, run_name, run_dir)``.

    ``run_one`` returns a summary dict with ``status`` (one of runs.FINAL_STATUSES), ``iterations``, ``tokens_seen``,
    ``elapsed_s``, ``final_val_loss``, ``best_val_loss`` and optionally ``error``; it may raise
    :class:`DivergedError` or :class:`UserError` (see :func:`run_point`). ``validate(overrides)``, when given, is
    called for every point before any run starts (e.g. ``load_config``), so a typo in the last value fails now,
    not hours later. ``name`` (default: the folder's name) is the sweep's name in each ``run.json`` (and the W&B
    group, which is ``run_one``'s business). Returns the table rows; writes sweep.json, sweep.csv and curves.png
    into ``out_dir`` and prints the table unless ``quiet``. Ctrl-C writes the table so far, then propagates.
    """
    out_dir = Path(out_dir)
    name = name or out_dir.resolve().name
    points = plan_sweep(axes, out_dir)
    if validate is not None:
        for point in points:
            try:
                validate(point.overrides)
            except UserError as exc:
                raise SweepError(f"sweep run {point.name}: {one_line(exc)}") from None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SweepError(f"cannot create the sweep folder {out_dir}: {exc.strerror or exc}: choose another one") from None
    say = (lambda *a: None) if quiet else print
    started = utc_now()
    rows = [_row(p, "pending") for p in points]
    say(f"Sweep {name}: {len(points)} run(s) over {', '.join(k for k, _ in axes)} -> {out_dir}/")
    try:
        for i, point in enumerate(points):
            say(f"\n[{i + 1}/{len(points)}] {point.name}  ({' '.join(point.overrides)})")
            try:
                rows[i] = run_point(point, run_one, sweep_name=name, resume=resume, quiet=quiet)
            except KeyboardInterrupt:
                rows[i] = _row(point, "interrupted", error="interrupted (Ctrl-C)")
                raise
            write_results(out_dir, rows, axes, name=name, started_at=started)
            if rows[i]["status"] != "finished":
                say(f"{point.name}: {rows[i]['status']}" + (f": {rows[i]['error']}" if rows[i]["error"] else ""))
    finally:  # also on Ctrl-C: the table of what finished
        finish_sweep(out_dir, rows, axes, name=name, plot=plot, started_at=started, quiet=quiet)
    return rows


# ----------------------------------------------------------------------------- results


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished run with the lowest best validation loss (any run with one when none finished)."""
    def score(r: dict[str, Any]) -> float:
        v = r.get("best_val_loss")
        return v if isinstance(v, (int, float)) and math.isfinite(v) else math.inf

    for pool in ([r for r in rows if r["status"] == "finished"], list(rows)):
        scored = [r for r in pool if score(r) < math.inf]
        if scored:
            return min(scored, key=score)
    return None


def sweep_table(rows: Sequence[dict[str, Any]], axes: Axes) -> str:
    """The printed table: swept values, final and best val loss, tokens, time, status; ``*`` marks the best run."""
    best = best_row(rows)
    short = _short_keys([k for k, _ in axes])
    headers = ["", *(short[k] for k, _ in axes), "status", "final val", "best val", "tokens", "time"]
    body = [["*" if r is best else "", *(r["values"].get(k, "") for k, _ in axes), r["status"],
             fmt_loss(r["final_val_loss"]), fmt_loss(r["best_val_loss"]), fmt_si(r["tokens_seen"]),
             fmt_duration(r["elapsed_s"])] for r in rows]
    right = [False] * (1 + len(axes)) + [False, True, True, True, True]
    lines = [format_table(headers, body, right)]
    if best is not None:
        lines.append(f"* best: {best['name']} (best val loss {fmt_loss(best['best_val_loss'])})")
    lines += [f"  {r['name']}: {r['status']}: {r['error']}" for r in rows if r["error"] and r["status"] != "finished"]
    return "\n".join(lines)


def _csv_text(rows: Sequence[dict[str, Any]], axes: Axes) -> str:
    best = best_row(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", *(k for k, _ in axes), "status", "final_val_loss", "best_val_loss", "tokens_seen",
                     "iterations", "elapsed_s", "best", "run_dir", "error"])
    for r in rows:
        cells = [r["final_val_loss"], r["best_val_loss"], r["tokens_seen"], r["iterations"], r["elapsed_s"]]
        cells = ["" if c is None or (isinstance(c, float) and not math.isfinite(c)) else c for c in cells]
        cells[-1] = round(cells[-1], 1) if isinstance(cells[-1], float) else cells[-1]
        writer.writerow([r["name"], *(r["values"].get(k, "") for k, _ in axes), r["status"], *cells,
                         int(r is best), r["run_dir"], r["error"] or ""])
    return buffer.getvalue()


def write_results(out_dir: str | os.PathLike, rows: Sequence[dict[str, Any]], axes: Axes, *, name: str,
                  started_at: str | None = None, command: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Write ``sweep.json`` and ``sweep.csv`` into ``out_dir`` atomically; returns their paths.

    ``command`` is the command line that launched the sweep (default ``sys.argv``; a Modal container passes the
    launch's).
    """
    out_dir = Path(out_dir)
    best = best_row(rows)
    data = {"name": name, "axes": [[k, list(v)] for k, v in axes], "started_at": started_at, "updated_at": utc_now(),
            "command": list(sys.argv if command is None else command), "best": best["name"] if best else None,
            "runs": list(rows)}
    paths = (out_dir / SWEEP_JSON, out_dir / SWEEP_CSV)
    for path, text in zip(paths, (to_json(data), _csv_text(rows, axes))):
        with atomic_output(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return paths


def finish_sweep(out_dir: str | os.PathLike, rows: Sequence[dict[str, Any]], axes: Axes, *, name: str,
                 plot: bool = True, started_at: str | None = None, quiet: bool = False,
                 command: Sequence[str] | None = None) -> dict[str, Path | None]:
    """Write sweep.json / sweep.csv, draw ``curves.png`` from the runs that logged metrics, print the table.

    A picture that cannot be drawn (no run got far enough to log) is noted, not raised: the table matters more.
    """
    from cs336_basics.plot import plot_runs

    say = (lambda *a: None) if quiet else print
    json_path, csv_path = write_results(out_dir, rows, axes, name=name, started_at=started_at, command=command)
    curves = None
    if plot:
        dirs = [Path(r["run_dir"]) for r in rows if (Path(r["run_dir"]) / METRICS_FILE).is_file()]
        try:
            if not dirs:
                raise UserError("no run wrote metrics.jsonl")
            curves = plot_runs(dirs, out=Path(out_dir) / CURVES)
        except UserError as exc:
            say(f"note: no curves drawn: {one_line(exc)}")
    say("\n" + sweep_table(rows, axes))
    say(f"Wrote {json_path}, {csv_path}" + (f", {curves}" if curves else ""))
    return {"json": json_path, "csv": csv_path, "curves": curves}
