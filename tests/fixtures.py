"""The one place tests find the shared CS336 reference fixtures.

Looks at ``$CS336_FIXTURES`` first, then ``../shared/fixtures`` beside the project root. The folder holds
``fixtures/`` (reference texts, merges, vocabs) and ``_snapshots/`` (reference ``.npz`` outputs).
Where neither exists (a user's clone) tests that need them skip with a reason; under ``CI=true`` a missing
fixture fails the run instead, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def fixtures_root() -> Path | None:
    """The fixtures folder, or None when it is not available."""
    env = os.environ.get("CS336_FIXTURES")
    candidates = [Path(env)] if env else []
    candidates.append(PROJECT_ROOT.parent / "shared" / "fixtures")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"fixture missing under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def fixture_path(*parts: str) -> Path:
    """Path to a file under ``fixtures/`` (e.g. ``fixture_path("corpus.en")``); skips or fails when missing."""
    return _find("fixtures", *parts)


def snapshot_path(name: str) -> Path:
    """Path to a reference output under ``_snapshots/`` (e.g. ``snapshot_path("test_rope.npz")``)."""
    return _find("_snapshots", name)


def _find(*parts: str) -> Path:
    root = fixtures_root()
    if root is None:
        _missing("CS336 fixtures not found: set $CS336_FIXTURES or place them at ../shared/fixtures")
    path = root.joinpath(*parts)
    if not path.exists():
        _missing(f"CS336 fixture not found: {path}")
    return path
