"""Saving and restoring training state (model, optimizer, iteration and any extras such as config or RNG state).

A checkpoint is a dict {"model": state_dict, "optimizer": state_dict, "iteration": int, **extras} written with
torch.save. Path writes are atomic (a temporary file in the same folder, then os.replace), so an interrupted save never
leaves a truncated checkpoint behind. Models wrapped by torch.compile ("_orig_mod.") or DDP ("module.") are unwrapped
before saving, and such prefixes are stripped again on load, so every checkpoint loads into a plain TransformerLM.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import IO, Any

import torch

from cs336_basics.fileio import atomic_output
from cs336_basics.model import TransformerLM

WRAPPER_PREFIXES = ("_orig_mod.", "module.")

PathOrFile = str | os.PathLike | IO[bytes]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside torch.compile (``_orig_mod``) and DDP (``module``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def strip_wrapper_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop leading "_orig_mod." / "module." (in any order or repetition) from every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, iteration: int,
                    out: PathOrFile, **extra: Any) -> None:
    """Write {"model", "optimizer", "iteration", **extra} to a path (atomically) or a binary file object."""
    state = {
        "model": strip_wrapper_prefixes(unwrap_model(model).state_dict()),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "iteration": int(iteration),
        **extra,
    }
    if not isinstance(out, (str, os.PathLike)):
        torch.save(state, out)
        return
    with atomic_output(out) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def read_checkpoint(src: PathOrFile) -> dict[str, Any]:
    """The raw checkpoint dict, loaded onto the CPU."""
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read checkpoint {_name(src)}: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{_name(src)} is not a training checkpoint (no 'model' entry)")
    return ckpt


def load_checkpoint(src: PathOrFile | dict, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> int:
    """Restore model (and optimizer, when given) state from ``src``; return the saved iteration.

    ``src`` may also be a dict already returned by read_checkpoint (avoids reading a large file twice).
    """
    ckpt = src if isinstance(src, dict) else read_checkpoint(src)
    unwrap_model(model).load_state_dict(strip_wrapper_prefixes(ckpt["model"]))
    if optimizer is not None:
        if ckpt.get("optimizer") is None:
            raise ValueError(f"checkpoint {_name(src)} holds no optimizer state")
        optimizer.load_state_dict(ckpt["optimizer"])
    return int(ckpt["iteration"])


def load_model(src: PathOrFile, device: str | torch.device = "cpu") -> TransformerLM:
    """Build a TransformerLM from the checkpoint's ``config["model"]`` and load its weights, in eval mode."""
    ckpt = read_checkpoint(src)
    config = ckpt.get("config")
    model_cfg = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict):
        raise ValueError(f"checkpoint {_name(src)} has no config['model'] to rebuild the model from")
    keys = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff", "rope_theta")
    missing = [k for k in keys if k not in model_cfg]
    if missing:
        raise ValueError(f"checkpoint {_name(src)}: config['model'] lacks {missing}")
    kwargs = {k: model_cfg[k] for k in keys}
    if model_cfg.get("attention_impl"):
        kwargs["attention_impl"] = model_cfg["attention_impl"]
    model = TransformerLM(**kwargs, device=device)
    model.load_state_dict(strip_wrapper_prefixes(ckpt["model"]))
    return model.eval()


def _name(src: Any) -> str:
    return str(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "<file object>")
