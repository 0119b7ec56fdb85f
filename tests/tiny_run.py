"""A tiny model and a generated corpus for training tests: data, config overrides, metrics reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cs336_basics.config import load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VOCAB = 300
CONTEXT = 16


def make_data(root: Path, vocab: int = VOCAB, n_train: int = 20_000, n_val: int = 4_000, metadata: bool = True) -> Path:
    """``root/data/{train,val}.bin`` (+ tokenize_data's JSON sidecar): a noisy cyclic token stream a tiny LM can learn."""
    from cs336_basics.data import FORMAT_VERSION, metadata_path

    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", n_train), ("val.bin", n_val)):
        tokens = (np.arange(n) * 7) % 97
        noise = rng.random(n) < 0.1
        tokens[noise] = rng.integers(0, vocab, noise.sum())
        tokens[-1] = vocab - 1  # the largest id appears
        tokens.astype(np.uint16).tofile(data_dir / name)
        meta = {"format_version": FORMAT_VERSION, "dtype": "uint16", "vocab_size": vocab, "num_tokens": n,
                "special_tokens": ["<|endoftext|>"], "source": {"name": name, "size_bytes": 2 * n},
                "tokenizer_sha256": "0" * 64}
        if metadata:
            metadata_path(data_dir / name).write_text(json.dumps(meta), encoding="utf-8")
    return data_dir


def tiny_overrides(root: Path, **training) -> list[str]:
    """Overrides for a ~30K-parameter model that trains in well under a second per dozen steps on CPU."""
    values = dict(batch_size=8, max_iters=12, max_lr=1e-2, min_lr=1e-3, warmup_iters=2, log_interval=1,
                  eval_interval=6, eval_batches=2, checkpoint_interval=4, device="cpu", seed=0)
    values.update(training)
    return [
        f"model.vocab_size={VOCAB}", f"model.context_length={CONTEXT}", "model.d_model=32", "model.num_layers=2",
        "model.num_heads=2", "model.d_ff=64", f"data.data_dir={root / 'data'}",
        f"data.checkpoint_dir={root / 'ckpt'}", f"data.tokenizer_dir={root / 'tokenizer'}",
    ] + [f"training.{k}={v}" for k, v in values.items()]


def tiny_config(root: Path, **training):
    return load_config(None, tiny_overrides(root, **training))


def read_metrics(ckpt_dir: Path, kind: str = "train") -> list[dict]:
    lines = (ckpt_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]
