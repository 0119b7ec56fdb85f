"""Learning curves as pictures, from ``metrics.jsonl`` alone (no W&B needed).

    uv run python -m cs336_basics.plot RUN_DIR [RUN_DIR ...] [--x steps|tokens|time] [--log-y] [--out curves.png]

Draws the training loss (thin, light) and validation loss (thick, with dots) of every run given, one colour per run,
the legend naming each run (``run.json``'s ``name``, else the folder name) with its best validation loss. The picture
goes to ``--out`` (default ``curves.png`` in the current folder; ``.png``, ``.pdf`` or ``.svg``), written atomically.

``metrics.jsonl`` lines that cannot be read (a line cut short by a crash) are skipped. Validation records of older
files carry no ``tokens`` / ``elapsed_s``: their position on those axes is interpolated from the training records
(both start at 0 at iteration 0); a validation point past the last training record is left out of those axes with a
note. When a loss climbs far above the runs' typical (median) starting loss (a diverged run in a sweep), the y axis is
cut just above it so the other curves stay readable; ``--log-y`` shows everything.

Sweeps call :func:`plot_runs`; tests inspect the figure :func:`build_figure` returns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter, ScalarFormatter

from cs336_basics.common import UserError, one_line, run_command
from cs336_basics.fileio import atomic_output
from cs336_basics.runs import METRICS_FILE, RUN_FILE, RunRecordError, read_run_record

X_AXES = ("steps", "tokens", "time")
CLIP_FACTOR = 1.5  # a loss this far above the median starting loss gets the y axis cut (linear axis only)


@dataclass
class Split:
    """One split's points of one run: ``x[axis]`` holds the positions (NaN where unknown), ``loss`` the values."""

    iteration: np.ndarray
    tokens: np.ndarray
    elapsed_s: np.ndarray
    loss: np.ndarray

    def __len__(self) -> int:
        return len(self.loss)

    def along(self, axis: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, loss) for ``axis`` (steps, tokens or time in seconds), dropping points whose x is unknown."""
        x = {"steps": self.iteration, "tokens": self.tokens, "time": self.elapsed_s}[axis]
        keep = np.isfinite(x)
        return x[keep], self.loss[keep]


@dataclass
class RunCurves:
    """What a run's ``metrics.jsonl`` holds, ready to plot."""

    name: str
    status: str | None  # run.json's (finished, diverged, out of time, ...), None without one
    run_dir: Path
    train: Split
    val: Split
    skipped_lines: int = 0
    notes: list[str] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)  # x axis -> validation points without a position


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _split(points: dict[int, tuple[float | None, float | None, float]]) -> Split:
    its = sorted(points)
    col = lambda i: np.array([np.nan if points[it][i] is None else points[it][i] for it in its], dtype=float)  # noqa: E731
    return Split(np.array(its, dtype=float), col(0), col(1), col(2))


