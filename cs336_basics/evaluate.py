"""Loss and perplexity of a trained TransformerLM on a tokenized ``.bin`` file.

Every token after the first is predicted exactly once. The stream ``t[0..N)`` is cut into windows of
``context_length + 1`` tokens that overlap by one token (window k is ``t[kC : kC + C + 1]``: inputs are
its first C tokens, targets its last C), plus a final shorter window for the leftover targets. So the
N - 1 targets are each scored once, with between 1 and C tokens of context, and the reported loss is the
mean cross entropy over all of them (perplexity = exp(loss)).

    uv run python cs336_basics/evaluate.py --checkpoint checkpoints/checkpoint_final.pt --data data/val.bin
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the package, not sibling files, by absolute name
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import numpy as np
import torch
from tqdm import tqdm

from cs336_basics.common import UserError, run_command
from cs336_basics.checkpoint import load_model_with_info
from cs336_basics.device import autocast_for, pick_device


def iter_windows(num_tokens: int, context_length: int, batch_size: int) -> Iterator[tuple[int, int, int]]:
    """Yield ``(start, rows, width)`` batches: ``rows`` windows of ``width`` targets each, the first
    starting at token ``start``; together they cover targets 1..num_tokens-1 exactly once."""
    num_targets = max(num_tokens - 1, 0)
    full = num_targets // context_length
    for first in range(0, full, batch_size):
        rows = min(batch_size, full - first)
        yield first * context_length, rows, context_length
    leftover = num_targets - full * context_length
    if leftover:
        yield full * context_length, 1, leftover


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    context_length: int | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Mean per-token cross entropy of ``model`` over the whole token stream.

    Returns ``{"loss", "perplexity", "num_tokens"}`` where ``num_tokens`` counts scored targets
    (``len(tokens) - 1``). ``context_length`` defaults to the model's and may not exceed it.
    Runs under the project's precision rule (bf16 autocast on CUDA GPUs that support it, see
    ``device.autocast_for``); losses are accumulated in float64.
    """
    from cs336_basics.nn_utils import cross_entropy

    model_context = model.context_length
    context_length = model_context if context_length is None else int(context_length)
    if not 1 <= context_length <= model_context:
        raise ValueError(f"context_length must be in [1, {model_context}], got {context_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(tokens) < 2:
        raise ValueError(f"need at least 2 tokens to evaluate, got {len(tokens)}")
    device = torch.device(device)
    vocab_size = model.vocab_size
    autocast, _ = autocast_for(device)

    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no sync per batch
    total_targets = 0
    batches = list(iter_windows(len(tokens), context_length, batch_size))
    bar = tqdm(total=len(tokens) - 1, unit="tok", unit_scale=True, desc="evaluate", disable=not progress)
    try:
        for start, rows, width in batches:
            chunk = np.asarray(tokens[start : start + rows * width + 1], dtype=np.int64)
            top = int(chunk.max())
            if top >= vocab_size:
                raise ValueError(f"token id {top} near position {start} is outside the model's vocab (size {vocab_size})")
            chunk = torch.from_numpy(chunk).to(device)
            inputs = chunk[:-1].view(rows, width)
            targets = chunk[1:].view(rows, width)
            with autocast():
                logits = model(inputs)
            mean = cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            total_loss += mean.double() * targets.numel()
            total_targets += targets.numel()
            bar.update(targets.numel())
    finally:
        bar.close()
        model.train(was_training)

    loss = float(total_loss) / total_targets
    perplexity = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
    return {"loss": loss, "perplexity": perplexity, "num_tokens": total_targets}


# ----------------------------------------------------------------------------- CLI


def load_checked_tokens(path: str | Path, model_vocab_size: int) -> np.ndarray:
    """The token stream in ``path`` after the shared checks (data.check_token_file); UserError otherwise."""
    from cs336_basics.data import open_token_file

    # a bare .bin (no metadata) passes: its token ids are still range-checked while evaluating
    tokens, _ = open_token_file(
        path, not_found=f"data file not found: {path} (tokenize it first with prepare_data.py or pass --data PATH)",
        vocab_size=model_vocab_size, min_tokens=2, config_hint="",
        redo="uv run python prepare_data.py --use-existing-tokenizer ...",
        vocab_fix="evaluate with data tokenized by the model's tokenizer", too_short="to evaluate",
        what="the model's vocab_size")
    return tokens


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Loss and perplexity of a TransformerLM checkpoint on a .bin file.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint .pt file (e.g. checkpoints/checkpoint_final.pt)")
    parser.add_argument("--data", required=True, help="tokenized .bin file (e.g. data/val.bin)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default 32)")
    parser.add_argument("--context-length", type=int, default=None, help="window size (default: the model's)")
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run(args: argparse.Namespace) -> None:
    """Evaluate a checkpoint on a token file and print loss and perplexity."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UserError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    device = pick_device(args.device)
    model, _ = load_model_with_info(args.checkpoint, device)
    if args.context_length is not None and not 1 <= args.context_length <= model.context_length:
        raise UserError(f"--context-length must be in [1, {model.context_length}] for this model, got {args.context_length}")
    tokens = load_checked_tokens(args.data, model.vocab_size)
    if args.max_tokens is not None:
        tokens = tokens[: args.max_tokens]
    try:
        result = evaluate(model, tokens, context_length=args.context_length, batch_size=args.batch_size,
                          device=device, progress=not args.no_progress)
    except ValueError as exc:  # a token id outside the model's vocab
        raise UserError(f"{args.data}: {exc}") from None
    if args.json:
        print(json.dumps({**result, "checkpoint": str(args.checkpoint), "data": str(args.data)}))
    else:
        print(f"loss: {result['loss']:.4f}")
        print(f"perplexity: {result['perplexity']:.4f}")
        print(f"tokens: {result['num_tokens']:,}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see cs336_basics.common)."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
