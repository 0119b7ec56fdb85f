"""Train a BPE tokenizer on a text corpus and tokenize train/validation text into ``.bin`` files.

    uv run python prepare_data.py --train-path data/TinyStoriesV2-GPT4-train.txt \\
        --val-path data/TinyStoriesV2-GPT4-valid.txt --vocab-size 10000

Writes ``tokenizer/vocab.pkl`` + ``tokenizer/merges.pkl`` (or loads them with
``--use-existing-tokenizer``), ``data/train.bin`` and ``data/val.bin`` (flat uint16/uint32 token ids)
with ``.bin.json`` metadata beside each (see ``cs336_basics.tokenize_data``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from cs336_basics.common import disk_full_error, is_disk_full, run_command
from cs336_basics.data import DataError, tokenizer_sha256
from cs336_basics.fileio import prepare_output_dir, staged_outputs
from cs336_basics.tokenize_data import check_text_file, tokenize_file
from cs336_basics.tokenizer import MERGES_FILE, VOCAB_FILE, Tokenizer, load_tokenizer, tokenizer_files

MAX_VOCAB_SIZE = 1 << 20  # far above any useful byte-level BPE vocab; ids still fit in uint32
RULE = "=" * 80


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a BPE tokenizer and tokenize text files into .bin token files.")
    p.add_argument("--train-path", required=True, help="UTF-8 training text (documents separated by <|endoftext|>)")
    p.add_argument("--val-path", help="UTF-8 validation text (optional)")
    p.add_argument("--vocab-size", type=int, required=True, help="total vocabulary size, special tokens included")
    p.add_argument("--output-dir", default="data", help="folder for train.bin / val.bin (default: data)")
    p.add_argument("--tokenizer-dir", default="tokenizer", help="folder for vocab.pkl / merges.pkl (default: tokenizer)")
    p.add_argument("--use-existing-tokenizer", action="store_true", help="load the tokenizer from --tokenizer-dir instead of training one")
    p.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"], help="special tokens (default: <|endoftext|>)")
    p.add_argument("--num-workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all CPUs)")
    return p


def _dir_label(path: str | Path) -> str:
    text = str(path)
    return text if text.endswith("/") else text + "/"


def _check_args(args: argparse.Namespace) -> None:
    specials = args.special_tokens
    if any(not t for t in specials):
        raise DataError("--special-tokens: special tokens must be non-empty strings")
    smallest = 256 + len(set(specials))
    if args.vocab_size < smallest:
        raise DataError(
            f"--vocab-size {args.vocab_size} is too small: it must be at least {smallest} "
            f"(256 byte tokens + {len(set(specials))} special tokens); try 10000"
        )
    if args.vocab_size > MAX_VOCAB_SIZE:
        raise DataError(f"--vocab-size {args.vocab_size:,} is too large (max {MAX_VOCAB_SIZE:,}); try 10000 or 32000")
    if args.num_workers < 1:
        raise DataError(f"--num-workers {args.num_workers} must be at least 1")


def _load_existing(args: argparse.Namespace) -> Tokenizer:
    """The tokenizer in --tokenizer-dir: our pickles, or one trained elsewhere (tokenizer.json, or GPT-2's
    vocab.json + merges.txt), which is imported, i.e. saved beside it as vocab.pkl + merges.pkl so training,
    generation and the .bin metadata's tokenizer hash all use the same files."""
    from cs336_basics.common import UserError

    folder = Path(args.tokenizer_dir)
    files = tokenizer_files(folder)
    foreign = files if files and files[0].name != VOCAB_FILE else None
    for name in (VOCAB_FILE, MERGES_FILE):
        if foreign is None and not (folder / name).is_file():
            raise DataError(
                f"--use-existing-tokenizer: {folder / name} not found (nor a tokenizer.json, nor vocab.json + "
                f"merges.txt, to import); create it by running without "
                f"--use-existing-tokenizer: uv run python prepare_data.py --train-path {args.train_path} "
                f"--vocab-size {args.vocab_size} --tokenizer-dir {args.tokenizer_dir}"
            )
    try:
        tok = load_tokenizer(folder, args.special_tokens)
    except UserError:  # damaged, unsafe or foreign-but-incompatible files: the message names the file
        raise
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"cannot load the tokenizer in {folder}: {e}") from None
    if tok.vocab_size != args.vocab_size:
        raise DataError(
            f"the tokenizer in {folder} has vocab size {tok.vocab_size} but --vocab-size is {args.vocab_size}; "
            f"pass --vocab-size {tok.vocab_size} to use it, or drop --use-existing-tokenizer to train a new one"
        )
    if foreign is not None:
        try:
            tok.save(folder)
        except OSError as e:
            raise DataError(
                f"cannot save the imported tokenizer as {folder / VOCAB_FILE}: {e.strerror or e}; import it into a "
                f"writable folder with: uv run python -m cs336_basics.export import-tokenizer {foreign[0]} "
                f"--out DIR, then pass --tokenizer-dir DIR"
            ) from None
    print(RULE)
    print("Loading Existing Tokenizer")
    print(RULE)
    if foreign is not None:
        names = " + ".join(f.name for f in foreign)
        print(f"✓ Imported {names} from {_dir_label(folder)} (saved as {VOCAB_FILE} + {MERGES_FILE} beside it)")
    print(f"✓ Loaded tokenizer from {_dir_label(folder)}")
    print(f"  Vocabulary size: {tok.vocab_size}")
    print(f"  Number of merges: {len(tok.merges)}")
    print(f"  Special tokens: {tok.special_tokens}")
    return tok


