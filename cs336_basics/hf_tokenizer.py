"""Our byte-level BPE tokenizer in other formats: Hugging Face ``tokenizer.json``, tiktoken ranks, GPT-2 files.

Export (:func:`hf_tokenizer_json`, :func:`tiktoken_ranks`) writes only what the other library reproduces exactly:
the same ids for every text and the same text back. Hugging Face's BPE applies merges by rank exactly as we do, so
``tokenizer.json`` is exact for any vocabulary whose tokens have distinct bytes. tiktoken instead merges the
adjacent pair whose *merged token* has the lowest id, so its ranks file is exact only when ids follow merge order
(true of every vocabulary trained here and of GPT-2's); :func:`check_tiktoken` refuses the others with one line.

Import (:func:`read_tokenizer`) reads a tokenizer trained elsewhere, a Hugging Face ``tokenizer.json`` or
GPT-2's ``vocab.json`` + ``merges.txt``, as long as it is GPT-2 style byte-level BPE (no normalizer, GPT-2's
pre-tokenization), so our encoder gives the ids the original gives. Everything here needs only the standard
library.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cs336_basics.common import one_line
from cs336_basics.gpt2 import bytes_to_unicode, decode_gpt2_token, encode_gpt2_token
from cs336_basics.pretokenize import GPT2_PATTERN
from cs336_basics.tokenizer import (GPT2_MERGES_FILE, GPT2_VOCAB_FILE, Tokenizer, TokenizerFileError, _load_merges,
                                    _load_vocab, load_tokenizer)

HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TIKTOKEN_FILE = "tokenizer.tiktoken"
EOT = "<|endoftext|>"

# GPT-2's pre-tokenization pattern as Hugging Face spells it (same matches as pretokenize.GPT2_PATTERN).
_HF_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_PATTERNS = (GPT2_PATTERN, _HF_GPT2_PATTERN)


class NotExpressibleError(TokenizerFileError):
    """The tokenizer cannot be written exactly in the requested format; the message says why."""


# ----------------------------------------------------------------------------------------------------------------------
# Export


def _check_distinct(tok: Tokenizer, fmt: str) -> None:
    seen: dict[bytes, int] = {}
    for i in sorted(tok.vocab):
        b = tok.vocab[i]
        if b in seen:
            raise NotExpressibleError(f"cannot write {fmt}: ids {seen[b]} and {i} are the same token {b!r}, and "
                                      f"{fmt} maps each token to one id")
        seen[b] = i


def _hf_vocab(tok: Tokenizer) -> dict[str, int]:
    """Hugging Face's vocab: tokens spelt in GPT-2's byte alphabet, but special tokens as themselves (Hugging Face
    looks an added token's id up in the vocab by its text)."""
    special_of = {i: s for s, i in tok.special_token_ids.items()}
    return {special_of.get(i) or encode_gpt2_token(tok.vocab[i]): i for i in sorted(tok.vocab)}


def check_hf(tok: Tokenizer) -> None:
    """Raise NotExpressibleError unless ``tokenizer.json`` gives exactly our ids and decodings."""
    fmt = "a Hugging Face tokenizer.json"
    _check_distinct(tok, fmt)
    alphabet = set(bytes_to_unicode().values())
    for special in tok.special_tokens:
        # HF decodes a token through the byte-level alphabet unless it has a character outside it: a special token
        # spelt only in that alphabet, but meaning other bytes (e.g. "é", "Ā"), would decode to the wrong text.
        if set(special) <= alphabet and encode_gpt2_token(special.encode("utf-8")) != special:
            raise NotExpressibleError(f"cannot write {fmt}: the special token {special!r} would decode to other "
                                      "text there (Hugging Face reads its characters as GPT-2 byte symbols); "
                                      "rename it with ASCII characters")
    # (A special token spelt like another token's bytes cannot occur: it would be spelt in the alphabet, so either
    # the check above refuses it or its bytes are that token's, whose id it then shares.)
    made = {a + b for a, b in tok.merges}
    for special in tok.special_tokens:
        if encode_gpt2_token(special.encode("utf-8")) != special and special.encode("utf-8") in made:
            raise NotExpressibleError(f"cannot write {fmt}: the special token {special!r} is also made by a merge, "
                                      "and Hugging Face would need it under two spellings")


def hf_tokenizer_json(tok: Tokenizer) -> dict:
    """The ``tokenizer.json`` of ``tok``: byte-level BPE, GPT-2 pre-tokenizer, special tokens as added tokens."""
    check_hf(tok)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    merges, seen = [], set()
    for a, b in tok.merges:
        if (a, b) not in seen:  # a repeated pair keeps its first rank (as in our encoder); HF would keep the last
            seen.add((a, b))
            merges.append(f"{encode_gpt2_token(a)} {encode_gpt2_token(b)}")
    added = [{"id": tok.special_token_ids[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s in tok.special_tokens]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": sorted(added, key=lambda t: t["id"]),
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": _hf_vocab(tok),
            "merges": merges,
        },
    }


def hf_tokenizer_config(tok: Tokenizer, model_max_length: int | None = None) -> dict:
    """``tokenizer_config.json`` so ``AutoTokenizer`` loads ``tokenizer.json`` as a plain fast tokenizer (no BOS
    added, no clean-up of spaces, which would change the text)."""
    eot = EOT if EOT in tok.special_token_ids else None
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": None,
        "pad_token": None,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for s, i in sorted(tok.special_token_ids.items(), key=lambda kv: kv[1])
        },
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def check_tiktoken(tok: Tokenizer) -> None:
    """Raise NotExpressibleError unless a tiktoken ``Encoding`` built from :func:`tiktoken_ranks` gives our ids.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank (= id); we merge by merge order.
    They agree when merged tokens' ids grow with merge order, no two merges make the same token, and (checked on
    every token's own bytes) no other split of a token lets tiktoken build it where our merges do not.
    """
    fmt = "a tiktoken ranks file"
    _check_distinct(tok, fmt)
    specials = set(tok.special_token_ids.values())
    ids = {b: i for i, b in tok.vocab.items() if i not in specials}
    made_by: dict[bytes, int] = {}
    previous = (-1, -1)
    for rank, (a, b) in enumerate(tok.merges):
        merged = a + b
        if merged in made_by:
            if tok.merges[made_by[merged]] == (a, b):
                continue  # a repeated pair: our encoder uses its first rank only
            raise NotExpressibleError(
                f"cannot write {fmt}: merges #{made_by[merged]} and #{rank} both make {merged!r}, and tiktoken ranks "
                "merges by the token they make")
        made_by[merged] = rank
        if merged not in ids:
            raise NotExpressibleError(f"cannot write {fmt}: merge #{rank} makes {merged!r}, a special token")
        if ids[merged] <= previous[1]:
            raise NotExpressibleError(
                f"cannot write {fmt}: merge #{rank} makes id {ids[merged]}, lower than id {previous[1]} made by "
                f"merge #{previous[0]}; tiktoken applies merges in id order, so ids must follow merge order")
        previous = (rank, ids[merged])
    pair_rank: dict[tuple[bytes, bytes], int] = {}
    for rank, pair in enumerate(tok.merges):
        pair_rank.setdefault(pair, rank)
    by_pair = lambda a, b: pair_rank.get((a, b), _NEVER)  # noqa: E731
    by_token = lambda a, b: ids.get(a + b, _NEVER)  # noqa: E731
    for token, i in ids.items():
        if len(token) > 1:
            ours, theirs = _bpe(token, by_pair), _bpe(token, by_token)
            if ours != theirs:
                raise NotExpressibleError(
                    f"cannot write {fmt}: tiktoken would split token {i} {token!r} as {theirs} where our merges give "
                    f"{ours} (the vocabulary has tokens its merges never make)")


