"""Export a trained model to Hugging Face Llama format, export or import tokenizers.

    uv run python -m cs336_basics.export hf --checkpoint checkpoints/checkpoint_final.pt \\
        --tokenizer-dir tokenizer --out exported/
    uv run python -m cs336_basics.export tokenizer --tokenizer-dir tokenizer --out exported-tokenizer/
    uv run python -m cs336_basics.export import-tokenizer path/to/tokenizer.json --out tokenizer/

Our architecture (pre-norm RMSNorm, RoPE, SwiGLU, no biases, untied head) is Llama's, so ``hf`` writes a folder that
``transformers.LlamaForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load with no custom code:
``config.json``, ``model.safetensors`` and the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, and ``tokenizer.tiktoken`` for tiktoken). The only change to the weights is the order
of the q/k projection rows: we rotate interleaved pairs (x[2j], x[2j+1]) while Hugging Face rotates halves
(x[j], x[j + d/2]), so each head's rows are reordered evens first, then odds, which leaves q.k unchanged.
Outputs are built in a temporary folder beside ``--out`` and renamed when complete. Needs only ``safetensors``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from typing import TYPE_CHECKING

from cs336_basics.common import UserError, disk_full_error, fmt_bytes, is_disk_full, run_command
from cs336_basics.config import ModelConfig
from cs336_basics.fileio import remove_stale_temporaries, temp_path

if TYPE_CHECKING:  # torch is imported only by the model export, so tokenizer commands start fast
    import torch

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DTYPES = ("float32", "bfloat16", "float16")

# Ablation switch -> (the Llama value, why another value is not a Llama).
_LLAMA_SWITCHES = {
    "norm": ("rmsnorm", "Llama normalises with RMSNorm"),
    "norm_position": ("pre", "Llama normalises before attention and the feed-forward (pre-norm)"),
    "position_embedding": ("rope", "Llama encodes positions with RoPE"),
    "ffn": ("swiglu", "Llama's feed-forward is SwiGLU"),
}


class ExportError(UserError):
    """An export that cannot be done as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------------------------------
# Model -> Llama


def check_llama(config: ModelConfig, name: str = "the model") -> None:
    """Raise ExportError unless ``config`` is a Llama (every ablation switch at its default)."""
    for key, (llama, why) in _LLAMA_SWITCHES.items():
        value = getattr(config, key)
        if value != llama:
            raise ExportError(f"{name} has model.{key}={value}, so it is not a Llama and cannot be exported as one: "
                              f"{why} (model.{key}={llama})")


