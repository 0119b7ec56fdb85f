"""Sweeps with a fake run_one (no training): specs, grid, names, outcomes, table, json, csv, plot, resume."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from cs336_basics.common import DivergedError, UserError
from cs336_basics.runs import RunRecord, find_runs, read_run_record, write_run_record
from cs336_basics.sweep import (
    MAX_NAME,
    SweepError,
    best_row,
    grid,
    parse_sweep,
    plan_sweep,
    run_name,
    run_names,
    run_point,
    run_sweep,
)


def write_metrics(run_dir: Path, iters: int, start: float, end: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for it in range(10, iters + 1, 10):
        loss = start + (end - start) * it / iters
        lines.append({"type": "train", "iteration": it, "loss": loss, "tokens": it * 64, "elapsed_s": it * 0.1})
        if it % 50 == 0:
            lines.append({"type": "val", "iteration": it, "val_loss": loss + 0.05, "tokens": it * 64, "elapsed_s": it * 0.1})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


class FakeTrainer:
    """Stands in for the lead's run_one: writes metrics.jsonl and run.json like a training run would."""

    def __init__(self, diverge_above: float = 1e-2, fail_on: str | None = None, crash_on: str | None = None,
                 interrupt_on: str | None = None):
        self.calls: list[tuple[list[str], str, Path]] = []
        self.diverge_above, self.fail_on, self.crash_on, self.interrupt_on = diverge_above, fail_on, crash_on, interrupt_on

    def __call__(self, overrides: list[str], name: str, run_dir: Path) -> dict:
        self.calls.append((overrides, name, run_dir))
        values = dict(o.split("=", 1) for o in overrides)
        lr = float(values.get("training.max_lr", "1e-3"))
        record = RunRecord.start(name, {"training": {"max_lr": lr}}, checkpoint_dir=run_dir, device="cpu")
        write_run_record(run_dir, record)
        if self.interrupt_on and self.interrupt_on in name:
            raise KeyboardInterrupt
        if self.fail_on and self.fail_on in name:
            raise UserError("training.batch_size=3 does not divide over 2 processes")
        if self.crash_on and self.crash_on in name:
            raise RuntimeError("CUDA error: an illegal memory access")
        if lr > self.diverge_above:
            write_metrics(run_dir, 60, 9.0, 40.0)
            raise DivergedError("training loss became nan at iteration 40: the run diverged")
        final = 1.4 + abs(lr - 1e-3) * 100
        write_metrics(run_dir, 100, 9.0, final)
        summary = {"status": "finished", "iterations": 100, "tokens_seen": 6400, "elapsed_s": 10.0,
                   "final_val_loss": final + 0.05, "best_val_loss": final + 0.05}
        write_run_record(run_dir, record.finish("finished", **{k: v for k, v in summary.items() if k != "status"}))
        return summary


# ----------------------------------------------------------------------------- specs, grid and names


def test_parse_sweep_keeps_values_as_typed():
    axes = parse_sweep(["training.max_lr=1e-4, 3e-4,1e-3", "training.batch_size=32,64"])
    assert axes == [("training.max_lr", ["1e-4", "3e-4", "1e-3"]), ("training.batch_size", ["32", "64"])]
    assert parse_sweep(["training.betas=[0.9,0.95],[0.9,0.99]"]) == [("training.betas", ["[0.9,0.95]", "[0.9,0.99]"])]
    assert parse_sweep(["model.norm=rmsnorm"]) == [("model.norm", ["rmsnorm"])]


@pytest.mark.parametrize(
    "specs, overrides, match",
    [
        (["training.max_lr"], [], "must look like section.key=v1,v2"),
        (["max_lr=1e-3,1e-4"], [], "must look like section.key=v1,v2"),
        (["training.max_lr.x=1"], [], "must look like section.key=v1,v2"),
        (["training. max_lr=1"], [], "must look like section.key=v1,v2"),
        (["training.max_lr="], [], "empty value"),
        (["training.max_lr=1e-3,,3e-3"], [], "empty value"),
        (["training.max_lr=1e-3,"], [], "empty value"),
        (["training.max_lr=1e-3,0.001"], [], "same value twice (1e-3 and 0.001)"),
        (["training.max_lr=a,a"], [], "same value twice"),
        (["training.max_lr=1e-3", "training.max_lr=3e-3"], [], "given twice"),
        (["training.max_lr=1e-3,3e-3"], ["training.max_lr=1e-4"], "both swept"),
        ([], [], "no --sweep given"),
    ],
)
def test_bad_specs_are_one_clear_line(specs, overrides, match):
    with pytest.raises(SweepError, match=re.escape(match)) as info:
        parse_sweep(specs, overrides)
    assert "\n" not in str(info.value)