_NEVER = 1 << 62


def _bpe(word: bytes, rank_of) -> list[bytes]:
    """Merge the leftmost adjacent pair of lowest ``rank_of(left, right)`` until every pair ranks ``_NEVER``.

    With merge ranks this is GPT-2's (and our) BPE; with the merged token's id it is tiktoken's.
    """
    parts = [word[k:k + 1] for k in range(len(word))]
    ranks = [rank_of(a, b) for a, b in zip(parts, parts[1:])]
    while ranks:
        best = min(ranks)
        if best == _NEVER:
            break
        k = ranks.index(best)
        parts[k:k + 2] = [parts[k] + parts[k + 1]]
        del ranks[k]
        if k < len(ranks):
            ranks[k] = rank_of(parts[k], parts[k + 1])
        if k > 0:
            ranks[k - 1] = rank_of(parts[k - 1], parts[k])
    return parts


def tiktoken_ranks(tok: Tokenizer) -> str:
    """The tiktoken ranks file of ``tok`` (``base64(token) id`` per line, special tokens excluded)."""
    check_tiktoken(tok)
    specials = set(tok.special_token_ids.values())
    return "".join(f"{base64.b64encode(tok.vocab[i]).decode('ascii')} {i}\n"
                   for i in sorted(tok.vocab) if i not in specials)


