"""Learning curves from metrics.jsonl: one line per run and split, the right axes, clear errors."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from cs336_basics.common import EXIT_USER_ERROR, UserError
from cs336_basics.plot import build_figure, load_curves, main, plot_runs
from cs336_basics.runs import RunRecord, write_run_record

TOKENS_PER_ITER = 1024


def write_metrics(run_dir: Path, iters: int = 100, every: int = 10, val_every: int | None = 50, start: float = 9.0,
                  old_val_format: bool = False, tail: str = "", seconds_per_iter: float = 0.5) -> Path:
    """A metrics.jsonl like train.py's: train records every ``every``, val every ``val_every`` iterations."""
    run_dir.mkdir(parents=True, exist_ok=True)
    loss = lambda it: 1.5 + (start - 1.5) * np.exp(-it / 30)  # noqa: E731
    lines = [{"type": "train", "iteration": it, "loss": loss(it), "lr": 1e-3, "grad_norm": 1.0,
              "tokens": it * TOKENS_PER_ITER, "tokens_per_sec": 2048.0, "elapsed_s": it * seconds_per_iter}
             for it in range(every, iters + 1, every)]
    for it in range(val_every, iters + 1, val_every) if val_every else []:
        val = {"type": "val", "iteration": it, "val_loss": loss(it) + 0.1}
        if not old_val_format:
            val.update(tokens=it * TOKENS_PER_ITER, elapsed_s=it * seconds_per_iter)
        lines.append(val)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + tail)
    return path


def lines_by_gid(fig) -> dict[str, object]:
    (ax,) = fig.axes
    return {line.get_gid(): line for line in ax.lines}


def test_one_line_per_run_and_split(tmp_path):
    write_metrics(tmp_path / "a")
    write_metrics(tmp_path / "b", start=8.0)
    fig = build_figure([tmp_path / "a", tmp_path / "b"])
    lines = lines_by_gid(fig)
    assert sorted(lines) == ["train:a", "train:b", "val:a", "val:b"]
    assert len(fig.axes[0].lines) == 4
    assert list(lines["train:a"].get_xdata()) == list(range(10, 101, 10))
    assert list(lines["val:b"].get_xdata()) == [50, 100]
    # same colour per run, different between runs; train thinner and lighter than val
    assert lines["train:a"].get_color() == lines["val:a"].get_color() != lines["val:b"].get_color()
    assert lines["train:a"].get_linewidth() < lines["val:a"].get_linewidth()
    assert (lines["train:a"].get_alpha() or 1.0) < (lines["val:a"].get_alpha() or 1.0)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["train", "validation"]  # the style legend; the run legend is the other artist
    run_legends = [a for a in fig.axes[0].artists if hasattr(a, "get_texts")]
    assert [t.get_text().split()[0] for t in run_legends[0].get_texts()] == ["a", "b"]


@pytest.mark.parametrize("x, label, factor", [("steps", "iteration", 1), ("tokens", "tokens seen", TOKENS_PER_ITER),
                                              ("time", "wall-clock training time (seconds)", 0.5)])
def test_x_axis(tmp_path, x, label, factor):
    write_metrics(tmp_path / "a")
    fig = build_figure([tmp_path / "a"], x=x)
    assert fig.axes[0].get_xlabel() == label
    assert np.allclose(lines_by_gid(fig)["val:a"].get_xdata(), np.array([50, 100]) * factor)


def test_time_unit_follows_the_longest_run(tmp_path):
    write_metrics(tmp_path / "min", seconds_per_iter=30)  # 3000 s
    write_metrics(tmp_path / "h", seconds_per_iter=100)  # 10000 s
    assert build_figure([tmp_path / "min"], x="time").axes[0].get_xlabel().endswith("(minutes)")
    fig = build_figure([tmp_path / "min", tmp_path / "h"], x="time")
    assert fig.axes[0].get_xlabel().endswith("(hours)")
    assert np.allclose(lines_by_gid(fig)["val:h"].get_xdata(), [5000 / 3600, 10000 / 3600])


def test_run_without_val_records_has_only_a_train_line(tmp_path):
    write_metrics(tmp_path / "a", val_every=None)
    fig = build_figure([tmp_path / "a"])
    assert list(lines_by_gid(fig)) == ["train:a"]
    (run_legend,) = [a for a in fig.axes[0].artists if hasattr(a, "get_texts")]
    assert [t.get_text() for t in run_legend.get_texts()] == ["a"]
    (swatch,) = run_legend.get_lines()
    assert swatch.get_linewidth() > lines_by_gid(fig)["train:a"].get_linewidth() and swatch.get_alpha() is None


