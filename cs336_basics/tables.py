"""Plain-text tables and human-readable numbers for the experiment commands (runs, sweep, tokenizer_report)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def fmt_duration(seconds: float | None) -> str:
    """Seconds as the two largest units: 183_600 -> '2 d 3 h', 4_000 -> '1 h 6 min', 75 -> '1 min 15 s'."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    total = int(round(seconds))
    for big, big_unit, small, small_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "min"), (60, "min", 1, "s")):
        if total >= big:
            high, rest = divmod(total, big)
            return f"{high} {big_unit} {rest // small} {small_unit}"
    raise AssertionError("unreachable")


def fmt_count(n: float | None) -> str:
    """327_680_000 -> '327.7M'; below 1000 as an integer."""
    if n is None or not math.isfinite(n):
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def fmt_loss(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] | None = None) -> str:
    """Columns padded to their widest cell, a dashed rule under the headers; ``right[i]`` right-aligns column i."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    right = list(right) if right is not None else [False] * len(headers)

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
