"""GPT-2's printable byte-to-unicode mapping and its vocab/merges file format.

GPT-2 (and the CS336 reference files) write each byte as a printable unicode character, so that
tokens like b" the" appear as "Ġthe" in JSON and text files.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte 0..255 to a printable unicode character (printable ASCII/Latin-1 map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def decode_gpt2_token(token: str) -> bytes:
    """``"Ġthe"`` -> ``b" the"``."""
    table = unicode_to_bytes()
    return bytes(table[c] for c in token)


def encode_gpt2_token(token: bytes) -> str:
    """``b" the"`` -> ``"Ġthe"``."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def load_gpt2_vocab(path: str | Path) -> dict[int, bytes]:
    """Read a GPT-2 style ``vocab.json`` ({token_string: id}) into {id: bytes}."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return {int(i): decode_gpt2_token(tok) for tok, i in raw.items()}


def load_gpt2_merges(path: str | Path) -> list[tuple[bytes, bytes]]:
    """Read a GPT-2 style ``merges.txt`` (one ``a b`` pair per line; a ``#version`` line is skipped)."""
    merges = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#version"):
                continue
            a, b = line.split(" ")
            merges.append((decode_gpt2_token(a), decode_gpt2_token(b)))
    return merges