# ----------------------------------------------------------------------------------------------------------------------
# Import


def _refuse(path: Path, what: str) -> TokenizerFileError:
    return TokenizerFileError(f"cannot import {path}: {what}; only GPT-2 style byte-level BPE tokenizers can be "
                              "used here (our encoder would give other ids)")


def _check_gpt2_pretokenizer(path: Path, pre: dict | None) -> None:
    """GPT-2 pre-tokenization: ByteLevel with its regex, or Split(GPT-2 regex) followed by ByteLevel without."""
    def byte_level(step: dict, use_regex: bool) -> bool:
        return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space", False)
                and step.get("use_regex", True) == use_regex)

    if isinstance(pre, dict) and byte_level(pre, True):
        return
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if isinstance(steps, list) and len(steps) == 2 and isinstance(steps[0], dict) and isinstance(steps[1], dict):
        split, last = steps
        pattern = split.get("pattern")
        if (split.get("type") == "Split" and isinstance(pattern, dict) and pattern.get("Regex") in _GPT2_PATTERNS
                and split.get("behavior") == "Isolated" and not split.get("invert") and byte_level(last, False)):
            return
    kind = pre.get("type") if isinstance(pre, dict) else pre
    raise _refuse(path, f"its pre-tokenizer ({one_line(json.dumps(pre), 120) if kind else kind}) is not GPT-2's "
                        "(ByteLevel with add_prefix_space false and GPT-2's regex)")


