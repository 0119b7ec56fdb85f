"""Runs the Modal function's body the way Modal's container does; test_modal_rehearsal.py starts it.

    python tests/modal_container.py SPEC.json

SPEC holds "root" (the folder standing in for /root: train_modal.py and the cs336_basics package, as Modal lays
them out), "volume" (the stand-in volume's committed state), "mount" (this container's copy of it), "kwargs"
(train_remote's arguments), "preempt_after_commit" (preempt the container, SIGINT to every process in it, right after
its n-th volume commit; null: never) and "poll_s" (how often the multi-GPU watcher looks for checkpoints).
Prints ``RESULT <json>`` with what the function returned.
"""

import json
import os
import signal
import sys
from pathlib import Path

spec = json.loads(Path(sys.argv[1]).read_text())
# Modal puts /root on the function's import path (not in the environment: child processes do not inherit it).
sys.path.insert(0, spec["root"])

import cs336_basics  # noqa: E402
import train_modal  # noqa: E402  as Modal imports the entry file: by module name, from /root
from fake_modal_volume import FakeVolume  # noqa: E402  this file's folder, after /root: it cannot shadow the package

if not Path(cs336_basics.__file__).resolve().is_relative_to(Path(spec["root"]).resolve()):
    sys.exit(f"cs336_basics was imported from {cs336_basics.__file__}, not from the container's /root")


def preempt(count: int) -> None:
    if count == spec["preempt_after_commit"]:
        os.killpg(0, signal.SIGINT)


volume = FakeVolume(spec["volume"]).mount(spec["mount"], after_commit=preempt)
train_modal.volume = volume  # what train_remote commits
train_modal.MOUNT = str(volume.path)
train_modal.COMMIT_POLL_S = spec["poll_s"]
result = train_modal.train_remote.local(**spec["kwargs"])
print("RESULT " + json.dumps(result), flush=True)
