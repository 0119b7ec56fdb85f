"""Benchmark: prepare_data's parallel file tokenization against tiktoken, in the same run.

Both encode the same text with GPT-2's tokenizer (built from the fixture files for both, so the ids
must be identical, and the benchmark checks that they are). Ours is ``tokenize_file`` (the code behind
``prepare_data.py --use-existing-tokenizer``: process pool, streaming, writes the .bin); tiktoken is
``Encoding.encode`` in one thread over the same text, fed in pieces of about 8 MB cut at safe cuts (the
ids equal one call on the whole text; the pieces keep its memory bounded), and, as an extra reference,
``encode_batch`` with as many threads as our workers. Every measurement runs in a fresh subprocess, so
start-up cost and memory are counted separately for each.

Texts:
  * ``diverse`` (default): source code, docs and multilingual prose nobody on the project wrote
    (``benchmarks/diverse_text.py``, kind ``mixed``), OpenWebText-like in its many rare words;
  * ``stories``: generated TinyStories-like stories (cache-friendly: a small, repetitive vocabulary).

Timing: ours end to end (pool start-up, reading, encoding, writing the .bin and its .json); tiktoken
only its encode calls (reading the file and writing ids are not timed). Peak RSS: the sum over the
process and all its worker processes, sampled every 20 ms (``/proc``), the maximum over the run.

    uv run python benchmarks/bench_prepare_data.py                          # 300 MB diverse, 2 workers, 3 runs
    uv run python benchmarks/bench_prepare_data.py --text stories --size-mb 30
    uv run python benchmarks/bench_prepare_data.py --size-mb 1000 --only-ours --runs 1   # memory at 1 GB
    uv run python benchmarks/bench_prepare_data.py --input data/owt_valid.txt
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
import threading
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("CS336_FIXTURES", PROJECT_ROOT.parent / "shared" / "fixtures")) / "fixtures"
EOT = "<|endoftext|>"
PIECE_BYTES = 8 << 20
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


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


# ------------------------------------------------------------------------- measurement helpers


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, its threads and its waited-for children so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _tree_rss_bytes(pid: int) -> int:
    """RSS of ``pid`` plus all its descendants (Linux /proc)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


class PeakRSS:
    """Samples the RSS of this process tree every 20 ms in a thread; ``peak_mb`` is the largest sum seen."""

    def __enter__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))
            self._stop.wait(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))
        self.peak_mb = self.peak / 1e6


def safe_pieces(src: Path) -> list[tuple[int, int]]:
    from cs336_basics.pretokenize import find_safe_boundaries

    with open(src, "rb") as f:
        bounds = find_safe_boundaries(f, PIECE_BYTES, [EOT])
    return list(zip(bounds[:-1], bounds[1:]))


def read_piece(src: Path, start: int, end: int) -> str:
    with open(src, "rb") as f:
        f.seek(start)
        return f.read(end - start).decode("utf-8")


# ------------------------------------------------------------------------------------ phases


def phase_ours(src: Path, out: Path, workers: int) -> dict:
    from cs336_basics.tokenize_data import tokenize_file

    tok = gpt2_tokenizer()
    with PeakRSS() as rss:
        cpu, wall = cpu_seconds(), time.perf_counter()
        tokenize_file(src, out, tok, vocab_size=tok.vocab_size, special_tokens=[EOT], num_workers=workers, parallel=workers > 1)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {"seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": rss.peak_mb}


def phase_tiktoken(src: Path, out: Path, workers: int) -> dict:
    import numpy as np

    enc = tiktoken_gpt2()
    wall = cpu = 0.0
    with PeakRSS() as rss, open(out, "wb") as f:
        for start, end in safe_pieces(src):
            text = read_piece(src, start, end)
            c, t = time.process_time(), time.perf_counter()
            ids = enc.encode(text, allowed_special={EOT})
            wall, cpu = wall + time.perf_counter() - t, cpu + time.process_time() - c
            np.asarray(ids, dtype=np.uint16).tofile(f)
    return {"seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": rss.peak_mb}


