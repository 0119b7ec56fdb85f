"""Benchmark: our BPE trainer against HuggingFace ``tokenizers``' BpeTrainer, in the same run.

Builds a deterministic multi-MB multilingual corpus (the fixture texts plus generated documents in
several scripts, separated by <|endoftext|>) in a temporary folder, trains both trainers to the
same vocabulary size, and prints the median wall time, the peak RSS and the ratio ours/HF. Each
training runs in a fresh subprocess so start-up and memory are measured separately for each.

    uv run python benchmarks/bench_bpe.py            # ~12 MB corpus, vocab 10,000, 3 runs each
    uv run python benchmarks/bench_bpe.py --quick    # ~1 MB corpus, vocab 2,000, 1 run each
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The shared CS336 fixture texts, where present (as tests/fixtures.py finds them); else generated text only.
FIXTURES = Path(os.environ.get("CS336_FIXTURES") or PROJECT_ROOT.parent / "shared" / "fixtures") / "fixtures"
EOT = "<|endoftext|>"

# Letters used to make up words in each script; digraphs for Latin keep words pronounceable.
SCRIPTS = {
    "latin": "th e a in er o an re s t n on l d ch ou st i u m".split(),
    "accented": ["é", "è", "à", "ü", "ö", "ä", "ß", "ç", "ñ", "e", "a", "r", "t", "on", "ie", "en", "s", "l"],
    "cyrillic": list("аеиоунтсрвлкмдпяыгзбчйхжшюцщэфъё"),
    "greek": list("αβγδεζηθικλμνξοπρστυφχψω"),
    "arabic": list("ابتثجحخدذرزسشصضطظعغفقكلمنهوي"),
    "cjk": [chr(c) for c in range(0x4E00, 0x4E00 + 600, 3)] + list("のはにをがでとしたですます"),
    "hangul": [chr(c) for c in range(0xAC00, 0xAC00 + 400, 7)],
}
PUNCT = [".", ",", "!", "?", ";", ":", " —", "…", "(", ")", '"', "'s", "'t"]
EMOJI = ["😀", "🎉", "👍", "🚀", "❤️", "👩‍💻", "🇫🇷"]


def make_lexicon(rng: random.Random, script: str, size: int) -> list[str]:
    parts = SCRIPTS[script]
    return ["".join(rng.choice(parts) for _ in range(rng.choice((1, 2, 2, 3, 3, 4, 5)))) for _ in range(size)]


def make_document(rng: random.Random, lexicons: dict[str, list[str]], weights: dict[str, list[float]]) -> str:
    script = rng.choice(list(lexicons))
    lexicon, w = lexicons[script], weights[script]
    sep = "" if script == "cjk" else " "
    lines = []
    for _ in range(rng.randint(1, 6)):
        words = rng.choices(lexicon, cum_weights=w, k=rng.randint(5, 60))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 10**rng.randint(1, 6))))
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words)), rng.choice(EMOJI))
        sentence = sep.join(words)
        lines.append(sentence[:1].upper() + sentence[1:] + rng.choice(PUNCT))
    return ("\n" if rng.random() < 0.7 else "\n\n").join(lines)


def build_corpus(path: Path, target_bytes: int, seed: int = 1234) -> int:
    """Write the benchmark corpus to ``path``; returns its size in bytes. Same seed, same file."""
    rng = random.Random(seed)
    fixture_texts = [
        (FIXTURES / name).read_text(encoding="utf-8")
        for name in ("corpus.en", "tinystories_sample.txt", "german.txt", "address.txt")
        if (FIXTURES / name).exists()
    ]
    lexicons = {s: make_lexicon(rng, s, 30000 if s in ("latin", "accented") else 8000) for s in SCRIPTS}
    # Zipf word frequencies, as cumulative weights for rng.choices.
    weights = {s: list(itertools.accumulate(1.0 / r for r in range(1, len(lex) + 1))) for s, lex in lexicons.items()}
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        for text in fixture_texts:
            f.write(text + EOT)
            size = f.tell()
        while size < target_bytes:
            if rng.random() < 0.15 and fixture_texts:  # real text keeps coming back, like web crawls
                text = rng.choice(fixture_texts)
                start = rng.randrange(max(1, len(text) - 2000))
                doc = text[start : start + rng.randint(200, 2000)]
            else:
                doc = make_document(rng, lexicons, weights)
            f.write(doc + EOT)
            size = f.tell()
    return path.stat().st_size


def run_one(trainer: str, path: str, vocab_size: int) -> dict:
    """Train once in this process; returns wall seconds, CPU seconds and peak RSS (MiB), children included."""
    import resource

    def cpu_seconds() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    if trainer == "ours":
        sys.path.insert(0, str(PROJECT_ROOT))
        from cs336_basics.bpe import train_bpe

        cpu0 = cpu_seconds()
        start = time.perf_counter()
        vocab, merges = train_bpe(path, vocab_size, [EOT])
        wall = time.perf_counter() - start
        n = len(vocab)
    else:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        cpu0 = cpu_seconds()
        start = time.perf_counter()
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer_ = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train([path], trainer_)
        wall = time.perf_counter() - start
        n = tok.get_vocab_size()
    cpu = cpu_seconds() - cpu0  # training only, worker processes and threads included
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": wall, "cpu": cpu, "rss_mib": (own.ru_maxrss + kids.ru_maxrss) / 1024, "vocab": n}


def measure(trainer: str, path: Path, vocab_size: int, repeat: int) -> list[dict]:
    runs = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, __file__, "--run-one", trainer, str(path), str(vocab_size)],
            check=True,
            capture_output=True,
            text=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def report(label: str, path: Path, vocab_size: int, repeat: int) -> None:
    size = path.stat().st_size
    ours = measure("ours", path, vocab_size, repeat)
    hf = measure("hf", path, vocab_size, repeat)
    ours_t = statistics.median(r["wall"] for r in ours)
    hf_t = statistics.median(r["wall"] for r in hf)
    print(f"{label}: {size / 1e6:.2f} MB -> vocab {vocab_size}, median of {repeat}")
    for name, runs, t in (("ours", ours, ours_t), ("HF tokenizers", hf, hf_t)):
        walls = ", ".join(f"{r['wall']:.2f}" for r in runs)
        rss = max(r["rss_mib"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        print(
            f"  {name:14s} {t:7.3f} s  (runs: {walls})  CPU {cpu:6.2f} s  "
            f"peak RSS {rss:7.1f} MiB  vocab {runs[0]['vocab']}"
        )
    ours_cpu = statistics.median(r["cpu"] for r in ours)
    hf_cpu = statistics.median(r["cpu"] for r in hf)
    print(f"  ratio ours/HF: wall {ours_t / hf_t:.2f}x, CPU {ours_cpu / hf_cpu:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpus and vocab, one run each")
    parser.add_argument("--mb", type=float, default=None, help="corpus size in MB (default 12, quick 1)")
    parser.add_argument("--vocab-size", type=int, default=None, help="default 10000, quick 2000")
    parser.add_argument("--repeat", type=int, default=None, help="runs per trainer (default 3, quick 1)")
    parser.add_argument("--run-one", nargs=3, metavar=("TRAINER", "PATH", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        trainer, path, vocab = args.run_one
        print(json.dumps(run_one(trainer, path, int(vocab))))
        return

    mb = args.mb or (1.0 if args.quick else 12.0)
    vocab_size = args.vocab_size or (2000 if args.quick else 10000)
    repeat = args.repeat or (1 if args.quick else 3)
    if (FIXTURES / "corpus.en").exists():
        report("corpus.en", FIXTURES / "corpus.en", 500, repeat)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_corpus.txt"
        start = time.perf_counter()
        build_corpus(path, int(mb * 1e6))
        print(f"(built the corpus in {time.perf_counter() - start:.1f} s)")
        report("generated multilingual corpus", path, vocab_size, repeat)


if __name__ == "__main__":
    main()
