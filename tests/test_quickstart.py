"""The README's first-run command works end to end (tiny settings so it stays quick)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from fixtures import PROJECT_ROOT


def test_quickstart_runs_the_whole_pipeline(tmp_path: Path) -> None:
    work = tmp_path / "qs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-m", "cs336_basics.quickstart", "--workdir", str(work), "--train-stories", "400",
         "--val-stories", "40", "--vocab-size", "400", "--max-iters", "40", "--prompt", "Once upon a time"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    # Each workflow step is shown as the user would type it, then run.
    assert "$ uv run python prepare_data.py --train-path" in out
    assert "$ uv run python cs336_basics/train.py model.vocab_size=400" in out
    assert "$ uv run python cs336_basics/generate.py --checkpoint" in out
    assert "✓ Quickstart finished" in out
    for path in ["tokenizer/vocab.pkl", "tokenizer/merges.pkl", "data/train.bin", "data/val.bin",
                 "data/train.bin.json", "checkpoints/checkpoint_final.pt"]:
        assert (work / path).is_file(), path
    # The model learned something: training loss fell well below a uniform guess over the vocab (ln 400 = 5.99).
    records = [json.loads(line) for line in (work / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["type"] == "train"]
    assert train[-1] < train[0] and train[-1] < 5.0
    # The sample is printed after the prompt.
    assert "Once upon a time" in out.split("cs336_basics/generate.py", 1)[1]
