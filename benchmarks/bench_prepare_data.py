"""Benchmark: prepare_data's parallel file tokenization against tiktoken, in the same run.

Both encode the same text with GPT-2's tokenizer (built from the fixture files for both, so the ids
must be identical, and the benchmark checks that they are). Ours is ``tokenize_file`` (process pool,
streaming, writes the .bin); tiktoken is ``Encoding.encode`` on the whole text in one thread (its
documented single-call speed), plus ``encode_batch`` over the documents with the same number of
threads as our workers. Every measurement runs in a fresh subprocess, so start-up cost and peak RSS
(the process plus, for ours, its worker processes) are counted separately for each.

    uv run python benchmarks/bench_prepare_data.py                   # 50 MB of built-in stories, 2 workers, 3 runs
    uv run python benchmarks/bench_prepare_data.py --size-mb 10 --runs 1
    uv run python benchmarks/bench_prepare_data.py --input data/TinyStoriesV2-GPT4-valid.txt
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("CS336_FIXTURES", PROJECT_ROOT.parent / "shared" / "fixtures")) / "fixtures"
EOT = "<|endoftext|>"
sys.path.insert(0, str(PROJECT_ROOT))


def gpt2_tokenizer():
    from cs336_basics.tokenizer import Tokenizer

    return Tokenizer.from_files(FIXTURES / "gpt2_vocab.json", FIXTURES / "gpt2_merges.txt", [EOT])


def tiktoken_gpt2():
    import tiktoken

    from cs336_basics.gpt2 import load_gpt2_vocab
    from cs336_basics.pretokenize import GPT2_PATTERN

    vocab = load_gpt2_vocab(FIXTURES / "gpt2_vocab.json")
    eot_id = next(i for i, b in vocab.items() if b == EOT.encode())
    ranks = {b: i for i, b in vocab.items() if i != eot_id}
    return tiktoken.Encoding("gpt2-fixture", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: eot_id})


def peak_rss_mb() -> tuple[float, float]:
    """Peak RSS of this process and of its largest (waited-for) child, in MB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, kids


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its waited-for children so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Timer:
    """Wall and CPU seconds of a block; CPU time is robust to other load on a shared machine."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.result = {"seconds": time.perf_counter() - self.wall, "cpu_seconds": cpu_seconds() - self.cpu}


def phase_ours(src: Path, out: Path, workers: int) -> dict:
    from cs336_basics.tokenize_data import tokenize_file

    tok = gpt2_tokenizer()
    with Timer() as t:
        tokenize_file(src, out, tok, vocab_size=tok.vocab_size, special_tokens=[EOT], num_workers=workers, parallel=workers > 1)
    return t.result


def phase_tiktoken(src: Path, out: Path, workers: int) -> dict:
    import numpy as np

    enc = tiktoken_gpt2()
    text = src.read_text(encoding="utf-8")
    with Timer() as t:
        ids = enc.encode(text, allowed_special={EOT})
    np.asarray(ids, dtype=np.uint16).tofile(out)
    return t.result


def phase_tiktoken_batch(src: Path, out: Path, workers: int) -> dict:
    enc = tiktoken_gpt2()
    docs = src.read_text(encoding="utf-8").split(EOT)
    with Timer() as t:
        enc.encode_ordinary_batch(docs, num_threads=workers)
    return t.result


PHASES = {"ours": phase_ours, "tiktoken": phase_tiktoken, "tiktoken_batch": phase_tiktoken_batch}


def run_phase(name: str, src: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--input", str(src), "--out", str(out), "--workers", str(workers)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_input(path: Path, size_mb: float) -> Path:
    from cs336_basics.stories import generate_stories

    target = int(size_mb * 1024**2)
    written = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for story in generate_stories(10**9, seed=0):
            piece = f"{story}\n{EOT}\n"
            f.write(piece)
            written += len(piece)
            if written >= target:
                break
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=50.0, help="size of the generated story corpus")
    p.add_argument("--input", type=Path, help="tokenize this file instead of a generated corpus")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.phase:  # inside a measurement subprocess
        result = PHASES[args.phase](args.input, args.out, args.workers)
        own, kids = peak_rss_mb()
        print(json.dumps({**result, "rss_mb": own, "children_rss_mb": kids}))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = args.input or make_input(tmp / "stories.txt", args.size_mb)
        mb = src.stat().st_size / 1024**2
        print(f"input: {src if args.input else 'generated stories'} ({mb:.1f} MB), {args.workers} workers, {args.runs} runs")
        runs: dict[str, list[dict]] = {name: [] for name in PHASES}
        for _ in range(args.runs):
            for name in PHASES:
                runs[name].append(run_phase(name, src, tmp / f"{name}.bin", args.workers))
        same = (tmp / "ours.bin").read_bytes() == (tmp / "tiktoken.bin").read_bytes()
        print(f"ids identical to tiktoken: {same}")
        med = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
        cpu = {name: statistics.median(r["cpu_seconds"] for r in rs) for name, rs in runs.items()}
        labels = {
            "ours": f"ours, tokenize_file, {args.workers} processes",
            "tiktoken": "tiktoken encode, 1 thread",
            "tiktoken_batch": f"tiktoken encode_ordinary_batch, {args.workers} threads",
        }
        print(f"{'':45s} {'wall s':>7s} {'MB/s':>6s} {'CPU s':>6s} {'MB/CPU-s':>8s}   peak RSS MB (proc + largest child)")
        for name, rs in runs.items():
            rss = max(r["rss_mb"] for r in rs)
            kids = max(r["children_rss_mb"] for r in rs)
            print(f"{labels[name]:45s} {med[name]:7.2f} {mb / med[name]:6.2f} {cpu[name]:6.2f} {mb / cpu[name]:8.2f}   {rss:.0f} + {kids:.0f}")
        print("(medians; wall time includes our pool start-up; CPU time counts all processes and threads)")
        print(f"ratio ours/tiktoken 1-thread (throughput): {med['tiktoken'] / med['ours']:.2f}x")
        print(f"ratio ours/tiktoken {args.workers}-thread batch (throughput): {med['tiktoken_batch'] / med['ours']:.2f}x")
        print(f"ratio ours/tiktoken 1-thread (MB per CPU-second, all our processes): {cpu['tiktoken'] / cpu['ours']:.2f}x")
        if not same:
            sys.exit("error: ids differ from tiktoken")


if __name__ == "__main__":
    main()
