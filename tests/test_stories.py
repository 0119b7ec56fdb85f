"""cs336_basics.stories: the built-in deterministic story corpus."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import pytest
from fixtures import PROJECT_ROOT

from cs336_basics.stories import generate_stories, write_corpus


def test_same_seed_same_stories_and_different_seeds_differ():
    a = list(generate_stories(200, seed=0))
    assert a == list(generate_stories(200, seed=0))
    b = list(generate_stories(200, seed=1))
    assert sum(x != y for x, y in zip(a, b)) > 190
    assert list(generate_stories(50, seed=0)) == a[:50]  # a prefix does not depend on the count


def test_deterministic_across_processes():
    # Catches any dependence on hash randomisation or process state.
    code = "import hashlib; from cs336_basics.stories import generate_stories; " \
           "print(hashlib.sha256(''.join(generate_stories(100, seed=7)).encode()).hexdigest())"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PROJECT_ROOT,
                       env={"PYTHONHASHSEED": str(h), "PYTHONPATH": str(PROJECT_ROOT)}).stdout.strip()
        for h in (1, 2)
    }
    assert outs == {hashlib.sha256("".join(generate_stories(100, seed=7)).encode()).hexdigest()}


def test_stories_are_varied_simple_english():
    stories = list(generate_stories(1000, seed=3))
    assert len(set(stories)) == len(stories)
    words = re.findall(r"[A-Za-z']+", " ".join(stories))
    vocab = {w.lower() for w in words}
    assert 300 <= len(vocab) <= 5000  # rich enough to be interesting, small enough for a tiny model
    openings = {s.split(".")[0].split()[0] for s in stories}
    assert len(openings) >= 4
    for s in stories[:100]:
        assert 200 < len(s) < 2000
        assert s[0].isupper() and s.rstrip()[-1] in '.!"'
        assert '"' in s  # every story has dialogue
        assert "{" not in s and "}" not in s  # no unfilled template slots
        assert s.isascii()


def test_write_corpus_format(tmp_path):
    path = write_corpus(tmp_path / "c.txt", 30, seed=5)
    text = path.read_text(encoding="utf-8")
    docs = text.split("\n<|endoftext|>\n")
    assert docs[-1] == "" and docs[:-1] == list(generate_stories(30, seed=5))
    assert text.count("<|endoftext|>") == 30
    assert [p.name for p in tmp_path.iterdir()] == ["c.txt"]  # no temporary file left behind
    custom = write_corpus(tmp_path / "d.txt", 2, seed=5, separator="<END>").read_text()
    assert custom.count("<END>") == 2 and "<|endoftext|>" not in custom


def test_write_corpus_failure_leaves_nothing(tmp_path, monkeypatch):
    import cs336_basics.stories as stories

    def broken(n, seed):
        yield "one story"
        raise RuntimeError("disk full")

    monkeypatch.setattr(stories, "generate_stories", broken)
    with pytest.raises(RuntimeError):
        write_corpus(tmp_path / "c.txt", 5)
    assert list(tmp_path.iterdir()) == []


def test_negative_count_rejected():
    with pytest.raises(ValueError):
        list(generate_stories(-1))


def test_command_line(tmp_path, capsys):
    from cs336_basics.stories import main

    assert main([str(tmp_path / "s.txt"), "--num-stories", "3", "--seed", "2"]) == 0
    assert (tmp_path / "s.txt").read_text().count("<|endoftext|>") == 3
    assert "✓ Wrote 3 stories" in capsys.readouterr().out