def test_legend_name_from_run_json(tmp_path):
    write_metrics(tmp_path / "folder")
    write_run_record(tmp_path / "folder", RunRecord(name="lr-1e-3"))
    fig = build_figure([tmp_path / "folder"])
    assert set(lines_by_gid(fig)) == {"train:lr-1e-3", "val:lr-1e-3"}
    assert lines_by_gid(fig)["val:lr-1e-3"].get_label().startswith("lr-1e-3  (best val ")
    (tmp_path / "folder" / "run.json").write_text("garbage")  # unreadable: the folder's name
    assert set(lines_by_gid(build_figure([tmp_path / "folder"]))) == {"train:folder", "val:folder"}


def test_legend_says_how_a_run_ended_unless_it_finished(tmp_path):
    for name, status, val_every in (("ok", "finished", 50), ("lr-big", "diverged", 50), ("slow", "out_of_time", None)):
        write_metrics(tmp_path / name, val_every=val_every)
        write_run_record(tmp_path / name, RunRecord(name=name, status=status))
    (ax,) = build_figure([tmp_path / n for n in ("ok", "lr-big", "slow")]).axes
    (run_legend,) = [a for a in ax.artists if hasattr(a, "get_texts")]
    labels = [t.get_text() for t in run_legend.get_texts()]
    assert labels[0].startswith("ok  (best val ") and labels[1].startswith("lr-big  (diverged, best val ")
    assert labels[2] == "slow  (out of time)"  # train records only


def test_old_val_records_get_interpolated_positions(tmp_path):
    write_metrics(tmp_path / "a", old_val_format=True, every=20, val_every=50, iters=110)
    notes: list[str] = []
    lines = lines_by_gid(build_figure([tmp_path / "a"], x="tokens", notes=notes))
    # iteration 50 lies between train records 40 and 60; 100 too; tokens are linear in iteration
    assert np.allclose(lines["val:a"].get_xdata(), [50 * TOKENS_PER_ITER, 100 * TOKENS_PER_ITER])
    assert notes == []


def test_old_val_record_past_the_last_train_record_is_left_out(tmp_path):
    path = write_metrics(tmp_path / "a", old_val_format=True)
    path.write_text(path.read_text() + json.dumps({"type": "val", "iteration": 150, "val_loss": 1.0}) + "\n")
    notes: list[str] = []
    lines = lines_by_gid(build_figure([tmp_path / "a"], x="time", notes=notes))
    assert np.allclose(lines["val:a"].get_xdata(), [25, 50])
    assert len(notes) == 1 and "past the last training record" in notes[0]
    assert list(lines_by_gid(build_figure([tmp_path / "a"]))["val:a"].get_xdata()) == [50, 100, 150]  # steps: all


def test_garbage_lines_are_skipped_and_counted(tmp_path):
    garbage = "\n".join(['{"type": "train", "iteration": "ten", "loss": 1}', '{"type": "train", "iteration": 5}',
                         '{"type": "train", "iteration": 7, "loss": "NaN"}', '{"type": "train", "iteration": -1, "loss": 1}',
                         '{"type": "train", "iteration": true, "loss": 1}', '[1, 2]', '{"type": "other", "x": 1}',
                         '{"type": "train", "iteration": 1' + "0" * 400 + ', "loss": 1}', "\x00\ufffd binary",
                         "", '{"type": "val", "iteration": 5, "val_loss": Infinity}', '{"type": "tr'])
    write_metrics(tmp_path / "a", tail=garbage)
    curves = load_curves(tmp_path / "a")
    assert len(curves.train) == 10 and len(curves.val) == 2
    assert curves.skipped_lines == 11  # every bad line but the empty one
    assert "skipped 11 unreadable line(s)" in curves.notes[0]


def test_repeated_iteration_keeps_the_last_record(tmp_path):
    path = write_metrics(tmp_path / "a")
    path.write_text(path.read_text() + json.dumps({"type": "train", "iteration": 50, "loss": 0.5}) + "\n")
    curves = load_curves(tmp_path / "a")
    assert curves.train.loss[curves.train.iteration == 50].tolist() == [0.5]
    assert np.all(np.diff(curves.train.iteration) > 0)


