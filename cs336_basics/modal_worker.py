"""What torchrun runs in each process of a multi-GPU Modal run: train.py's main, its exit code also recorded.

    python -m torch.distributed.run --nproc-per-node N -m cs336_basics.modal_worker [train.py arguments]

torchrun exits 1 whatever its workers' exit codes were, so train_modal could not tell a user error (2) or a diverged
run (3), which a retry only repeats, from a crash worth retrying. Each worker therefore writes its code to
``$CS336_TORCHRUN_STATUS_DIR/rank<RANK>``. A worker that crashes (or is killed) writes nothing. This module does not
import modal, so the workers start as fast as ``-m cs336_basics.train`` would.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

STATUS_ENV = "CS336_TORCHRUN_STATUS_DIR"


def main(argv: list[str] | None = None) -> int:
    from cs336_basics.train import main as train_main

    code = train_main(argv)
    status = os.environ.get(STATUS_ENV)
    if status:
        Path(status, f"rank{os.environ.get('RANK', '0')}").write_text(str(code))
    return code


def exit_codes(status_dir: str | os.PathLike) -> list[int]:
    """The exit codes the workers recorded, by rank (a crashed or killed worker records none)."""
    files = sorted(Path(status_dir).glob("rank*"), key=lambda p: int(p.name[4:]))
    return [int(p.read_text()) for p in files]


if __name__ == "__main__":
    sys.exit(main())
