"""Tokenizer speed vs tiktoken (single thread) with the same GPT-2 vocab and merges, in the same run.

    uv run python benchmarks/bench_tokenizer.py            # ~8 MB of text, 5 repeats
    uv run python benchmarks/bench_tokenizer.py --quick    # ~1 MB, 3 repeats

The text mixes the fixture corpora (corpus.en, tinystories_sample.txt, german.txt, address.txt) line by
line in random order and replaces a fraction of the words (``--novel``, default 3%) with random numbers
and made-up words, so the tokenizer's caches are not trivially always hit. Every timed run of our tokenizer uses a
fresh Tokenizer (cold caches), as a worker process would; "warm" reuses one that has seen the text.
The contenders alternate within each repeat and the ratio is the median of the per-repeat ratios, so
load from other processes on a shared machine affects both alike. Prints MB/s (UTF-8 bytes, medians),
the ratios, and peak memory (tracemalloc) of ``encode`` and of streaming a file with ``encode_iterable``.
"""

from __future__ import annotations

import argparse
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

from fixtures import fixtures_root  # noqa: E402

from cs336_basics.gpt2 import load_gpt2_merges, load_gpt2_vocab  # noqa: E402
from cs336_basics.pretokenize import GPT2_PATTERN  # noqa: E402
from cs336_basics.tokenizer import Tokenizer  # noqa: E402

EOT = "<|endoftext|>"


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


def time_it(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~1 MB of text and 3 repeats (a few seconds)")
    parser.add_argument("--mb", type=float, default=None, help="text size in MB (default 8, quick 1)")
    parser.add_argument("--novel", type=float, default=0.03, help="fraction of words made new (default 0.03)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 5, quick 3)")
    args = parser.parse_args()
    mb = args.mb or (1.0 if args.quick else 8.0)
    repeats = args.repeats or (3 if args.quick else 5)

    import tiktoken

    fixtures = fixtures_root()
    if fixtures is None:
        sys.exit("benchmark needs the CS336 fixtures: set $CS336_FIXTURES or place them at ../shared/fixtures")
    fixtures = fixtures / "fixtures"
    vocab_path, merges_path = fixtures / "gpt2_vocab.json", fixtures / "gpt2_merges.txt"

    load_s, tok = time_it(lambda: Tokenizer.from_files(vocab_path, merges_path, [EOT]), 3)
    vocab, merges = load_gpt2_vocab(vocab_path), load_gpt2_merges(merges_path)
    init_s, _ = time_it(lambda: Tokenizer(vocab, merges, [EOT]), 3)
    ranks = {b: i for i, b in tok.vocab.items() if i != tok.eot_id}
    enc = tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256})

    text = build_text(fixtures, int(mb * 1e6), args.novel)
    nbytes = len(text.encode("utf-8"))
    print(f"text: {nbytes / 1e6:.2f} MB, {len(text.split()):,} words, {args.novel:.1%} of them made new; "
          f"{repeats} timed runs each, median")

    # Contenders alternate within each repeat, so load from other processes hits both alike;
    # the ratio is taken per repeat, then the median.
    warm = Tokenizer(vocab, merges, [EOT])
    warm.encode(text)
    ours_t, theirs_t, warm_t = [], [], []
    for _ in range(repeats):
        s, ours = time_it(lambda: Tokenizer(vocab, merges, [EOT]).encode(text), 1)
        ours_t.append(s)
        s, theirs = time_it(lambda: enc.encode(text, allowed_special="all"), 1)
        theirs_t.append(s)
        warm_t.append(time_it(lambda: warm.encode(text), 1)[0])
        if ours != theirs:
            sys.exit("MISMATCH: Tokenizer.encode and tiktoken disagree on the benchmark text")
    med = statistics.median
    ours_mbs, theirs_mbs, warm_mbs = nbytes / med(ours_t) / 1e6, nbytes / med(theirs_t) / 1e6, nbytes / med(warm_t) / 1e6
    cold_ratio = med(t / o for t, o in zip(theirs_t, ours_t))
    warm_ratio = med(t / w for t, w in zip(theirs_t, warm_t))
    print(f"tokens: {len(ours):,} ({nbytes / len(ours):.2f} bytes/token), ids identical to tiktoken")
    print(f"tiktoken encode (1 thread)       : {theirs_mbs:6.2f} MB/s")
    print(f"Tokenizer.encode (cold cache)    : {ours_mbs:6.2f} MB/s   ratio {cold_ratio:.2f}x tiktoken")
    print(f"Tokenizer.encode (warm cache)    : {warm_mbs:6.2f} MB/s   ratio {warm_ratio:.2f}x tiktoken")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "text.txt"
        path.write_text(text, encoding="utf-8")

        def stream() -> int:
            count = 0
            with open(path, encoding="utf-8") as f:
                for _ in Tokenizer(vocab, merges, [EOT]).encode_iterable(f):
                    count += 1
            return count

        stream_s, count = time_it(stream, repeats)
        if count != len(ours):
            sys.exit("MISMATCH: encode_iterable gave a different number of ids than encode")
        print(f"Tokenizer.encode_iterable (file) : {nbytes / stream_s / 1e6:6.2f} MB/s (line by line, cold cache)")

        fresh = Tokenizer(vocab, merges, [EOT])
        tracemalloc.start()
        fresh.encode(text)
        encode_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        fresh = Tokenizer(vocab, merges, [EOT])
        tracemalloc.start()
        with open(path, encoding="utf-8") as f:
            for _ in fresh.encode_iterable(f):
                pass
        stream_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(f"peak traced memory: encode {encode_peak / 2**20:.1f} MiB (incl. the {len(ours):,}-id result list and caches), "
          f"encode_iterable {stream_peak / 2**20:.1f} MiB (incl. caches)")
    print(f"load GPT-2 files (from_files): {load_s * 1000:.0f} ms; Tokenizer(vocab, merges) alone: {init_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