def test_grid_is_the_cartesian_product_in_order():
    points = grid([("a.x", ["1", "2"]), ("b.y", ["p", "q", "r"])])
    assert points == [{"a.x": "1", "b.y": "p"}, {"a.x": "1", "b.y": "q"}, {"a.x": "1", "b.y": "r"},
                      {"a.x": "2", "b.y": "p"}, {"a.x": "2", "b.y": "q"}, {"a.x": "2", "b.y": "r"}]


def test_run_names_are_readable_and_safe():
    assert run_name({"training.max_lr": "1e-3", "training.batch_size": "64"}) == "max_lr=1e-3_batch_size=64"
    assert run_name({"training.max_lr": "1e-3"}, prefix="lr sweep") == "lr-sweep_max_lr=1e-3"
    assert run_name({"training.seed": "a.x", "model.seed": "1"}) == "training.seed=a.x_model.seed=1"  # ambiguous keys
    for value in ["/data/owt", "../../etc", "a b\tc", "é", "[0.9,0.95]", "x/../..", "-1e-3", "*?<>|:\"'", ""]:
        name = run_name({"data.data_dir": value})
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._+=-]*", name), name
        assert Path(name).name == name and name not in (".", "..")  # one folder, inside the sweep's folder
    long = run_name({"data.data_dir": "x" * 500})
    assert len(long) == MAX_NAME and long != run_name({"data.data_dir": "x" * 499})


def test_run_names_are_unique_within_a_sweep():
    axes = parse_sweep(["training.betas=[0.9,0.95],(0.9,0.95),[0.9 0.95]", "model.norm=None,none,rmsnorm"])
    names = run_names(grid(axes))
    assert len({n.lower() for n in names}) == len(names) == 9  # unique even on case-insensitive file systems
    points = plan_sweep(parse_sweep(["training.max_lr=1e-3,3e-3"]), "out")
    assert [p.run_dir for p in points] == [Path("out/max_lr=1e-3"), Path("out/max_lr=3e-3")]
    assert points[1].overrides == ["training.max_lr=3e-3"]


# ----------------------------------------------------------------------------- a whole sweep