def read_hf_tokenizer_json(path: str | os.PathLike) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]], list[str]]:
    """(vocab, merges, special tokens) of a Hugging Face byte-level BPE ``tokenizer.json``.

    Every added token becomes a special token (never split, like Hugging Face's added tokens). Raises
    TokenizerFileError (one line) for a file that is not JSON, not BPE, or not GPT-2 style byte-level.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"{path} is not a tokenizer.json (not valid JSON: {one_line(e, 80)})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise TokenizerFileError(f"{path} is not a Hugging Face tokenizer.json (no model.vocab)")
    if model.get("type", "BPE") != "BPE":
        raise _refuse(path, f"its model is {model.get('type')}, not BPE")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise _refuse(path, f"it uses {key}={model[key]!r}")
    for key in ("byte_fallback", "ignore_merges"):
        if model.get(key):
            raise _refuse(path, f"it sets {key}")
    if model.get("dropout"):
        raise _refuse(path, f"it sets BPE dropout {model['dropout']}")
    if data.get("normalizer") is not None:
        raise _refuse(path, f"it has a normalizer ({data['normalizer'].get('type', '?')})")
    _check_gpt2_pretokenizer(path, data.get("pre_tokenizer"))

    added = data.get("added_tokens") or []
    specials: dict[str, int] = {}
    for entry in added:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not entry["content"]:
            raise TokenizerFileError(f"{path}: an added token is not {{'id', 'content'}}: {one_line(entry, 80)}")
        if entry.get("lstrip") or entry.get("rstrip") or entry.get("single_word"):
            raise _refuse(path, f"added token {entry['content']!r} uses lstrip/rstrip/single_word matching")
        specials[entry["content"]] = entry.get("id")

    vocab: dict[int, bytes] = {}
    for key, i in model["vocab"].items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise TokenizerFileError(f"{path}: token {key!r} has id {i!r}, not a non-negative integer")
        if i in vocab:
            raise TokenizerFileError(f"{path}: tokens {encode_gpt2_token(vocab[i])!r} and {key!r} share id {i}")
        if key in specials:
            vocab[i] = key.encode("utf-8")
            continue
        try:
            vocab[i] = decode_gpt2_token(key)
        except KeyError:
            raise _refuse(path, f"token {key!r} (id {i}) is not spelt in GPT-2's byte alphabet") from None
    for special, i in specials.items():
        if special in model["vocab"]:
            continue  # Hugging Face gives an added token that is in the vocab the vocab's id
        if not isinstance(i, int) or i < 0 or i in vocab:
            raise TokenizerFileError(f"{path}: added token {special!r} has id {i!r}, which is taken or invalid")
        vocab[i] = special.encode("utf-8")

    merges: list[tuple[bytes, bytes]] = []
    for n, entry in enumerate(model.get("merges") or []):
        pair = entry.split(" ") if isinstance(entry, str) else entry
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise TokenizerFileError(f"{path}: merge #{n} is {one_line(entry, 60)!s}, not 'a b' or [a, b]")
        try:
            merges.append((decode_gpt2_token(pair[0]), decode_gpt2_token(pair[1])))
        except KeyError:
            raise _refuse(path, f"merge #{n} {pair} is not spelt in GPT-2's byte alphabet") from None
    return vocab, merges, list(specials)


def read_tokenizer(source: str | os.PathLike, special_tokens: list[str] | None = None) -> Tokenizer:
    """A Tokenizer from ``source``: a ``tokenizer.json``, a ``vocab.json`` (with ``merges.txt`` beside it), or a
    folder holding our pickles, a ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` (in that order).

    ``special_tokens`` are added to the tokenizer's own (a ``tokenizer.json``'s added tokens; the
    ``special_tokens.json`` beside our pickles). Raises TokenizerFileError or FileNotFoundError, one line naming
    the file.
    """
    source = Path(source)
    if source.is_dir():
        return load_tokenizer(source, special_tokens, add_special_tokens=True)
    if source.suffix == ".json" and source.name != GPT2_VOCAB_FILE:
        files = [source]
    elif source.name in (GPT2_VOCAB_FILE, GPT2_MERGES_FILE):
        files = [source.with_name(GPT2_VOCAB_FILE), source.with_name(GPT2_MERGES_FILE)]
    else:
        raise FileNotFoundError(f"no tokenizer at {source}: expected a tokenizer.json, a vocab.json with merges.txt "
                                "beside it, or a folder holding one of them (or vocab.pkl + merges.pkl)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {f}")
    return read_tokenizer_files(files, special_tokens)


def read_tokenizer_files(files: list[Path], special_tokens: list[str] | None = None) -> Tokenizer:
    """The tokenizer trained elsewhere in ``files``: ``[tokenizer.json]`` or ``[vocab.json, merges.txt]``, with
    ``special_tokens`` added to a ``tokenizer.json``'s added tokens."""
    if len(files) == 1:
        vocab, merges, specials = read_hf_tokenizer_json(files[0])
    else:
        vocab, merges, specials = _load_vocab(files[0]), _load_merges(files[1]), []
    specials += [s for s in special_tokens or [] if s not in specials]
    try:
        return Tokenizer(vocab, merges, specials)
    except ValueError as e:  # a vocab without all 256 bytes, a merge of tokens it lacks
        raise TokenizerFileError(f"cannot use the tokenizer in {files[0]}: {one_line(e, 200)}") from None
