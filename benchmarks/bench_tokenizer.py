"""Tokenizer speed vs tiktoken (single thread) with the same GPT-2 vocab and merges, in the same run.

    uv run python benchmarks/bench_tokenizer.py            # 10 MB per text, 5 repeats
    uv run python benchmarks/bench_tokenizer.py --quick    # 2 MB per text, 3 repeats
    uv run python benchmarks/bench_tokenizer.py --texts code,multilingual

Texts (each cold run encodes the text once in a fresh process, ours and tiktoken alternately, as a
worker process starts: our Tokenizer is built before the timer starts, as tiktoken's Encoding is, and
the build time is printed at the end):
  * ``code``, ``multilingual``, ``mixed``: diverse text nobody on the project wrote, built offline by
    ``benchmarks/diverse_text.py`` (sources and docs of the packages in ``.venv``; gettext translations
    in 100+ languages; both shuffled together), documents joined with ``<|endoftext|>``;
  * ``cache-friendly``: the fixture corpora (corpus.en, tinystories_sample.txt, german.txt, address.txt)
    line by line in random order with 3% of the words replaced by random numbers and made-up words
    (``--novel``): few distinct words, so the caches are hit almost always. Also timed warm (a tokenizer
    that has seen the text).

The contenders alternate within each repeat and the ratio is the median of the per-repeat ratios, so
load from other processes affects both alike; the CPU-time ratio (``time.process_time``) is printed too.
Every cold run's ids are compared with tiktoken's.
Prints MB/s (UTF-8 bytes, medians), the ratios, ``encode_iterable`` over the text as a file read line by
line, and peak traced memory (tracemalloc) of ``encode`` and ``encode_iterable``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import diverse_text  # noqa: E402
from fixtures import fixtures_root  # noqa: E402

from cs336_basics.gpt2 import load_gpt2_merges, load_gpt2_vocab  # noqa: E402
from cs336_basics.pretokenize import GPT2_PATTERN  # noqa: E402
from cs336_basics.tokenizer import Tokenizer  # noqa: E402

EOT = "<|endoftext|>"
TEXTS = ("code", "multilingual", "mixed", "cache-friendly")


def build_text(fixtures: Path, target_bytes: int, novel: float = 0.03, seed: int = 0) -> str:
    """Fixture lines in random order; a ``novel`` fraction of words replaced by random numbers or made-up words."""
    rng = random.Random(seed)
    lines = []
    for name in ("corpus.en", "tinystories_sample.txt", "german.txt", "address.txt"):
        lines += (fixtures / name).read_text(encoding="utf-8").splitlines(keepends=True)
    letters = "abcdefghijklmnopqrstuvwxyzäöüéABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out, size = [], 0
    while size < target_bytes:
        words = rng.choice(lines).split(" ")
        for i in range(len(words)):
            r = rng.random()
            if r < novel / 2:
                words[i] = str(rng.randrange(10**rng.randrange(1, 7)))
            elif r < novel:
                words[i] = "".join(rng.choice(letters) for _ in range(rng.randrange(2, 10)))
        line = " ".join(words)
        if rng.random() < 0.01:
            line += EOT + "\n"
        out.append(line)
        size += len(line.encode("utf-8"))
    return "".join(out)


def timed(fn) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds and the result of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def peak_traced(fn) -> float:
    """Peak memory traced while ``fn`` runs, in MiB."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def cold_run(contender: str, text_path: Path, ids_path: Path) -> dict:
    """One encode of the text in this (fresh) process; the ids go to ``ids_path``."""
    import numpy as np

    vocab, merges, enc = load_peers()
    text = text_path.read_bytes().decode("utf-8")
    if contender == "ours":
        tok = Tokenizer(vocab, merges, [EOT])
        gc.collect()
        wall, cpu, ids = timed(lambda: tok.encode(text))
    else:
        gc.collect()
        wall, cpu, ids = timed(lambda: enc.encode(text, allowed_special="all"))
    np.asarray(ids, dtype=np.uint32).tofile(ids_path)
    return {"wall": wall, "cpu": cpu}


