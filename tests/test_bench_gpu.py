"""benchmarks/bench_gpu.py runs end to end (the CPU smoke test): every row, MFU wiring, and a loss that falls."""

import json

import pytest

from bench_module import load_benchmark


def _load_bench():
    return load_benchmark("bench_gpu")


def test_smoke_run_measures_both_models_and_the_loss_falls(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "gpu.json"
    assert bench.main(["--smoke", "--steps", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"fp32", "bf16"}
    for mode in data["results"].values():
        for which in ("ours", "hf"):
            assert mode[which]["tokens_per_s"] > 0 and mode[which]["ms"] > 0
            assert mode[which]["mfu"] is None  # no datasheet peak for a CPU
    first, last = data["loss"]
    assert last < 0.8 * first
    text = capsys.readouterr().out
    assert "ours/HF" in text and "falls: ok" in text


def test_unknown_modes_are_rejected(capsys):
    with pytest.raises(SystemExit) as done:
        _load_bench().main(["--smoke", "--modes", "fp64"])
    assert done.value.code == 2 and "unknown --modes ['fp64']" in capsys.readouterr().err