def interleaved_to_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder each head's rows of a q/k projection from interleaved RoPE pairs to rotate-half order.

    Row 2j + c of a head (pair j, component c) moves to row c * d/2 + j, so Hugging Face's pair (j, j + d/2)
    holds our pair (2j, 2j + 1), rotated by the same angle.
    """
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def llama_state_dict(state: dict[str, torch.Tensor], config: ModelConfig,
                     dtype: str = "float32") -> dict[str, torch.Tensor]:
    """Our state_dict under Llama's names (q/k rows reordered for rotate-half RoPE), contiguous, in ``dtype``."""
    import torch

    h = config.num_heads
    out = {"model.embed_tokens.weight": state["token_embeddings.weight"],
           "model.norm.weight": state["ln_final.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        out[theirs + "self_attn.q_proj.weight"] = interleaved_to_half(state[ours + "attn.q_proj.weight"], h)
        out[theirs + "self_attn.k_proj.weight"] = interleaved_to_half(state[ours + "attn.k_proj.weight"], h)
        out[theirs + "self_attn.v_proj.weight"] = state[ours + "attn.v_proj.weight"]
        out[theirs + "self_attn.o_proj.weight"] = state[ours + "attn.output_proj.weight"]
        out[theirs + "mlp.gate_proj.weight"] = state[ours + "ffn.w1.weight"]
        out[theirs + "mlp.up_proj.weight"] = state[ours + "ffn.w3.weight"]
        out[theirs + "mlp.down_proj.weight"] = state[ours + "ffn.w2.weight"]
        out[theirs + "input_layernorm.weight"] = state[ours + "ln1.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "ln2.weight"]
    return {k: v.detach().to("cpu", getattr(torch, dtype)).contiguous() for k, v in out.items()}


def llama_config(config: ModelConfig, *, rms_norm_eps: float, eos_token_id: int | None = None,
                 dtype: str = "float32") -> dict:
    """``config.json`` of the Llama equal to ``config`` (keys for both transformers 4 and 5)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_heads,
        "head_dim": config.d_model // config.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": float(config.rope_theta),
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_theta)},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": dtype,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Output folders


@contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; it replaces ``out`` only when the block completes.

    An existing non-empty ``out`` is refused unless ``overwrite``. Temporary folders of exports that were killed
    (and their ``.NAME.old`` folders) are removed first.
    """
    out = Path(out)
    check_out(out, overwrite)
    tmp = temp_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)  # also catches .NAME.old.HOST.PID.tmp: it starts with .NAME.
        tmp.mkdir()
    except OSError as e:
        raise ExportError(f"cannot write into {out.parent}/: {e.strerror or e}; choose another --out") from None
    try:
        yield tmp
        if out.exists():
            old = temp_path(out.with_name(out.name + ".old"))
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(out / (Path(e.filename).name if e.filename else "")) from None
        raise ExportError(f"cannot write {out}/: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_out(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise ExportError when ``out`` is a file, or a non-empty folder and not ``overwrite`` (checked up front)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder: choose a folder name")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out}/ already exists and is not empty: choose a new folder or pass --overwrite")


def _check_space(out: Path, needed: int) -> None:
    """DiskFullError up front when the folder that will hold ``out`` has less than ``needed`` bytes free."""
    folder = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed + (16 << 20):  # the small JSON files besides the weights
        raise disk_full_error(out, needed)


def _chmod_like_umask(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_text(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text, encoding="utf-8")


def _json_text(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _write_json(folder: Path, name: str, obj: dict) -> None:
    _write_text(folder, name, _json_text(obj))


# ----------------------------------------------------------------------------------------------------------------------
# Commands


def _tokenizer_outputs(tok, model_max_length: int | None, require_hf: bool, log) -> dict[str, str]:
    """The tokenizer files that reproduce ``tok`` exactly; a format that cannot is skipped with one line.

    Raises NotExpressibleError when no format (or, with ``require_hf``, not ``tokenizer.json``) can be written.
    """
    from cs336_basics import hf_tokenizer as hft
    from cs336_basics.tokenizer import HF_TOKENIZER_FILE

    files: dict[str, str] = {}
    skipped: list[tuple[str, Exception]] = []
    try:
        hf = hft.hf_tokenizer_json(tok)
    except hft.NotExpressibleError as e:
        if require_hf:
            raise
        skipped.append((HF_TOKENIZER_FILE, e))
    else:
        config = hft.hf_tokenizer_config(tok, model_max_length)
        files[HF_TOKENIZER_FILE] = _json_text(hf)
        files[hft.HF_TOKENIZER_CONFIG_FILE] = _json_text(config)
        files[hft.HF_SPECIAL_TOKENS_MAP_FILE] = _json_text(
            {k: v for k, v in config.items() if k.endswith("_token") and v is not None})
    try:
        files[hft.TIKTOKEN_FILE] = hft.tiktoken_ranks(tok)
    except hft.NotExpressibleError as e:
        skipped.append((hft.TIKTOKEN_FILE, e))
    if not files:
        raise skipped[0][1]
    for name, e in skipped:
        log(f"warning: {e}; skipped {name}")
    return files


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, tokenizer_dir: str | os.PathLike | None,
              *, dtype: str = "float32", overwrite: bool = False, log=lambda line: None) -> Path:
    """Write the checkpoint (and its tokenizer) as a Hugging Face Llama folder ``out``; return it.

    Raises a UserError (ExportError, CheckpointError, ...: one line) for a checkpoint that is not a Llama, a
    tokenizer that does not fit it or cannot be written exactly, or an ``out`` that exists (unless ``overwrite``).
    """
    from safetensors.torch import save_file

    from cs336_basics.checkpoint import load_model
    from cs336_basics.tokenizer import load_checked_tokenizer

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    check_out(out, overwrite)  # before reading a checkpoint of possibly gigabytes
    log(f"Reading {checkpoint}...")
    model = load_model(checkpoint)
    config = model.config
    check_llama(config, str(checkpoint))
    eps = {m.eps for m in model.modules() if hasattr(m, "eps")}
    if len(eps) != 1:
        raise ExportError(f"{checkpoint}: its norms use several eps values {sorted(eps)}; Llama has one rms_norm_eps")
    files: dict[str, str] = {}
    eos = None
    if tokenizer_dir is not None:
        tok = load_checked_tokenizer(tokenizer_dir, config.vocab_size, model=str(checkpoint))
        files = _tokenizer_outputs(tok, config.context_length, require_hf=True, log=log)
        eos = tok.eot_id
    weights = llama_state_dict(model.state_dict(), config, dtype)
    del model
    size = sum(t.numel() * t.element_size() for t in weights.values())
    _check_space(Path(out), size)
    log(f"Writing {Path(out) / WEIGHTS_FILE} ({fmt_bytes(size)})...")
    with atomic_folder(out, overwrite) as tmp:
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _chmod_like_umask(tmp / WEIGHTS_FILE)  # safetensors creates it private (0600), unlike the other files
        _write_json(tmp, CONFIG_FILE, llama_config(config, rms_norm_eps=eps.pop(), eos_token_id=eos, dtype=dtype))
        _write_json(tmp, "generation_config.json", {"bos_token_id": eos, "eos_token_id": eos})
        for name, text in files.items():
            _write_text(tmp, name, text)
        written = sorted(p.name for p in tmp.iterdir())
    log(f"✓ Exported {checkpoint} to {out}/ ({', '.join(written)}; weights {fmt_bytes(size)} {dtype})")
    return Path(out)


def export_tokenizer(tokenizer_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                     model_max_length: int | None = None, log=lambda line: None) -> Path:
    """Write the tokenizer in ``tokenizer_dir`` as ``tokenizer.json`` (+ config) and ``tokenizer.tiktoken``.

    A format that cannot reproduce our ids exactly is skipped with a warning line; NotExpressibleError when none can.
    """
    from cs336_basics.tokenizer import load_checked_tokenizer

    check_out(out, overwrite)
    tok = load_checked_tokenizer(tokenizer_dir)
    files = _tokenizer_outputs(tok, model_max_length, require_hf=False, log=log)
    with atomic_folder(out, overwrite) as tmp:
        for name, text in files.items():
            _write_text(tmp, name, text)
    log(f"✓ Exported the tokenizer in {tokenizer_dir} to {out}/ ({', '.join(sorted(files))})")
    return Path(out)


def import_tokenizer(source: str | os.PathLike, out: str | os.PathLike, *, special_tokens: list[str] | None = None,
                     overwrite: bool = False, log=lambda line: None):
    """Read a tokenizer trained elsewhere (``tokenizer.json``, or GPT-2 ``vocab.json`` + ``merges.txt``) and save
    it in ``out`` as ``vocab.pkl`` + ``merges.pkl`` + ``special_tokens.json``; return the Tokenizer."""
    from cs336_basics.hf_tokenizer import read_tokenizer
    from cs336_basics.tokenizer import MERGES_FILE, VOCAB_FILE

    out = Path(out)
    if not overwrite and ((out / VOCAB_FILE).exists() or (out / MERGES_FILE).exists()):
        raise ExportError(f"{out}/ already holds a tokenizer ({VOCAB_FILE}): choose another --out or pass "
                          "--overwrite (token files made with the old one would no longer match)")
    try:
        tok = read_tokenizer(source, special_tokens)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    try:
        tok.save(out)
    except OSError as e:
        if is_disk_full(e):
            raise
        raise ExportError(f"cannot write the tokenizer into {out}/: {e.strerror or e}") from None
    log(f"✓ Imported {source} into {out}/ ({VOCAB_FILE}, {MERGES_FILE}): {tok.vocab_size} tokens, "
        f"{len(tok.merges)} merges, special tokens {tok.special_tokens}")
    return tok


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cs336_basics.export", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    hf = sub.add_parser("hf", help="a checkpoint (and its tokenizer) as a Hugging Face Llama folder")
    hf.add_argument("--checkpoint", required=True, help="checkpoint written by train.py")
    hf.add_argument("--tokenizer-dir", default="tokenizer", help="the tokenizer the model was trained with "
                    "(default: tokenizer)")
    hf.add_argument("--out", required=True, help="folder to create (refused if it exists and is not empty)")
    hf.add_argument("--dtype", default="float32", choices=DTYPES, help="weight dtype (default: float32)")
    hf.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    tok = sub.add_parser("tokenizer", help="a tokenizer as tokenizer.json (Hugging Face) and tokenizer.tiktoken")
    tok.add_argument("--tokenizer-dir", default="tokenizer", help="folder with vocab.pkl + merges.pkl")
    tok.add_argument("--out", required=True, help="folder to create (refused if it exists and is not empty)")
    tok.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    imp = sub.add_parser("import-tokenizer", help="a tokenizer.json or GPT-2 vocab.json + merges.txt as our pickles")
    imp.add_argument("source", help="tokenizer.json, vocab.json (merges.txt beside it), or a folder with either")
    imp.add_argument("--out", default="tokenizer", help="folder for vocab.pkl + merges.pkl (default: tokenizer)")
    imp.add_argument("--special-tokens", nargs="*", default=[], help="special tokens besides the file's own")
    imp.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    return parser


def _log(line: str) -> None:
    print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)


def run(args: argparse.Namespace) -> None:
    """Export a model or tokenizer, or import a tokenizer, as the subcommand says."""
    if args.command == "hf":
        export_hf(args.checkpoint, args.out, args.tokenizer_dir, dtype=args.dtype, overwrite=args.overwrite,
                  log=_log)
    elif args.command == "tokenizer":
        export_tokenizer(args.tokenizer_dir, args.out, overwrite=args.overwrite, log=_log)
    else:
        import_tokenizer(args.source, args.out, special_tokens=args.special_tokens, overwrite=args.overwrite,
                         log=_log)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see cs336_basics.common)."""
    return run_command(build_parser(), run, argv, interrupted="interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
