"""Diverse benchmark text that nobody on the project wrote, built offline from what is on this machine.

Two kinds of documents, joined with ``<|endoftext|>`` as in OpenWebText-style corpora:

* **code**: every text file (``.py``, ``.pyi``, ``.md``, ``.rst``, ``.txt``, C/C++/CUDA sources and
  headers) of the packages installed in the project's ``.venv`` (torch, transformers, numpy, sympy, ...):
  a few hundred MB of real source code and technical docs, with many identifiers seen only once.
* **multilingual**: the translated messages of the gettext catalogs (``*.mo``) under ``/usr/share/locale``
  and in ``.venv``, one document per catalog: real prose in 100+ languages and many scripts (Cyrillic,
  CJK, Devanagari, Arabic, Thai, ...). Where the machine has no catalogs (< 1 MB of them), generated
  multilingual documents from ``bench_bpe.py`` stand in, and the text's label says so.

Documents are shuffled with a fixed seed, so any prefix mixes packages and languages; ``mixed`` shuffles
both kinds together. Files that are not valid UTF-8 are skipped. The same machine gives the same text,
byte for byte; :func:`describe` prints its size and a sha256 so figures name the text they measured.
Texts are cached under ``benchmarks/.cache/`` (git-ignored). A text larger than all the documents
repeats them (reshuffled each round) and is labelled ``repeated``: only for memory measurements.

    uv run python benchmarks/diverse_text.py --kind mixed --mb 300      # build (or find) and describe
"""

from __future__ import annotations

import argparse
import gettext
import hashlib
import random
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(__file__).resolve().parent / ".cache"
EOT = "<|endoftext|>"
CODE_SUFFIXES = (".py", ".pyi", ".md", ".rst", ".txt", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".cuh")
LOCALE_DIRS = (Path("/usr/share/locale"), Path("/usr/local/share/locale"))
KINDS = ("code", "multilingual", "mixed")
SEED = 11
VERSION = 1  # bump when the way the text is built changes


def site_packages() -> Path:
    """The project's ``.venv`` site-packages (the running interpreter's, when run with ``uv run``)."""
    venv = PROJECT_ROOT / ".venv"
    found = sorted(venv.glob("lib/python3*/site-packages")) + sorted(venv.glob("Lib/site-packages"))
    return found[0] if found else Path(sysconfig.get_paths()["purelib"])


def code_files() -> list[Path]:
    root = site_packages()
    return sorted(p for p in root.rglob("*") if p.suffix in CODE_SUFFIXES and p.is_file())


def catalog_files() -> list[Path]:
    files = [p for d in LOCALE_DIRS if d.is_dir() for p in d.rglob("*.mo")]
    files += site_packages().rglob("*.mo")
    return sorted(p for p in files if p.is_file())


def read_code(path: Path) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def read_catalog(path: Path) -> str | None:
    """The translated messages of one gettext catalog, one per line (the header entry left out)."""
    try:
        with open(path, "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog
    except (OSError, ValueError, LookupError):  # not a catalog, or an unknown/invalid charset
        return None
    messages = [m for key, m in catalog.items() if isinstance(m, str) and m and key not in ("", ("", 0))]
    return "\n".join(messages) or None


def generated_multilingual(target_bytes: int) -> Iterator[str]:
    """Stand-in documents where the machine has no gettext catalogs (bench_bpe's generated scripts)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import itertools

    from bench_bpe import SCRIPTS, make_document, make_lexicon

    rng = random.Random(SEED)
    lexicons = {s: make_lexicon(rng, s, 8000) for s in SCRIPTS if s != "latin"}
    weights = {s: list(itertools.accumulate(1.0 / r for r in range(1, len(lex) + 1))) for s, lex in lexicons.items()}
    size = 0
    while size < target_bytes:
        doc = make_document(rng, lexicons, weights)
        size += len(doc.encode("utf-8"))
        yield doc


def documents(kind: str) -> tuple[list[tuple[Path, str]], str]:
    """The (source, reader) list for ``kind`` in a fixed shuffled order, and a label for the multilingual source."""
    label = "gettext catalogs"
    items: list[tuple[Path, str]] = []
    if kind in ("code", "mixed"):
        items += [(p, "code") for p in code_files()]
    if kind in ("multilingual", "mixed"):
        catalogs = catalog_files()
        if sum(p.stat().st_size for p in catalogs) < 1 << 20:
            label = "generated (no gettext catalogs on this machine)"
            catalogs = []
        items += [(p, "catalog") for p in catalogs]
    random.Random(SEED).shuffle(items)
    return items, label


def _fingerprint(items: list[tuple[Path, str]], kind: str, target_bytes: int, label: str) -> str:
    h = hashlib.sha256(f"{VERSION} {kind} {target_bytes} {label}".encode())
    for path, _ in items:
        h.update(f"{path}\0{path.stat().st_size}\n".encode())
    return h.hexdigest()[:12]


def build(kind: str, mb: float) -> tuple[Path, str]:
    """Path of the cached ``kind`` text of about ``mb`` MB (10^6 bytes), building it if needed, and its label."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    target = int(mb * 1e6)
    items, label = documents(kind)
    name = f"{kind}-{mb:g}MB-{_fingerprint(items, kind, target, label)}.txt"
    path = CACHE_DIR / name
    if path.exists():
        return path, _read_label(path, label)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.tmp")
    size, rounds = 0, 0
    with open(tmp, "w", encoding="utf-8", newline="") as out:

        def emit(doc: str) -> bool:
            nonlocal size
            data = doc if size == 0 else EOT + doc
            room = target - size
            encoded = data.encode("utf-8")
            if len(encoded) > room:  # cut the last document at a line end (or a character) to hit the size
                cut = encoded.rfind(b"\n", 0, room)
                encoded = encoded[: cut if cut > 0 else room]
                data = encoded.decode("utf-8", errors="ignore")
            out.write(data)
            size += len(data.encode("utf-8"))
            return size >= target - 16

        done = False
        order = list(items)
        while not done:
            for path_i, reader in order:
                doc = read_code(path_i) if reader == "code" else read_catalog(path_i)
                if doc and emit(doc):
                    done = True
                    break
            if not done and kind in ("multilingual", "mixed") and "generated" in label:
                for doc in generated_multilingual(target if kind == "multilingual" else target // 5):
                    if emit(doc):
                        done = True
                        break
            rounds += 1
            if not done:
                if size == 0:
                    raise RuntimeError(f"no {kind} documents found under {site_packages()} or the locale folders")
                random.Random(SEED + rounds).shuffle(order)
    if rounds > 1:
        label += f", all documents repeated ({rounds} rounds)"
    tmp.with_suffix(".label").write_text(label)
    tmp.rename(path)
    tmp.with_suffix(".label").rename(path.with_suffix(".label"))
    return path, label


def _read_label(path: Path, default: str) -> str:
    label = path.with_suffix(".label")
    return label.read_text() if label.exists() else default


def describe(path: Path, label: str, kind: str) -> str:
    """One line naming the text: kind, size, sources and a sha256 prefix."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    size = path.stat().st_size
    source = {"code": ".venv sources and docs", "multilingual": label,
              "mixed": f".venv sources and docs + {label}"}[kind]
    return f"diverse text '{kind}': {size / 1e6:.1f} MB ({source}), sha256 {h.hexdigest()[:16]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, default="mixed")
    parser.add_argument("--mb", type=float, default=10.0, help="size in MB (10^6 bytes)")
    args = parser.parse_args()
    path, label = build(args.kind, args.mb)
    print(path)
    print(describe(path, label, args.kind))


if __name__ == "__main__":
    main()