def phase_tiktoken_batch(src: Path, out: Path, workers: int) -> dict:
    enc = tiktoken_gpt2()
    pieces = safe_pieces(src)
    wall = cpu = 0.0
    with PeakRSS() as rss:
        for i in range(0, len(pieces), 2 * workers):
            texts = [read_piece(src, *p) for p in pieces[i : i + 2 * workers]]
            c, t = cpu_seconds(), time.perf_counter()
            enc.encode_batch(texts, num_threads=workers, allowed_special={EOT})
            wall, cpu = wall + time.perf_counter() - t, cpu + cpu_seconds() - c
    return {"seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": rss.peak_mb}


PHASES = {"ours": phase_ours, "tiktoken": phase_tiktoken, "tiktoken_batch": phase_tiktoken_batch}


def run_phase(name: str, src: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--input", str(src), "--out", str(out), "--workers", str(workers)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"phase {name} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_stories(path: Path, size_mb: float) -> Path:
    from cs336_basics.stories import generate_stories

    target = int(size_mb * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for story in generate_stories(10**9, seed=0):
            piece = f"{story}\n{EOT}\n"
            f.write(piece)
            written += len(piece)
            if written >= target:
                break
    return path


def same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return all(x == y for x, y in zip(iter(lambda: fa.read(1 << 24), b""), iter(lambda: fb.read(1 << 24), b"")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", choices=("diverse", "stories"), default="diverse")
    p.add_argument("--size-mb", type=float, default=None, help="MB of text (default: 300 diverse, 30 stories)")
    p.add_argument("--input", type=Path, help="tokenize this file instead of a built text")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only-ours", action="store_true", help="skip tiktoken (e.g. for memory at 1 GB)")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.phase:  # inside a measurement subprocess
        print(json.dumps(PHASES[args.phase](args.input, args.out, args.workers)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.input:
            src, label = args.input, str(args.input)
        elif args.text == "stories":
            src = make_stories(tmp / "stories.txt", args.size_mb or 30)
            label = "generated stories (cache-friendly)"
        else:
            import diverse_text

            src, source = diverse_text.build("mixed", args.size_mb or 300)
            label = diverse_text.describe(src, source, "mixed")
        mb = src.stat().st_size / 1e6
        print(f"input: {label}; {mb:.1f} MB, {args.workers} workers, {args.runs} runs; load average {os.getloadavg()[0]:.2f}")
        phases = ["ours"] if args.only_ours else list(PHASES)
        runs: dict[str, list[dict]] = {name: [] for name in phases}
        for _ in range(args.runs):
            for name in phases:  # alternating, so load from other jobs hits every contender alike
                runs[name].append(run_phase(name, src, tmp / f"{name}.bin", args.workers))
        labels = {
            "ours": f"ours, tokenize_file, {args.workers} processes",
            "tiktoken": "tiktoken encode, 1 thread",
            "tiktoken_batch": f"tiktoken encode_batch, {args.workers} threads",
        }
        print(f"{'':45s} {'wall s':>7s} {'MB/s':>6s} {'CPU s':>6s} {'MB/CPU-s':>8s}  peak RSS MB (all processes)")
        med = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
        cpu = {name: statistics.median(r["cpu_seconds"] for r in rs) for name, rs in runs.items()}
        for name, rs in runs.items():
            walls = ", ".join(f"{r['seconds']:.1f}" for r in rs)
            print(f"{labels[name]:45s} {med[name]:7.2f} {mb / med[name]:6.2f} {cpu[name]:6.2f} {mb / cpu[name]:8.2f}  "
                  f"{max(r['peak_rss_mb'] for r in rs):.0f}   (runs: {walls})")
        print(f"(medians; load average after: {os.getloadavg()[0]:.2f})")
        if args.only_ours:
            return
        same = same_file(tmp / "ours.bin", tmp / "tiktoken.bin")
        print(f"ids identical to tiktoken: {same}")
        ratios = [t["seconds"] / o["seconds"] for o, t in zip(runs["ours"], runs["tiktoken"])]
        print(f"ratio ours/tiktoken 1-thread (throughput, median of per-run ratios): {statistics.median(ratios):.2f}x "
              f"(runs: {', '.join(f'{r:.2f}' for r in ratios)})")
        print(f"ratio ours/tiktoken {args.workers}-thread batch (throughput): {med['tiktoken_batch'] / med['ours']:.2f}x")
        print(f"ratio ours/tiktoken 1-thread (MB per CPU-second, all our processes): {cpu['tiktoken'] / cpu['ours']:.2f}x")
        if not same:
            sys.exit("error: ids differ from tiktoken")


if __name__ == "__main__":
    main()
