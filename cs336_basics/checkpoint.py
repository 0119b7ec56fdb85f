"""Saving and restoring training state (model, optimizer, iteration and any extras such as config or RNG state).

A checkpoint is a dict {"model": state_dict, "optimizer": state_dict, "iteration": int, **extras} written with
torch.save; extras hold only tensors and plain data (str, int, float, bool, None, lists, tuples, dicts), because
checkpoints are read with ``torch.load(weights_only=True)``: a file someone shared cannot run code on this machine.
Path writes are atomic (a temporary file in the same folder, then os.replace), so an interrupted save never leaves
a truncated checkpoint behind. Models wrapped by torch.compile ("_orig_mod.") or DDP ("module.") are unwrapped
before saving, and such prefixes are stripped again on load, so every checkpoint loads into a plain TransformerLM.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from cs336_basics.common import UserError, one_line
from cs336_basics.config import MODEL_CHOICES, ModelConfig
from cs336_basics.fileio import atomic_output
from cs336_basics.model import TransformerLM

FINAL_CHECKPOINT = "checkpoint_final.pt"
_ITER_CHECKPOINT = re.compile(r"checkpoint_iter_(\d+)\.pt")
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


class CheckpointError(UserError):
    """A checkpoint file that is missing, damaged, unsafe or does not fit; the message names the file."""


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, iteration: int,
                    out: PathOrFile, **extra: Any) -> None:
    """Write {"model", "optimizer", "iteration", **extra} to a path (atomically) or a binary file object.

    A full disk raises :class:`~cs336_basics.common.DiskFullError` naming the folder and the size needed.
    """
    state = {
        "model": strip_wrapper_prefixes(unwrap_model(model).state_dict()),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "iteration": int(iteration),
        **extra,
    }
    if not isinstance(out, (str, os.PathLike)):
        torch.save(state, out)
        return
    with atomic_output(out, size_hint=_tensor_bytes(state)) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors in a nested structure (about a checkpoint's size on disk)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def read_checkpoint(src: PathOrFile) -> dict[str, Any]:
    """The checkpoint dict, loaded onto the CPU without running any code stored in the file.

    Raises CheckpointError: file missing, not a checkpoint (garbage, truncated), or holding Python objects other
    than tensors and plain data (refused: unpickling them could run code).
    """
    name = _name(src)
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise CheckpointError(f"checkpoint not found: {name}")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols in files that are not checkpoints
            warnings.simplefilter("ignore")
            ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file: pickle, zip, RuntimeError, ValueError, ...
        if "Unsupported global" in str(e):  # weights_only met a class or function reference
            raise CheckpointError(
                f"refused to load {name}: it holds Python objects besides tensors and plain data, and loading them "
                "could run code; only checkpoints written by this project (or their exports) can be loaded"
            ) from None
        if isinstance(e, PermissionError) or (isinstance(e, OSError) and e.errno == errno.EIO):
            raise CheckpointError(f"cannot read checkpoint {name}: {e.strerror or e}") from None
        raise CheckpointError(f"{name} is not a checkpoint (damaged, truncated or another kind of file): "
                              f"{_load_failure(e)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "iteration" not in ckpt:
        raise CheckpointError(f"{name} is not a training checkpoint (no 'model' and 'iteration' entries)")
    return ckpt


def _load_failure(e: Exception) -> str:
    """torch's reason for refusing a file, without its advice to retry with ``weights_only=False`` (unsafe)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return one_line(text, 160)


def load_checkpoint(src: PathOrFile | dict, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *, name: str | None = None) -> int:
    """Restore model (and optimizer, when given) state from ``src``; return the saved iteration.

    ``src`` may also be a dict already returned by read_checkpoint (avoids reading a large file twice); ``name``
    (its path) then names it in errors.
    """
    ckpt = src if isinstance(src, dict) else read_checkpoint(src)
    name = name or _name(src)
    _load_weights(unwrap_model(model), ckpt["model"], name)
    if optimizer is not None:
        if ckpt.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {name} holds no optimizer state")
        optimizer.load_state_dict(ckpt["optimizer"])
    return int(ckpt["iteration"])


