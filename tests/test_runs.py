"""run.json: one definition, strict JSON, clear errors for garbage, a listing command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cs336_basics.common import EXIT_USER_ERROR, UserError
from cs336_basics.runs import RunRecord, RunRecordError, find_runs, git_state, main, read_run_record, write_run_record
from cs336_basics.common import fmt_duration, fmt_si, format_table


def record(name: str = "r1", started: str = "2026-01-02T03:04:05+00:00", **kw) -> RunRecord:
    base = dict(name=name, config={"model": {"d_model": 64}, "training": {"max_lr": 1e-3}}, command=["train.py"],
                started_at=started, device="cpu", checkpoint_dir=f"checkpoints/{name}")
    return RunRecord(**{**base, **kw})


def test_round_trip_keeps_every_field(tmp_path):
    r = record(gpu="NVIDIA H100", world_size=2, tokens_seen=327_680_000, iterations=10_000, elapsed_s=1234.5,
               final_val_loss=1.41, best_val_loss=1.40, final_train_loss=1.39, git={"commit": "abc", "dirty": True},
               sweep={"name": "lr", "values": {"training.max_lr": "1e-3"}})
    r.finish("finished")
    path = write_run_record(tmp_path, r)
    assert path == tmp_path / "run.json"
    assert read_run_record(tmp_path) == r
    assert read_run_record(path) == r
    assert not list(tmp_path.glob(".*tmp"))  # atomic: no temporary left behind


def test_start_and_finish(tmp_path):
    r = RunRecord.start("x", {"a": 1}, checkpoint_dir=tmp_path, device="cpu", command=["train.py", "--wandb"])
    assert r.status == "running" and r.ended_at is None and r.started_at.endswith("+00:00")
    assert r.command == ["train.py", "--wandb"] and r.checkpoint_dir == str(tmp_path)
    assert set(r.git) == {"commit", "dirty"}
    r.finish("diverged", error=RuntimeError("loss became nan\nat iteration 5"), iterations=5, final_train_loss=math.nan)
    assert r.status == "diverged" and r.ended_at is not None and r.iterations == 5
    assert r.error == "loss became nan at iteration 5"  # one line
    with pytest.raises(ValueError, match="status"):
        r.finish("running")
    with pytest.raises(TypeError, match="no field"):
        r.finish("finished", tokens=3)


def test_non_finite_floats_are_written_as_null(tmp_path):
    r = record(final_train_loss=math.nan, best_val_loss=math.inf, config={"x": [math.nan]})
    text = write_run_record(tmp_path, r).read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    back = read_run_record(tmp_path)
    assert back.final_train_loss is None and back.best_val_loss is None and back.config == {"x": [None]}


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "not valid JSON"),
        ('{"name": "a", "status": "finished"', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"status": "finished"}', 'missing or empty "name"'),
        ('{"name": "a", "status": "done"}', '"status" must be one of'),
        ('{"name": "a", "status": "finished", "tokens_seen": "many"}', '"tokens_seen" must be int'),
        ('{"name": "a", "status": "finished", "tokens_seen": 1.5}', '"tokens_seen" must be int'),
        ('{"name": "a", "status": "finished", "best_val_loss": true}', '"best_val_loss" must be float or null'),
        ('{"name": "a", "status": "finished", "command": [1, 2]}', '"command" must be a list of strings'),
        ('{"name": "a", "status": "finished", "config": null}', '"config" must be dict'),
    ],
)
def test_garbage_run_json_is_one_clear_error(tmp_path, text, match):
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(RunRecordError, match=match) as info:
        read_run_record(tmp_path)
    assert str(tmp_path / "run.json") in str(info.value) and "\n" not in str(info.value)


def test_lenient_numbers_and_unknown_keys(tmp_path):
    (tmp_path / "run.json").write_text('{"name": "a", "status": "finished", "tokens_seen": 3.2e8, '
                                       '"elapsed_s": 12, "added_later": {"x": 1}}')
    r = read_run_record(tmp_path)
    assert r.tokens_seen == 320_000_000 and isinstance(r.tokens_seen, int)
    assert r.elapsed_s == 12.0 and isinstance(r.elapsed_s, float)


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(RunRecordError, match="not found"):
        read_run_record(tmp_path)
    (tmp_path / "run.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(RunRecordError, match="cannot read"):
        read_run_record(tmp_path)


def test_find_runs_recursive_sorted_by_start_skipping_garbage(tmp_path):
    write_run_record(tmp_path / "sweep" / "b", record("b", "2026-01-03T00:00:00+00:00"))
    write_run_record(tmp_path / "a", record("a", "2026-01-05T00:00:00+00:00"))
    write_run_record(tmp_path / "sweep" / "c", record("c", "2026-01-01T00:00:00+00:00"))
    write_run_record(tmp_path / "d", record("d", None))  # unknown start: last
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{")
    problems: list[str] = []
    found = find_runs(tmp_path, problems)
    assert [r.name for _, r in found] == ["c", "b", "a", "d"]
    assert found[0][0] == tmp_path / "sweep" / "c" / "run.json"
    assert len(problems) == 1 and "broken" in problems[0]
    assert [r.name for _, r in find_runs(tmp_path / "a" / "run.json")] == ["a"]
    with pytest.raises(UserError, match="not found"):
        find_runs(tmp_path / "nope")


def test_git_state_in_a_checkout(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert git_state(tmp_path) == {"commit": None, "dirty": None}  # no commit yet
    (tmp_path / "f.txt").write_text("1")
    env = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "-C", str(tmp_path), "add", "f.txt"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), *env, "commit", "-qm", "x"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "untracked.bin").write_text("outputs do not count")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "f.txt").write_text("2")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}


def test_git_state_never_raises(tmp_path, monkeypatch):
    assert git_state(tmp_path / "not-a-repo") == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable at all
    assert git_state() == {"commit": None, "dirty": None}


def test_cli_table(tmp_path, capsys):
    write_run_record(tmp_path / "a", record("lr3e-4", tokens_seen=327_680_000, iterations=10_000, best_val_loss=1.4321,
                                            final_val_loss=1.44, elapsed_s=5400, gpu="H100", device="cuda:0",
                                            status="finished"))
    write_run_record(tmp_path / "b", record("lr1e-2", "2026-01-03T00:00:00+00:00", status="diverged", iterations=300))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["name", "status", "iters", "tokens"]
    assert out[2].split()[:6] == ["lr3e-4", "finished", "10,000", "328M", "1.4321", "1.4400"]
    assert "1 h 30 min" in out[2] and "cuda:0 (H100)" in out[2] and "2026-01-02 03:04" in out[2]
    assert out[3].split()[:3] == ["lr1e-2", "diverged", "300"]


def test_cli_json(tmp_path, capsys):
    write_run_record(tmp_path / "a", record("a", final_val_loss=math.nan))
    assert main([str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["name"] == "a" and data[0]["path"] == str(tmp_path / "a" / "run.json")
    assert data[0]["final_val_loss"] is None


def test_cli_empty_missing_and_garbage(tmp_path, capsys):
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "No runs found" in out and "train.py" in out
    assert main([str(tmp_path / "nope")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not found" in err and "Traceback" not in err
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "run.json").write_text("garbage")
    write_run_record(tmp_path / "y", record("good"))
    assert main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "good" in captured.out and "warning: skipped" in captured.err and "not valid JSON" in captured.err


def test_module_runs_as_a_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cs336_basics.runs", str(tmp_path)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent, timeout=60)
    assert proc.returncode == 0 and "No runs found" in proc.stdout


def test_formatting_helpers():
    assert fmt_duration(183_600) == "2 d 3 h"
    assert fmt_duration(4_000) == "1 h 6 min"
    assert fmt_duration(75) == "1 min 15 s"
    assert fmt_duration(5.25) == "5.2 s" or fmt_duration(5.25) == "5.3 s"
    assert fmt_duration(None) == "-" and fmt_duration(math.inf) == "-"
    assert fmt_si(327_680_000) == "328M" and fmt_si(999) == "999" and fmt_si(None) == "-"
    assert fmt_si(5.92e17, "FLOP") == "592 PFLOP" and fmt_si(1_234_567) == "1.23M"
    assert format_table(["a", "bb"], [["xyz", 1]], right=[False, True]).splitlines() == ["a    bb", "---  --", "xyz   1"]