def test_two_runs_one_diverges(tmp_path, capsys):
    trainer = FakeTrainer()
    axes = parse_sweep(["training.max_lr=1e-3,1e-1"])
    rows = run_sweep(axes, trainer, tmp_path / "sweep", name="lr-test")
    assert [c[1] for c in trainer.calls] == ["max_lr=1e-3", "max_lr=1e-1"]
    assert trainer.calls[0][0] == ["training.max_lr=1e-3"] and trainer.calls[0][2] == tmp_path / "sweep" / "max_lr=1e-3"
    assert [r["status"] for r in rows] == ["finished", "diverged"]
    assert rows[1]["error"].startswith("training loss became nan")
    assert rows[0]["best_val_loss"] == pytest.approx(1.45) and rows[0]["tokens_seen"] == 6400

    out = capsys.readouterr().out
    table = out[out.rindex("status") :]  # the final table, after the per-run lines
    assert re.search(r"\*\s+1e-3\s+finished\s+1\.4500\s+1\.4500\s+6\.40k\s+10\.0 s", out)
    # the diverged row shows how far it got, from its metrics.jsonl (one val record, at iteration 50)
    assert rows[1]["iterations"] == 60 and rows[1]["tokens_seen"] == 60 * 64 and rows[1]["elapsed_s"] == 6.0
    assert rows[1]["best_val_loss"] == rows[1]["final_val_loss"] == pytest.approx(9 + 31 * 50 / 60 + 0.05)
    assert re.search(r"\n\s+1e-1\s+diverged\s+34\.8833\s+34\.8833\s+3.84k\s+6\.0 s", out)
    assert "* best: max_lr=1e-3 (best val loss 1.4500)" in out
    assert "\n  max_lr=1e-1: diverged: training loss became nan" in table

    sweep_dir = tmp_path / "sweep"
    data = json.loads((sweep_dir / "sweep.json").read_text())
    assert data["name"] == "lr-test" and data["best"] == "max_lr=1e-3"
    assert data["axes"] == [["training.max_lr", ["1e-3", "1e-1"]]]
    assert [r["status"] for r in data["runs"]] == ["finished", "diverged"]
    with open(sweep_dir / "sweep.csv", newline="") as f:
        table_rows = list(csv.DictReader(f))
    assert [r["training.max_lr"] for r in table_rows] == ["1e-3", "1e-1"]
    assert [r["status"] for r in table_rows] == ["finished", "diverged"]
    assert table_rows[0]["best"] == "1" and table_rows[1]["best"] == "0"
    assert float(table_rows[0]["best_val_loss"]) == pytest.approx(1.45)
    assert table_rows[1]["iterations"] == "60" and table_rows[1]["elapsed_s"] == "6.0"
    assert (sweep_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("max_lr=1e-3", "max_lr=1e-1"):
        assert (sweep_dir / name / "metrics.jsonl").is_file()

    # run.json of the diverged run was settled by the sweep: status, error, sweep values
    diverged = read_run_record(sweep_dir / "max_lr=1e-1")
    assert diverged.status == "diverged" and diverged.ended_at and "nan" in diverged.error
    assert diverged.iterations == 60 and diverged.best_val_loss == pytest.approx(34.8833, abs=1e-4)
    assert diverged.sweep == {"name": "lr-test", "values": {"training.max_lr": "1e-1"}}
    assert [r.status for _, r in find_runs(sweep_dir)] == ["finished", "diverged"]


def test_the_plot_holds_both_runs(tmp_path):
    from cs336_basics.plot import build_figure

    run_sweep(parse_sweep(["training.max_lr=1e-3,1e-1"]), FakeTrainer(), tmp_path, quiet=True)
    gids = sorted(line.get_gid() for line in build_figure([tmp_path / "max_lr=1e-3", tmp_path / "max_lr=1e-1"]).axes[0].lines)
    assert gids == ["train:max_lr=1e-1", "train:max_lr=1e-3", "val:max_lr=1e-1", "val:max_lr=1e-3"]


def test_failures_and_crashes_do_not_stop_the_sweep(tmp_path, capsys):
    trainer = FakeTrainer(fail_on="batch_size=3", crash_on="batch_size=5")
    rows = run_sweep(parse_sweep(["training.batch_size=3,4,5"]), trainer, tmp_path, plot=False)
    assert [r["status"] for r in rows] == ["failed", "finished", "failed"]
    assert rows[0]["error"] == "training.batch_size=3 does not divide over 2 processes"
    assert rows[2]["error"] == "crash: RuntimeError: CUDA error: an illegal memory access"
    captured = capsys.readouterr()
    assert "Traceback" in captured.err and "RuntimeError" in captured.err  # a crash shows where it came from
    assert not (tmp_path / "curves.png").exists()
    assert read_run_record(tmp_path / "batch_size=5").status == "failed"


def test_a_run_that_fails_before_writing_run_json_still_gets_one(tmp_path):
    def run_one(overrides, name, run_dir):
        raise UserError("data/train.bin not found")

    rows = run_sweep(parse_sweep(["training.max_lr=1e-3"]), run_one, tmp_path, quiet=True)
    assert rows[0]["status"] == "failed"
    record = read_run_record(tmp_path / "max_lr=1e-3")
    assert record.status == "failed" and record.error == "data/train.bin not found"
    assert record.sweep["values"] == {"training.max_lr": "1e-3"}
    assert json.loads((tmp_path / "sweep.json").read_text())["best"] is None


def test_ctrl_c_writes_the_table_of_what_finished(tmp_path):
    trainer = FakeTrainer(interrupt_on="max_lr=2e-3")
    with pytest.raises(KeyboardInterrupt):
        run_sweep(parse_sweep(["training.max_lr=1e-3,2e-3,3e-3"]), trainer, tmp_path, quiet=True)
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["status"] for r in data["runs"]] == ["finished", "interrupted", "pending"]
    assert read_run_record(tmp_path / "max_lr=2e-3").status == "interrupted"
    assert (tmp_path / "curves.png").is_file()
    assert len(trainer.calls) == 2

    # resume: the finished run is skipped, the interrupted and the pending ones run
    trainer = FakeTrainer()
    rows = run_sweep(parse_sweep(["training.max_lr=1e-3,2e-3,3e-3"]), trainer, tmp_path, quiet=True)
    assert [c[1] for c in trainer.calls] == ["max_lr=2e-3", "max_lr=3e-3"]
    assert [r["status"] for r in rows] == ["finished"] * 3
    assert [r["resumed"] for r in rows] == [True, False, False]
    assert rows[0]["best_val_loss"] == pytest.approx(1.45)  # taken from its run.json


