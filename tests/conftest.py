import os
import sys
from pathlib import Path

import pytest
import torch

# Tests must never reach the W&B servers; offline mode writes runs locally.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster on a shared, loaded CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A working folder holding the tiny training corpus (tiny_run.make_data), as the current directory."""
    from tiny_run import make_data

    make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path