def model_config(ckpt: dict[str, Any], name: str = "checkpoint") -> ModelConfig:
    """The :class:`ModelConfig` saved in a checkpoint's ``config["model"]``."""
    config = ckpt.get("config")
    saved = config.get("model") if isinstance(config, dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{name} has no config['model'] to rebuild the model from; it was not written by "
                              "this project's train.py")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise CheckpointError(f"{name}: config['model'] has keys this version does not know: {', '.join(unknown)} "
                              "(written by a newer version of cs336-basics?)")
    try:
        config = ModelConfig(**saved)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: config['model'] is not a valid model config: {one_line(e, 200)}") from None
    for key, choices in MODEL_CHOICES.items():
        if getattr(config, key) not in choices:
            raise CheckpointError(f"{name}: config['model'] has {key}={getattr(config, key)!r}, not one of "
                                  f"{', '.join(choices)}")
    return config


def load_model(src: PathOrFile | dict, device: str | torch.device = "cpu", *, name: str | None = None) -> TransformerLM:
    """Build a TransformerLM from the checkpoint's ``config["model"]`` and load its weights, in eval mode.

    ``src`` may be a path, a file object, or a dict already returned by read_checkpoint (``name``, its path, then
    names it in errors).
    """
    ckpt = src if isinstance(src, dict) else read_checkpoint(src)
    name = name or _name(src)
    model = TransformerLM(model_config(ckpt, name), device=device)
    _load_weights(model, ckpt["model"], name)
    return model.eval()


def load_model_with_info(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[TransformerLM, dict]:
    """For generation and evaluation: the model (eval mode) and the checkpoint's other entries, ``config`` always a
    dict (``tokenizer_sha256``, ``iteration``, ... when recorded)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (download it first or pass --checkpoint PATH)")
    ckpt = read_checkpoint(path)
    info = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
    if not isinstance(info.get("config"), dict):
        info["config"] = {}
    return load_model(ckpt, device=device, name=str(path)), info


def _load_weights(model: torch.nn.Module, state_dict: dict[str, Any], name: str) -> None:
    """load_state_dict with torch's multi-line mismatch report turned into one line naming the file."""
    state_dict = strip_wrapper_prefixes(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state_dict and tuple(getattr(state_dict[k], "shape", ())) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:2])})")
        raise CheckpointError(f"the weights in {name} do not fit the model: {'; '.join(parts)}; was it saved from "
                              "a different model config?")
    model.load_state_dict(state_dict)


def checkpoint_iteration(path: Path) -> int | None:
    """N for ``checkpoint_iter_N.pt``; None for other names."""
    match = _ITER_CHECKPOINT.fullmatch(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """``checkpoint_iter_*.pt`` in ``directory`` by iteration, then ``checkpoint_final.pt`` (newest last)."""
    directory = Path(directory)
    found = sorted((n, p) for p in directory.glob("checkpoint_iter_*.pt") if (n := checkpoint_iteration(p)) is not None)
    paths = [p for _, p in found]
    if (directory / FINAL_CHECKPOINT).is_file():
        paths.append(directory / FINAL_CHECKPOINT)
    return paths


def newest_checkpoint(directory: str | os.PathLike,
                      on_damaged: Callable[[Path, CheckpointError], None] | None = None) -> tuple[Path, dict] | None:
    """The newest readable checkpoint in ``directory`` and its contents, or None when there is none.

    Newest is the highest iteration (``checkpoint_final.pt`` wins a tie). A damaged or unsafe file is skipped
    after ``on_damaged(path, error)``, so a run killed while a disk filled up still resumes from the one before.
    """
    candidates = [(checkpoint_iteration(p), 0, p, None) for p in list_checkpoints(directory)
                  if p.name != FINAL_CHECKPOINT]
    final = Path(directory) / FINAL_CHECKPOINT
    if final.is_file():
        try:
            ckpt = read_checkpoint(final)
            candidates.append((int(ckpt["iteration"]), 1, final, ckpt))
        except CheckpointError as exc:
            if on_damaged is not None:
                on_damaged(final, exc)
    for _, _, path, ckpt in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
        if ckpt is not None:
            return path, ckpt
        try:
            return path, read_checkpoint(path)
        except CheckpointError as exc:
            if on_damaged is not None:
                on_damaged(path, exc)
    return None


def _name(src: Any) -> str:
    if isinstance(src, dict):
        return "checkpoint"
    return str(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "<file object>")