def test_resume_skips_diverged_and_can_be_turned_off(tmp_path):
    axes = parse_sweep(["training.max_lr=1e-3,1e-1"])
    run_sweep(axes, FakeTrainer(), tmp_path, quiet=True)
    again = FakeTrainer()
    rows = run_sweep(axes, again, tmp_path, quiet=True)
    assert again.calls == [] and [r["status"] for r in rows] == ["finished", "diverged"]
    fresh = FakeTrainer()
    run_sweep(axes, fresh, tmp_path, quiet=True, resume=False)
    assert len(fresh.calls) == 2


def test_validate_checks_every_point_before_the_first_run(tmp_path):
    trainer = FakeTrainer()

    def validate(overrides):
        if overrides == ["training.max_lr=3e-3x"]:
            raise UserError("override 'training.max_lr=3e-3x': training.max_lr must be a number (e.g. 3e-4)")

    with pytest.raises(SweepError, match=r"sweep run max_lr=3e-3x: override .* must be a number"):
        run_sweep(parse_sweep(["training.max_lr=1e-3,3e-3x"]), trainer, tmp_path / "s", validate=validate)
    assert trainer.calls == [] and not (tmp_path / "s").exists()


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SweepError, match="cannot create the sweep folder"):
        run_sweep(parse_sweep(["training.max_lr=1e-3"]), FakeTrainer(), tmp_path / "f" / "sweep", quiet=True)


def test_run_point_rejects_a_bad_summary_as_a_failed_run(tmp_path):
    (point,) = plan_sweep(parse_sweep(["training.max_lr=1e-3"]), tmp_path)
    row = run_point(point, lambda *a: {"status": "ok"}, sweep_name="s", quiet=True)
    assert row["status"] == "failed" and "run_one must return" in row["error"]


def test_run_point_rows_are_json_ready(tmp_path):
    points = plan_sweep(parse_sweep(["training.max_lr=1e-3,1e-1"]), tmp_path)
    rows = [run_point(p, FakeTrainer(), sweep_name="s", quiet=True) for p in points]  # e.g. one per Modal container
    assert json.loads(json.dumps(rows)) == rows


def test_best_row_prefers_finished_runs():
    rows = [{"status": "diverged", "best_val_loss": 1.0}, {"status": "finished", "best_val_loss": 2.0},
            {"status": "finished", "best_val_loss": None}]
    assert best_row(rows) is rows[1]
    assert best_row(rows[:1]) is rows[0]
    assert best_row([{"status": "failed", "best_val_loss": None}]) is None


def test_an_existing_finished_record_is_trusted(tmp_path):
    (point,) = plan_sweep(parse_sweep(["training.max_lr=1e-3"]), tmp_path)
    write_run_record(point.run_dir, RunRecord(name=point.name, status="finished", best_val_loss=1.3, tokens_seen=5))
    row = run_point(point, FakeTrainer(), sweep_name="s", quiet=True)
    assert row["resumed"] and row["best_val_loss"] == 1.3 and row["tokens_seen"] == 5


def test_a_diverged_run_keeps_the_numbers_its_run_json_holds(tmp_path):
    (point,) = plan_sweep(parse_sweep(["training.max_lr=1e-1"]), tmp_path)

    def run_one(overrides, name, run_dir):  # the training loop recorded the divergence itself
        record = RunRecord.start(name, {}, checkpoint_dir=run_dir).finish(
            "diverged", error="loss 40.1 far above its start 9.2", iterations=700, tokens_seen=7000, best_val_loss=3.3)
        write_run_record(run_dir, record)
        raise DivergedError("training loss became 40.1 at iteration 700: the run diverged")

    row = run_point(point, run_one, sweep_name="s", quiet=True)
    assert (row["status"], row["iterations"], row["tokens_seen"], row["best_val_loss"]) == ("diverged", 700, 7000, 3.3)
    record = read_run_record(point.run_dir)
    assert record.error == "loss 40.1 far above its start 9.2" and record.sweep["name"] == "s"  # kept, sweep added


def test_numbers_missing_from_a_recorded_divergence_are_added(tmp_path):
    (point,) = plan_sweep(parse_sweep(["training.max_lr=1e-1"]), tmp_path)

    def run_one(overrides, name, run_dir):  # records the outcome but no numbers, like a loop that just re-raises
        write_metrics(run_dir, 60, 9.0, 40.0)
        write_run_record(run_dir, RunRecord.start(name, {}, checkpoint_dir=run_dir).finish("diverged", error="nan"))
        raise DivergedError("nan")

    run_point(point, run_one, sweep_name="s", quiet=True)
    record = read_run_record(point.run_dir)
    assert (record.status, record.error, record.iterations, record.tokens_seen) == ("diverged", "nan", 60, 3840)
