"""Sample text from a trained TransformerLM: temperature, nucleus (top-p) sampling and a KV cache.

With the KV cache each new token costs one single-position forward pass instead of a pass over the whole
context. Once the context is full the model always sees exactly the last ``context_length`` tokens (a
sliding window), so the cached and uncached paths produce the same tokens: when the cache is full it is
rebuilt from the last ``context_length`` tokens (a re-prefill, as costly as an uncached step).

    uv run python cs336_basics/generate.py --checkpoint checkpoints/checkpoint_final.pt \
        --prompt "Once upon a time" --max-new-tokens 256 --temperature 0.8 --top-p 0.9
"""

from __future__ import annotations

import argparse
import codecs
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the package, not sibling files, by absolute name
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch

from cs336_basics.checkpoint import load_model_with_info
from cs336_basics.common import UserError, run_command
from cs336_basics.device import pick_device

EOS_TOKEN = "<|endoftext|>"


# ----------------------------------------------------------------------------- sampling


def top_p_filter(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering over the last dim: keep the smallest set of most likely tokens whose total
    probability is >= ``p`` (always at least the top-1), zero the rest and renormalise.

    Ties are broken by token id (lower id first) so the result is deterministic.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs.masked_fill(~keep, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample_next(
    logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one token id per row of ``logits [B, V]``; ``temperature == 0`` means greedy (argmax).

    Sampling runs on the generator's device (CPU for ``None``) in float32, so a seed gives the same
    draws whatever device the model ran on.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    device = generator.device if generator is not None else torch.device("cpu")
    probs = torch.softmax(logits.to(device=device, dtype=torch.float32) / temperature, dim=-1)
    probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


# ----------------------------------------------------------------------------- generation


def stream_tokens(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_kv_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time (see :func:`generate`); ``eos_id`` ends the stream unyielded."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. the <|endoftext|> id)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    step = _Stepper(model, use_kv_cache)
    tokens = list(prompt_ids)
    for _ in range(max_new_tokens):
        next_id = step.next_token(tokens, temperature=temperature, top_p=top_p, generator=generator)
        if eos_id is not None and next_id == eos_id:
            return
        tokens.append(next_id)
        yield next_id


class _Stepper:
    """Picks the next token for a growing token list, the model seeing its last ``context_length`` tokens.

    With the KV cache only the newest token is run, except for the first step (prefill) and whenever the
    cache is full (re-prefill of the last ``context_length`` tokens). Each step runs under inference mode
    and eval mode on its own, so neither leaks into the caller's code between yielded tokens.
    """

    def __init__(self, model: torch.nn.Module, use_kv_cache: bool):
        self.model = model
        self.device = next(model.parameters()).device
        self.context_length = model.context_length
        self.use_kv_cache = use_kv_cache
        self.cache = None  # made at the first step

    @torch.inference_mode()
    def next_token(self, tokens: list[int], **sampling) -> int:
        model, cache = self.model, self.cache
        window = tokens[-self.context_length :]
        was_training = model.training
        model.eval()
        try:
            if not self.use_kv_cache:
                logits = model(self._batch(window))
            elif cache is None or cache.length >= self.context_length:
                if cache is None:
                    cache = self.cache = model.new_kv_cache(1)
                cache.reset()
                logits = model(self._batch(window), kv_cache=cache)
            else:
                logits = model(self._batch(window[-1:]), kv_cache=cache)
        finally:
            model.train(was_training)
        return int(sample_next(logits[:, -1], **sampling))

    def _batch(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)


def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_kv_cache: bool = True,
) -> list[int]:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens and return only the new ids.

    Stops early when ``eos_id`` is sampled; the eos id itself is NOT included in the result.
    ``temperature=0`` is greedy decoding; ``top_p < 1`` samples from the nucleus only.
    Pass a seeded ``torch.Generator`` (CPU) for reproducible samples.
    """
    return list(
        stream_tokens(
            model,
            prompt_ids,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_id=eos_id,
            generator=generator,
            use_kv_cache=use_kv_cache,
        )
    )


class TextStreamer:
    """Turns token ids into text piece by piece without splitting a multi-byte UTF-8 character.

    The bytes of each token go through an incremental UTF-8 decoder, which holds back an incomplete
    character until the bytes that finish it arrive; invalid bytes become U+FFFD, as in a one-shot
    ``bytes.decode("utf-8", errors="replace")``.
    """

    def __init__(self, id_to_bytes: Mapping[int, bytes]):
        self.id_to_bytes = id_to_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self.id_to_bytes[token_id])

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


# ----------------------------------------------------------------------------- CLI


def resolve_tokenizer_dir(explicit: str | None, config: Mapping) -> Path:
    """``--tokenizer-dir`` if given, else the checkpoint's ``data.tokenizer_dir`` when it exists here,
    else ``tokenizer``."""
    if explicit is not None:
        return Path(explicit)
    configured = (config.get("data") or {}).get("tokenizer_dir")
    if configured and Path(configured).is_dir():
        return Path(configured)
    return Path("tokenizer")


def warn_if_other_tokenizer(directory: Path, trained_with: str | None) -> None:
    """A warning when the tokenizer files differ from those the model was trained with (the checkpoint records
    their sha256): same vocab size, different tokens, so the text would be gibberish."""
    from cs336_basics.data import tokenizer_sha256
    from cs336_basics.tokenizer import MERGES_FILE, VOCAB_FILE

    vocab, merges = directory / VOCAB_FILE, directory / MERGES_FILE
    if trained_with and vocab.is_file() and merges.is_file() and tokenizer_sha256(vocab, merges) != trained_with:
        print(f"warning: the tokenizer in {directory}/ is not the one this model was trained with (its sha256 "
              "differs from the checkpoint's record): the text may be gibberish; pass --tokenizer-dir with the "
              "tokenizer that made the training data", file=sys.stderr)


def eos_id_of(tokenizer) -> int | None:
    """The id of ``<|endoftext|>`` (a special token, or failing that a plain vocab entry), else None."""
    if tokenizer.eot_id is not None:
        return tokenizer.eot_id
    target = EOS_TOKEN.encode("utf-8")
    return next((i for i, b in sorted(tokenizer.vocab.items()) if b == target), None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate text from a trained TransformerLM checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint .pt file (e.g. checkpoints/checkpoint_final.pt)")
    parser.add_argument(
        "--tokenizer-dir",
        default=None,
        help="folder with vocab.pkl and merges.pkl (default: the checkpoint's data.tokenizer_dir, then ./tokenizer)",
    )
    parser.add_argument("--prompt", default="Once upon a time", help="text to continue ('' starts from <|endoftext|>)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (default 0.8); 0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass in (0, 1] (default 0.9); 1 = off")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    parser.add_argument("--num-samples", type=int, default=1, help="independent continuations to print")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole context for every token")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a number >= 0 (0 = greedy), got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")


def run(args: argparse.Namespace) -> None:
    """Load the checkpoint and tokenizer, then stream the samples to stdout."""
    from cs336_basics.tokenizer import load_checked_tokenizer

    check_args(args)
    device = pick_device(args.device)
    model, info = load_model_with_info(args.checkpoint, device)
    tokenizer_dir = resolve_tokenizer_dir(args.tokenizer_dir, info["config"])
    tokenizer = load_checked_tokenizer(tokenizer_dir, model.vocab_size, model=str(args.checkpoint))
    warn_if_other_tokenizer(tokenizer_dir, info.get("tokenizer_sha256"))
    eos_id = eos_id_of(tokenizer)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        if eos_id is None:
            raise UserError(f"--prompt is empty and the tokenizer has no {EOS_TOKEN} token to start from")
        prompt_ids = [eos_id]
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    write_samples(model, tokenizer, args, prompt_ids, eos_id, generator, sys.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see cs336_basics.common)."""
    return run_command(build_parser(), run, argv, interrupted="")


def write_samples(model, tokenizer, args: argparse.Namespace, prompt_ids: list[int], eos_id: int | None,
                  generator: torch.Generator | None, out) -> None:
    """Stream ``args.num_samples`` continuations of the prompt to ``out`` as they are generated."""
    for sample in range(args.num_samples):
        if args.num_samples > 1:
            out.write(("\n" if sample else "") + f"--- sample {sample + 1}/{args.num_samples} ---\n")
        out.write(args.prompt)
        out.flush()
        streamer = TextStreamer(tokenizer.vocab)
        for token_id in stream_tokens(
            model,
            prompt_ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            eos_id=eos_id,
            generator=generator,
            use_kv_cache=not args.no_kv_cache,
        ):
            piece = streamer.push(token_id)
            if piece:
                out.write(piece)
                out.flush()
        out.write(streamer.flush() + "\n")
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