def metrics_path(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/metrics.jsonl`` (a path to the file itself is accepted too); one clear error when missing."""
    path = Path(run_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{path} not found: pass a run folder (the data.checkpoint_dir of a training run)")
    if not (path / METRICS_FILE).is_file():
        raise UserError(f"{path}/ holds no {METRICS_FILE}: pass the data.checkpoint_dir of a training run "
                        "(the folder where its checkpoints and metrics.jsonl are written)")
    return path / METRICS_FILE


def run_name_and_status(run_dir: Path) -> tuple[str, str | None]:
    """``run.json``'s name and status when it is readable, else the folder's name and no status."""
    try:
        record = read_run_record(run_dir / RUN_FILE)
    except RunRecordError:
        return run_dir.resolve().name, None
    return record.name, record.status


def load_curves(run_dir: str | os.PathLike) -> RunCurves:
    """Read a run's ``metrics.jsonl``: train and val points by iteration (the last record of an iteration wins)."""
    path = metrics_path(run_dir)
    folder = path.parent
    train: dict[int, tuple[float | None, float | None, float]] = {}
    val: dict[int, tuple[float | None, float | None, float]] = {}
    skipped = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    skipped += 1
                    continue
                kind = record.get("type") if isinstance(record, dict) else None
                target, key = {"train": (train, "loss"), "val": (val, "val_loss")}.get(kind, (None, None))
                it = record.get("iteration") if target is not None else None
                loss = _number(record.get(key)) if target is not None else None
                if not isinstance(it, int) or isinstance(it, bool) or not 0 <= it < 2**53 or loss is None:
                    skipped += 1
                    continue
                target[it] = (_number(record.get("tokens")), _number(record.get("elapsed_s")), loss)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {one_line(exc)}") from None
    curves = RunCurves(*run_name_and_status(folder), folder, _split(train), _split(val), skipped)
    if skipped:
        curves.notes.append(f"{curves.name}: skipped {skipped} unreadable line(s) of {path}")
    _fill_from_train(curves)
    return curves


def _fill_from_train(curves: RunCurves) -> None:
    """Give validation points without tokens / elapsed_s the values interpolated from the training records."""
    train, val = curves.train, curves.val
    for column in ("tokens", "elapsed_s"):
        missing = ~np.isfinite(getattr(val, column))
        if not missing.any():
            continue
        known = np.isfinite(getattr(train, column))
        its = np.concatenate([[0.0], train.iteration[known]])
        values = np.concatenate([[0.0], getattr(train, column)[known]])
        inside = missing & (val.iteration <= its[-1])
        getattr(val, column)[inside] = np.interp(val.iteration[inside], its, values)
        curves.left_out["tokens" if column == "tokens" else "time"] = int((missing & ~inside).sum())


# ----------------------------------------------------------------------------- drawing


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds <= 120:
        return 1.0, "seconds"
    if seconds <= 2 * 3600:
        return 60.0, "minutes"
    return 3600.0, "hours"


def _short_count(value: float, _pos: object = None) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def _unique_names(runs: list[RunCurves]) -> list[str]:
    names = [r.name for r in runs]
    return [f"{n} ({r.run_dir})" if names.count(n) > 1 else n for n, r in zip(names, runs)]


def build_figure(run_dirs: Sequence[str | os.PathLike], x: str = "steps", log_y: bool = False,
                 notes: list[str] | None = None) -> Figure:
    """The loss figure of ``run_dirs`` (not saved): per run a train line (gid ``train:NAME``) and, when the run
    has validation records, a val line (gid ``val:NAME``), in the run's colour. Notes (skipped lines, points left
    out, a cut y axis) are appended to ``notes``. Raises :class:`UserError` when nothing can be drawn."""
    if x not in X_AXES:
        raise UserError(f"--x {x!r}: use one of {', '.join(X_AXES)}")
    if not run_dirs:
        raise UserError("no run folders given: pass at least one RUN_DIR")
    runs = [load_curves(d) for d in run_dirs]
    notes = notes if notes is not None else []
    for r in runs:
        notes.extend(r.notes)
        if r.left_out.get(x):
            notes.append(f"{r.name}: {r.left_out[x]} validation point(s) without {'tokens' if x == 'tokens' else 'elapsed_s'} "
                         f"lie past the last training record: left out of the {x} axis")

    scale, unit = 1.0, ""
    if x == "time":
        longest = max((float(s.along("time")[0].max()) for r in runs for s in (r.train, r.val) if len(s.along("time")[0])),
                      default=0.0)
        scale, unit = _time_unit(longest)
    label = {"steps": "iteration", "tokens": "tokens seen", "time": f"wall-clock training time ({unit})"}[x]

    many = len(runs) > 8
    fig = Figure(figsize=(11.5 if many else 9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    colors = colormaps["tab10" if len(runs) <= 10 else "tab20"].colors
    starts, highest = [], -math.inf
    for i, (r, name) in enumerate(zip(runs, _unique_names(runs))):
        color = colors[i % len(colors)]
        tx, ty = r.train.along(x)
        vx, vy = r.val.along(x)
        if not len(tx) and not len(vx):
            notes.append(f"{r.name}: no {'points' if not len(r.train) + len(r.val) else x + ' values'} "
                         f"in {r.run_dir / METRICS_FILE}: nothing drawn")
            continue
        ended = f"{r.status.replace('_', ' ')}, " if r.status not in (None, "finished", "running") else ""
        legend = name + (f"  ({ended}best val {vy.min():.3f})" if len(vy) else f"  ({ended[:-2]})" if ended else "")
        if len(tx):
            (line,) = ax.plot(tx / scale, ty, color=color, lw=1.0, alpha=0.45, zorder=2,
                              label=legend if not len(vx) else f"_{name} train")
            line.set_gid(f"train:{r.name}")
        if len(vx):
            (line,) = ax.plot(vx / scale, vy, color=color, lw=2.2, marker="o", ms=3.5, zorder=3, label=legend)
            line.set_gid(f"val:{r.name}")
        first = ty[0] if len(ty) else vy[0]
        starts.append(first)
        highest = max(highest, float(np.concatenate([ty, vy]).max()))
    if not ax.lines:
        raise UserError(f"nothing to plot against {x}: the runs' {METRICS_FILE} files hold no usable records")

    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _p: f"{v:g}" if str(f"{v:g}")[0] in "1235" else ""))
    elif highest > CLIP_FACTOR * float(np.median(starts)):  # median: a run that blew up at once starts high too
        top, low = 1.1 * float(np.median(starts)), min(float(line.get_ydata().min()) for line in ax.lines)
        ax.set_ylim(low - 0.05 * (top - low), top)
        ax.set_title(f"y axis cut at {top:.2f}: a loss rose to {highest:.3g} (--log-y shows all)",
                     loc="right", fontsize=8, color="0.35")
        notes.append(f"the y axis is cut at {top:.2f}: a run's loss rose to {highest:.3g} (diverged?); "
                     "--log-y shows everything")
    if x == "tokens":
        ax.xaxis.set_major_formatter(FuncFormatter(_short_count))
    elif x == "steps":
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:,.0f}"))
    ax.set_xlabel(label)
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.set_title(runs[0].name if len(runs) == 1 else f"{len(runs)} runs", loc="left", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    if x != "time":
        ax.set_xlim(left=0)

    # one full-strength swatch per run (a train-only run's own line is faint), the styles explained apart
    handles = [Line2D([], [], color=line.get_color(), lw=2.2, marker="o" if line.get_gid().startswith("val:") else None,
                      ms=3.5, label=line.get_label()) for line in ax.lines if not line.get_label().startswith("_")]
    run_legend = ax.legend(handles=handles, loc="upper left" if many else "upper right", fontsize=8, framealpha=0.9,
                           bbox_to_anchor=(1.01, 1.0) if many else None, title="run", title_fontsize=8)
    style = [Line2D([], [], color="0.3", lw=1.0, alpha=0.45, label="train"),
             Line2D([], [], color="0.3", lw=2.2, marker="o", ms=3.5, label="validation")]
    ax.add_artist(run_legend)
    ax.legend(handles=style, loc="lower left", fontsize=8, framealpha=0.9)
    if not log_y:
        ax.yaxis.set_minor_formatter(NullFormatter())
    return fig


def save_figure(fig: Figure, out: str | os.PathLike) -> Path:
    """Write ``fig`` atomically; the format comes from the extension of ``out`` (.png, .pdf, .svg, ...)."""
    out = Path(out)
    kinds = fig.canvas.get_supported_filetypes()
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in kinds:
        raise UserError(f"--out {out}: {'unknown image type .' + fmt if fmt else 'no file extension'}; "
                        "use e.g. curves.png, curves.pdf or curves.svg")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give a file name, e.g. {out / 'curves.png'}")
    try:
        with atomic_output(out) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150)
    except UserError:
        raise
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or one_line(exc)}: choose another --out") from None
    return out


def plot_runs(run_dirs: Sequence[str | os.PathLike], x: str = "steps", log_y: bool = False,
              out: str | os.PathLike = "curves.png", notes: list[str] | None = None) -> Path:
    """Draw the loss curves of ``run_dirs`` (see :func:`build_figure`) into ``out``; returns ``out``."""
    return save_figure(build_figure(run_dirs, x=x, log_y=log_y, notes=notes), out)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cs336_basics.plot",
                                     description="Plot training and validation loss of runs from their metrics.jsonl.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (each holding metrics.jsonl)")
    parser.add_argument("--x", choices=X_AXES, default="steps",
                        help="x axis: iterations, tokens seen, or wall-clock training time (default steps)")
    parser.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    parser.add_argument("--out", default="curves.png", help="image to write (default curves.png in the current folder)")
    return parser


def run(args: argparse.Namespace) -> None:
    """Draw the curves of the runs given."""
    notes: list[str] = []
    out = plot_runs(args.run_dirs, x=args.x, log_y=args.log_y, out=args.out, notes=notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out} ({len(args.run_dirs)} run(s), x = {args.x})")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see cs336_basics.common)."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
