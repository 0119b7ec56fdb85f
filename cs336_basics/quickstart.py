"""One command, raw text to a trained model, on a CPU with nothing downloaded.

    uv run python -m cs336_basics.quickstart

Writes a built-in corpus of short stories (cs336_basics/stories.py), then runs the real workflow commands on it,
printing each one as you would type it: train a BPE tokenizer and tokenize the corpus (prepare_data.py), train a small
Transformer LM for a couple of minutes (cs336_basics/train.py), and generate a sample (cs336_basics/generate.py).
Everything goes under --workdir (default runs/quickstart), so the project's data/ and checkpoints/ stay untouched.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cs336_basics.stories import write_corpus

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# A model that learns the stories' structure in about two minutes on a laptop CPU.
MODEL_OVERRIDES = [
    "model.d_model=128",
    "model.num_heads=4",
    "model.num_layers=3",
    "model.d_ff=384",
    "model.context_length=128",
    "training.batch_size=16",
    "training.max_lr=2e-3",
    "training.min_lr=2e-4",
    "training.eval_batches=8",
]


def _run(args: list[str], shown: str) -> None:
    """Run one workflow step as a subprocess, echoing the command a user would type; stop on failure."""
    print(f"\n$ {shown}", flush=True)
    result = subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT)
    if result.returncode != 0:
        print(f"error: step failed (exit code {result.returncode}): {shown}", file=sys.stderr)
        raise SystemExit(result.returncode)


def _show(script: str, args: list[str]) -> str:
    return "uv run python " + " ".join(shlex.quote(a) for a in [script, *args])


def _read_metrics(checkpoint_dir: Path) -> list[dict]:
    path = checkpoint_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/quickstart", help="where corpus, tokenizer, data and checkpoints go")
    parser.add_argument("--train-stories", type=int, default=6000, help="stories in the training corpus (~0.56 KB each)")
    parser.add_argument("--val-stories", type=int, default=300)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--max-iters", type=int, default=1000, help="training steps (about 2 minutes on 2 CPU cores)")
    parser.add_argument("--prompt", default="Once upon a time")
    args = parser.parse_args(argv)

    work = (PROJECT_ROOT / args.workdir).resolve() if not Path(args.workdir).is_absolute() else Path(args.workdir)
    rel = lambda p: str(p.relative_to(PROJECT_ROOT)) if p.is_relative_to(PROJECT_ROOT) else str(p)  # noqa: E731
    corpus, data, tokenizer, checkpoints = work / "corpus", work / "data", work / "tokenizer", work / "checkpoints"
    start = time.time()

    print("=" * 80 + "\nQuickstart: built-in stories -> tokenizer -> .bin -> trained model -> sample\n" + "=" * 80)
    corpus.mkdir(parents=True, exist_ok=True)
    train_txt = write_corpus(corpus / "stories-train.txt", args.train_stories, seed=0)
    val_txt = write_corpus(corpus / "stories-valid.txt", args.val_stories, seed=1)
    print(f"Wrote {rel(train_txt)} ({train_txt.stat().st_size / 1e6:.2f} MB) and {rel(val_txt)}")

    prep = ["--train-path", rel(train_txt), "--val-path", rel(val_txt), "--vocab-size", str(args.vocab_size),
            "--output-dir", rel(data), "--tokenizer-dir", rel(tokenizer)]
    _run(["prepare_data.py", *prep], _show("prepare_data.py", prep))

    iters = args.max_iters
    train = [f"model.vocab_size={args.vocab_size}", *MODEL_OVERRIDES, f"training.max_iters={iters}",
             f"training.warmup_iters={max(1, iters // 30)}", f"training.log_interval={max(1, iters // 20)}",
             f"training.eval_interval={max(1, iters // 4)}", f"training.checkpoint_interval={max(1, iters // 2)}",
             f"data.data_dir={rel(data)}",
             f"data.checkpoint_dir={rel(checkpoints)}", f"data.tokenizer_dir={rel(tokenizer)}"]
    _run(["cs336_basics/train.py", *train], _show("cs336_basics/train.py", train))

    gen = ["--checkpoint", rel(checkpoints / "checkpoint_final.pt"), "--tokenizer-dir", rel(tokenizer),
           "--prompt", args.prompt, "--max-new-tokens", "200", "--seed", "0"]
    _run(["cs336_basics/generate.py", *gen], _show("cs336_basics/generate.py", gen))

    records = _read_metrics(checkpoints)
    train_losses = [(r["iteration"], r["loss"]) for r in records if r.get("type") == "train"]
    val_losses = [r["val_loss"] for r in records if r.get("type") == "val"]
    if train_losses and val_losses:
        (first_it, first), (last_it, last) = train_losses[0], train_losses[-1]
        print(f"\nTraining loss {first:.3f} at iteration {first_it} -> {last:.3f} at iteration {last_it}; "
              f"final validation loss {val_losses[-1]:.3f} (a uniform guess over {args.vocab_size} tokens: "
              f"{math.log(args.vocab_size):.3f})")
    print(f"\n✓ Quickstart finished in {time.time() - start:.0f} s. Everything is under {rel(work)}/.")
    print("Next: the full TinyStories run (README.md, TRAINING_GUIDE.md) or Modal GPUs (MODAL_GUIDE.md).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