def run_cold(contender: str, text_path: Path, ids_path: Path) -> tuple[float, float]:
    cmd = [sys.executable, __file__, "--cold-run", contender, str(text_path), str(ids_path)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"cold run of {contender} failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["wall"], result["cpu"]


def bench_text(name: str, text: str, label: str, vocab, merges, enc, repeats: int, warm: bool) -> None:
    nbytes = len(text.encode("utf-8"))
    print(f"\n[{name}] {label}")
    rows: dict[str, list[tuple[float, float]]] = {"tiktoken": [], "cold": [], "warm": [], "tiktoken_warm": []}
    with tempfile.TemporaryDirectory() as tmp:
        text_path, ours_ids, their_ids = Path(tmp) / "text.txt", Path(tmp) / "ours.u32", Path(tmp) / "theirs.u32"
        text_path.write_bytes(text.encode("utf-8"))
        for _ in range(repeats):  # alternating within each repeat
            rows["cold"].append(run_cold("ours", text_path, ours_ids))
            rows["tiktoken"].append(run_cold("tiktoken", text_path, their_ids))
            if ours_ids.read_bytes() != their_ids.read_bytes():
                sys.exit(f"MISMATCH: Tokenizer.encode and tiktoken disagree on the {name} text")
        n_tokens = ours_ids.stat().st_size // 4
    if warm:  # in this process: a tokenizer that has seen the text, and tiktoken beside it
        warm_tok = Tokenizer(vocab, merges, [EOT])
        warm_tok.encode(text)
        for _ in range(repeats):
            gc.collect()
            rows["warm"].append(timed(lambda: warm_tok.encode(text))[:2])
            gc.collect()
            rows["tiktoken_warm"].append(timed(lambda: enc.encode(text, allowed_special="all"))[:2])
    med = statistics.median
    tk = rows["tiktoken"]
    print(f"  {nbytes / 1e6:.1f} MB, {n_tokens:,} tokens ({nbytes / n_tokens:.2f} bytes/token), ids identical to tiktoken;"
          f" {repeats} runs, medians; load average {os.getloadavg()[0]:.2f}")
    print(f"  tiktoken encode (1 thread)        {nbytes / med(w for w, _ in tk) / 1e6:6.2f} MB/s")
    for key, what, peer in (("cold", "Tokenizer.encode, fresh (cold)", tk),
                            ("warm", "Tokenizer.encode, warm caches", rows["tiktoken_warm"])):
        if not rows[key]:
            continue
        runs = rows[key]
        ratio = med(t[0] / o[0] for t, o in zip(peer, runs))
        cpu_ratio = med(t[1] / o[1] for t, o in zip(peer, runs))
        print(f"  {what:33s} {nbytes / med(w for w, _ in runs) / 1e6:6.2f} MB/s   ratio {ratio:.2f}x tiktoken "
              f"(CPU time {cpu_ratio:.2f}x; runs {', '.join(f'{t[0] / o[0]:.2f}' for t, o in zip(peer, runs))})")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "text.txt"
        path.write_text(text, encoding="utf-8")

        def stream(tok: Tokenizer) -> int:
            count = 0
            with open(path, encoding="utf-8", newline="") as f:
                for _ in tok.encode_iterable(f):
                    count += 1
            return count

        stream_runs = []
        for _ in range(max(1, repeats // 2)):
            fresh = Tokenizer(vocab, merges, [EOT])
            wall, _, count = timed(lambda: stream(fresh))
            stream_runs.append(wall)
            if count != n_tokens:
                sys.exit(f"MISMATCH: encode_iterable gave {count} ids, encode {n_tokens}")
        print(f"  Tokenizer.encode_iterable (file)  {nbytes / med(stream_runs) / 1e6:6.2f} MB/s (line by line, cold)")
        encode_peak = peak_traced(lambda: Tokenizer(vocab, merges, [EOT]).encode(text))

        def stream_all() -> None:
            with open(path, encoding="utf-8", newline="") as f:
                for _ in Tokenizer(vocab, merges, [EOT]).encode_iterable(f):
                    pass

        stream_peak = peak_traced(stream_all)
    print(f"  peak traced memory: encode {encode_peak:.1f} MiB (incl. the {n_tokens:,}-id list and caches), "
          f"encode_iterable {stream_peak:.1f} MiB (incl. caches)")


def load_peers():
    """GPT-2's vocab and merges from the fixtures, and tiktoken's Encoding built from the same files."""
    import tiktoken

    fixtures = fixtures_root()
    if fixtures is None:
        sys.exit("benchmark needs the CS336 fixtures: set $CS336_FIXTURES or place them at ../shared/fixtures")
    fixtures = fixtures / "fixtures"
    vocab = load_gpt2_vocab(fixtures / "gpt2_vocab.json")
    merges = load_gpt2_merges(fixtures / "gpt2_merges.txt")
    eot_id = next(i for i, b in vocab.items() if b == EOT.encode())
    ranks = {b: i for i, b in vocab.items() if i != eot_id}
    enc = tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: eot_id})
    return vocab, merges, enc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 MB per text and 3 repeats")
    parser.add_argument("--mb", type=float, default=None, help="MB per text (default 10, quick 2)")
    parser.add_argument("--texts", default=",".join(TEXTS), help=f"comma-separated, from {', '.join(TEXTS)}")
    parser.add_argument("--novel", type=float, default=0.03, help="cache-friendly text: fraction of words made new")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 5, quick 3)")
    parser.add_argument("--cold-run", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold_run:
        contender, text_path, ids_path = args.cold_run
        print(json.dumps(cold_run(contender, Path(text_path), Path(ids_path))))
        return
    mb = args.mb or (2.0 if args.quick else 10.0)
    repeats = args.repeats or (3 if args.quick else 5)
    vocab, merges, enc = load_peers()
    fixtures = fixtures_root() / "fixtures"
    vocab_path, merges_path = fixtures / "gpt2_vocab.json", fixtures / "gpt2_merges.txt"

    for name in args.texts.split(","):
        if name == "cache-friendly":
            text = build_text(fixtures, int(mb * 1e6), args.novel)
            label = f"fixture lines re-sampled, {args.novel:.0%} of the words made new (cache-friendly)"
        elif name in diverse_text.KINDS:
            path, source = diverse_text.build(name, mb)
            text = path.read_text(encoding="utf-8")
            label = diverse_text.describe(path, source, name)
        else:
            sys.exit(f"unknown text {name!r}; choose from {', '.join(TEXTS)}")
        bench_text(name, text, label, vocab, merges, enc, repeats, warm=name == "cache-friendly")

    start = time.perf_counter()
    Tokenizer.from_files(vocab_path, merges_path, [EOT])
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    Tokenizer(vocab, merges, [EOT])
    init_s = time.perf_counter() - start
    print(f"\nload GPT-2 files (from_files): {load_s * 1000:.0f} ms; Tokenizer(vocab, merges) alone: {init_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
