"""Tokenizer speed vs tiktoken (single thread) with the same GPT-2 vocab and merges, in the same run.

    uv run python benchmarks/bench_tokenizer.py            # 10 MB per text, 5 repeats
    uv run python benchmarks/bench_tokenizer.py --quick    # 2 MB per text, 3 repeats
    uv run python benchmarks/bench_tokenizer.py --texts code,multilingual

Texts (each timed run of ours uses a fresh Tokenizer, cold caches, as a worker process starts; it is
built before the timer starts, as tiktoken's Encoding is, and the build time is printed at the end):
  * ``code``, ``multilingual``, ``mixed``: diverse text nobody on the project wrote, built offline by
    ``benchmarks/diverse_text.py`` (sources and docs of the packages in ``.venv``; gettext translations
    in 100+ languages; both shuffled together), documents joined with ``<|endoftext|>``;
  * ``cache-friendly``: the fixture corpora (corpus.en, tinystories_sample.txt, german.txt, address.txt)
    line by line in random order with 3% of the words replaced by random numbers and made-up words
    (``--novel``): few distinct words, so the caches are hit almost always. Also timed warm (a tokenizer
    that has seen the text).

The contenders alternate within each repeat and the ratio is the median of the per-repeat ratios, so
load from other processes affects both alike; the CPU-time ratio (``time.process_time``) is printed too.
Prints MB/s (UTF-8 bytes, medians), the ratios, ``encode_iterable`` over the text as a file read line by
line, and peak traced memory (tracemalloc) of ``encode`` and ``encode_iterable``.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
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


def bench_text(name: str, text: str, label: str, vocab, merges, enc, repeats: int, warm: bool) -> None:
    nbytes = len(text.encode("utf-8"))
    print(f"\n[{name}] {label}")
    warm_tok = None
    if warm:
        warm_tok = Tokenizer(vocab, merges, [EOT])
        warm_tok.encode(text)
    rows: dict[str, list[tuple[float, float]]] = {"tiktoken": [], "cold": [], "warm": []}
    ours = theirs = None
    for _ in range(repeats):  # alternating within each repeat
        ours = theirs = None  # previous results freed before timing, for both alike
        fresh = Tokenizer(vocab, merges, [EOT])  # built outside the timer, as tiktoken's Encoding is
        gc.collect()
        wall, cpu, ours = timed(lambda: fresh.encode(text))
        rows["cold"].append((wall, cpu))
        gc.collect()
        wall, cpu, theirs = timed(lambda: enc.encode(text, allowed_special="all"))
        rows["tiktoken"].append((wall, cpu))
        if ours != theirs:
            sys.exit(f"MISMATCH: Tokenizer.encode and tiktoken disagree on the {name} text")
        if warm_tok is not None:
            theirs = None
            gc.collect()
            wall, cpu, _ = timed(lambda: warm_tok.encode(text))
            rows["warm"].append((wall, cpu))
    med = statistics.median
    tk = rows["tiktoken"]
    print(f"  {nbytes / 1e6:.1f} MB, {len(ours):,} tokens ({nbytes / len(ours):.2f} bytes/token), ids identical to tiktoken;"
          f" {repeats} runs, medians; load average {os.getloadavg()[0]:.2f}")
    print(f"  tiktoken encode (1 thread)        {nbytes / med(w for w, _ in tk) / 1e6:6.2f} MB/s")
    for key, what in (("cold", "Tokenizer.encode, fresh (cold)"), ("warm", "Tokenizer.encode, warm caches")):
        if not rows[key]:
            continue
        runs = rows[key]
        ratio = med(t[0] / o[0] for t, o in zip(tk, runs))
        cpu_ratio = med(t[1] / o[1] for t, o in zip(tk, runs))
        print(f"  {what:33s} {nbytes / med(w for w, _ in runs) / 1e6:6.2f} MB/s   ratio {ratio:.2f}x tiktoken "
              f"(CPU time {cpu_ratio:.2f}x; runs {', '.join(f'{t[0] / o[0]:.2f}' for t, o in zip(tk, runs))})")

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
            if count != len(ours):
                sys.exit(f"MISMATCH: encode_iterable gave {count} ids, encode {len(ours)}")
        print(f"  Tokenizer.encode_iterable (file)  {nbytes / med(stream_runs) / 1e6:6.2f} MB/s (line by line, cold)")
        encode_peak = peak_traced(lambda: Tokenizer(vocab, merges, [EOT]).encode(text))

        def stream_all() -> None:
            with open(path, encoding="utf-8", newline="") as f:
                for _ in Tokenizer(vocab, merges, [EOT]).encode_iterable(f):
                    pass

        stream_peak = peak_traced(stream_all)
    print(f"  peak traced memory: encode {encode_peak:.1f} MiB (incl. the {len(ours):,}-id list and caches), "
          f"encode_iterable {stream_peak:.1f} MiB (incl. caches)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 MB per text and 3 repeats")
    parser.add_argument("--mb", type=float, default=None, help="MB per text (default 10, quick 2)")
    parser.add_argument("--texts", default=",".join(TEXTS), help=f"comma-separated, from {', '.join(TEXTS)}")
    parser.add_argument("--novel", type=float, default=0.03, help="cache-friendly text: fraction of words made new")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 5, quick 3)")
    args = parser.parse_args()
    mb = args.mb or (2.0 if args.quick else 10.0)
    repeats = args.repeats or (3 if args.quick else 5)

    import tiktoken

    fixtures = fixtures_root()
    if fixtures is None:
        sys.exit("benchmark needs the CS336 fixtures: set $CS336_FIXTURES or place them at ../shared/fixtures")
    fixtures = fixtures / "fixtures"
    vocab_path, merges_path = fixtures / "gpt2_vocab.json", fixtures / "gpt2_merges.txt"
    vocab, merges = load_gpt2_vocab(vocab_path), load_gpt2_merges(merges_path)
    tok = Tokenizer(vocab, merges, [EOT])
    ranks = {b: i for i, b in tok.vocab.items() if i != tok.eot_id}
    enc = tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256})

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
