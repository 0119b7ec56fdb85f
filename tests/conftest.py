import os
import sys
from pathlib import Path

# Tests must never reach the W&B servers; offline mode writes runs locally.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

sys.path.insert(0, str(Path(__file__).resolve().parent))