def _train(args: argparse.Namespace, save_to: Path) -> Tokenizer:
    from cs336_basics.bpe import train_bpe

    print(RULE)
    print("Training BPE Tokenizer")
    print(RULE)
    print(f"Training data: {args.train_path}")
    print(f"Vocab size: {args.vocab_size}")
    print(f"Special tokens: {args.special_tokens}")
    print()
    print("Training BPE (this may take a while for large files)...", flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            vocab, merges = train_bpe(
                args.train_path, args.vocab_size, args.special_tokens, num_workers=args.num_workers, progress=True
            )
        except ValueError as e:
            raise DataError(str(e).splitlines()[0]) from None
    tok = Tokenizer(vocab, merges, args.special_tokens)
    print("✓ Training complete!")
    print(f"  Vocabulary size: {tok.vocab_size}")
    print(f"  Number of merges: {len(merges)}")
    advice = f"; set model.vocab_size: {tok.vocab_size} in your config" if tok.vocab_size != args.vocab_size else ""
    for w in caught:
        print(f"warning: {w.message}{advice}", file=sys.stderr)
    if advice and not caught:
        print(f"warning: the vocabulary has {tok.vocab_size} tokens, not {args.vocab_size}{advice}", file=sys.stderr)
    tok.save(save_to)
    print()
    print(f"✓ Tokenizer saved to {_dir_label(args.tokenizer_dir)}")
    print(f"  - {VOCAB_FILE}")
    print(f"  - {MERGES_FILE}")
    return tok


def _tokenize(title: str, src: str, dst: Path, tok: Tokenizer, args: argparse.Namespace, tok_hash: str) -> None:
    print()
    print(RULE)
    print(title)
    print(RULE)
    print(f"Tokenizing {src}...")
    print(f"File size: {Path(src).stat().st_size / 1024**2:.2f} MB", flush=True)
    result = tokenize_file(
        src,
        dst,
        tok,
        vocab_size=tok.vocab_size,
        special_tokens=tok.special_tokens,
        tokenizer_hash=tok_hash,
        num_workers=args.num_workers,
        progress=True,
    )
    print("✓ Tokenization complete!")
    print(f"  Total tokens: {result.num_tokens:,}")
    print(f"✓ Saved to {Path(args.output_dir) / dst.name}")
    print(f"  Output size: {result.output_bytes / 1024**2:.2f} MB")
    ratio = result.input_bytes / result.output_bytes if result.output_bytes else float("inf")
    print(f"  Compression ratio: {ratio:.2f}x", flush=True)


def _prepare(args: argparse.Namespace) -> None:
    _check_args(args)
    # Fail in seconds, not after BPE training: inputs readable UTF-8, output folders writable.
    check_text_file(args.train_path)
    if args.val_path:
        check_text_file(args.val_path)
    prepare_output_dir(args.output_dir, "--output-dir")
    if not args.use_existing_tokenizer:
        prepare_output_dir(args.tokenizer_dir, "--tokenizer-dir")

    # Every output is written to a hidden folder first and put in place when all are complete, so an interrupted
    # run never leaves a new tokenizer beside .bin files made with the old one.
    with staged_outputs() as stage:
        if args.use_existing_tokenizer:
            tok, folder = _load_existing(args), Path(args.tokenizer_dir)
        else:
            folder = stage(args.tokenizer_dir)
            tok = _train(args, folder)
        tok_hash = tokenizer_sha256(folder / VOCAB_FILE, folder / MERGES_FILE)
        out = stage(args.output_dir)
        _tokenize("Tokenizing Training Data", args.train_path, out / "train.bin", tok, args, tok_hash)
        if args.val_path:
            _tokenize("Tokenizing Validation Data", args.val_path, out / "val.bin", tok, args, tok_hash)


def run(args: argparse.Namespace) -> None:
    """Train (or load) the tokenizer and tokenize the texts; an OSError no step explained is one line."""
    try:
        _prepare(args)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(e.filename or args.output_dir) from None
        where = f": {e.filename}" if e.filename else ""
        raise DataError(f"{e.strerror or e}{where}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    return run_command(build_parser(), run, argv, interrupted="error: interrupted; nothing was replaced (the "
                       "tokenizer and .bin files are put in place together only when all are complete)")


if __name__ == "__main__":
    sys.exit(main())