def test_diverged_run_cuts_the_linear_y_axis_only(tmp_path):
    write_metrics(tmp_path / "ok")
    path = write_metrics(tmp_path / "bad")
    path.write_text(path.read_text() + json.dumps({"type": "train", "iteration": 110, "loss": 500.0}) + "\n")
    notes: list[str] = []
    fig = build_figure([tmp_path / "ok", tmp_path / "bad"], notes=notes)
    bottom, top = fig.axes[0].get_ylim()
    assert top < 12 and bottom < 1.6 and any("cut" in n for n in notes)
    fig = build_figure([tmp_path / "ok", tmp_path / "bad"], log_y=True)
    assert fig.axes[0].get_yscale() == "log" and fig.axes[0].get_ylim()[1] > 500


def test_plot_runs_writes_a_png_atomically(tmp_path):
    write_metrics(tmp_path / "a")
    write_metrics(tmp_path / "b", val_every=None)
    out = plot_runs([tmp_path / "a", tmp_path / "b"], x="tokens", log_y=True, out=tmp_path / "pics" / "c.png")
    assert out == tmp_path / "pics" / "c.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 800 and height > 500
    assert [p.name for p in out.parent.iterdir()] == ["c.png"]
    svg = plot_runs([tmp_path / "a"], out=tmp_path / "c.svg")
    assert svg.read_text().lstrip().startswith("<?xml")


def test_cli_default_out_is_the_current_folder(tmp_path, monkeypatch, capsys):
    write_metrics(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    assert main(["a", "--x", "time"]) == 0
    assert (tmp_path / "curves.png").is_file()
    assert "wrote curves.png" in capsys.readouterr().out


def test_cli_accepts_the_metrics_file_itself(tmp_path, capsys):
    path = write_metrics(tmp_path / "a")
    assert main([str(path), "--out", str(tmp_path / "x.png")]) == 0


@pytest.mark.parametrize(
    "setup, args, match",
    [
        (lambda d: (d / "empty").mkdir(), ["empty"], "holds no metrics.jsonl"),
        (lambda d: None, ["missing"], "not found"),
        (lambda d: write_metrics(d / "a"), ["a", "--out", "curves"], "no file extension"),
        (lambda d: write_metrics(d / "a"), ["a", "--out", "curves.jpgg"], "unknown image type"),
        (lambda d: (write_metrics(d / "a"), (d / "o.png").mkdir()), ["a", "--out", "o.png"], "is a folder"),
        (lambda d: (d / "z").mkdir() or (d / "z" / "metrics.jsonl").write_text("garbage\n"), ["z"], "nothing to plot"),
    ],
)
def test_cli_user_errors(tmp_path, monkeypatch, capsys, setup, args, match):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    assert main(args) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_out_below_a_file(tmp_path, capsys):
    write_metrics(tmp_path / "a")
    (tmp_path / "file").write_text("x")
    assert main([str(tmp_path / "a"), "--out", str(tmp_path / "file" / "c.png")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "choose another --out" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_cli_unwritable_out(tmp_path, capsys):
    write_metrics(tmp_path / "a")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main([str(tmp_path / "a"), "--out", str(locked / "c.png")]) == EXIT_USER_ERROR
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err
    assert "cannot write" in err and "choose another --out" in err


def test_argparse_rejects_an_unknown_axis(tmp_path):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), "--x", "epochs"])
    assert info.value.code == 2
    with pytest.raises(UserError, match="use one of"):
        build_figure([tmp_path], x="epochs")


def test_a_run_that_blows_up_at_once_does_not_set_the_scale(tmp_path):
    write_metrics(tmp_path / "a", start=9.0)
    write_metrics(tmp_path / "b", start=8.5)
    bad = write_metrics(tmp_path / "c", val_every=None, iters=20)
    bad.write_text("".join(json.dumps({"type": "train", "iteration": it, "loss": 14.0 + it}) + "\n" for it in (10, 20, 30)))
    lines = lines_by_gid(build_figure([tmp_path / "a", tmp_path / "b", tmp_path / "c"]))
    healthy_start = max(lines["train:a"].get_ydata()[0], lines["train:b"].get_ydata()[0])
    top = lines["train:a"].axes.get_ylim()[1]
    assert healthy_start < top < 1.2 * healthy_start < 14  # the healthy runs fill the picture
