"""A rehearsal of the Modal container, without Modal: the function's body runs in a fresh process laid out as Modal
lays it out, on a stand-in volume with Modal's commit semantics, and is preempted between two attempts.

The layout: a folder standing in for ``/root`` holds the entry file (``train_modal.py``) and the package's ``.py``
files (what ``Image.add_local_python_source`` adds); the function's process gets that folder on its import path, as
Modal's does; the Python environment has the locked dependencies but not the project (``uv sync`` in the image does
not install it). A container sees only what earlier containers committed. Each attempt is preempted with SIGINT to
every process in it right after a commit, and the next attempt must resume bit-exactly from what was committed.
(What a worker's exit code 2 or 3 does to the call, no retry, is tested with a stand-in torchrun in
test_train_modal.py; here the real torchrun shows the workers' codes reach the launcher.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from cs336_basics import modal_utils as mu
from cs336_basics.checkpoint import read_checkpoint
from cs336_basics.data import metadata_path
from fake_modal_volume import FakeVolume

PROJECT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "modal_container.py"
VOCAB = 64


def _config(**training) -> dict:
    values = dict(batch_size=4, max_iters=8, warmup_iters=1, eval_interval=4, eval_batches=1, log_interval=2,
                  checkpoint_interval=2, device="cpu", dtype="float32", seed=5)
    values.update(training)
    return {"model": {"vocab_size": VOCAB, "context_length": 16, "d_model": 32, "num_layers": 1, "num_heads": 2,
                      "d_ff": 64},
            "training": values, "data": {"train_path": "train.bin", "val_path": "val.bin"}}


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """(the folder standing in for /root, a python without the project installed, a folder for the rest)."""
    base = tmp_path_factory.mktemp("modal")
    root = base / "root"

    def not_added(folder, names):  # add_local_python_source adds .py files, no dot-files or caches
        return [n for n in names if n.startswith(".") or n == "__pycache__" or
                (Path(folder, n).is_file() and not n.endswith(".py"))]

    shutil.copytree(PROJECT / "cs336_basics", root / "cs336_basics", ignore=not_added)
    shutil.copy(PROJECT / "cs336_basics" / "train_modal.py", root / "train_modal.py")

    env = base / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=300)
    (site,) = (env / "lib").glob("python*/site-packages")
    # The dependencies' folder only: its .pth files (the project's editable install among them) are not processed.
    (site / "locked_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = env / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import numpy, yaml; import cs336_basics"], cwd=base,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode != 0 and "No module named 'cs336_basics'" in probe.stderr, probe.stderr
    return root, python, base


def make_volume(base: Path, name: str) -> FakeVolume:
    """A stand-in volume holding train.bin / val.bin (and their metadata), as uploaded by modal_utils."""
    data = base / f"{name}-data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train.bin", 6000), ("val.bin", 1500)):
        ((np.arange(n) * 7 + rng.integers(0, 3, n)) % VOCAB).astype(np.uint16).tofile(data / split)
        metadata_path(data / split).write_text(json.dumps({
            "format_version": 1, "dtype": "uint16", "vocab_size": VOCAB, "num_tokens": n,
            "special_tokens": ["<|endoftext|>"], "source": {"name": split, "size_bytes": n}, "tokenizer_sha256": "x"}))
    vol = FakeVolume(base / name)
    for split in ("train.bin", "val.bin"):
        mu.upload(vol, data / split, split, "data")
    return vol


class Container:
    """One attempt of the Modal call, in its own process group (a container)."""

    count = 0

    def __init__(self, layout, vol: FakeVolume, kwargs: dict, *, cwd: Path, preempt_after_commit: int | None = None):
        root, python, base = layout
        Container.count += 1
        name = f"container{Container.count}"
        spec = {"root": str(root), "volume": str(vol.root), "mount": str(base / name / "vol"), "kwargs": kwargs,
                "preempt_after_commit": preempt_after_commit, "poll_s": 0.05}
        (base / name).mkdir()
        spec_file = base / name / "spec.json"
        spec_file.write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("MODAL_")}
        env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", MODAL_SERVER_URL="http://127.0.0.1:9")
        self.log = base / name / "log.txt"
        with open(self.log, "w") as out:
            proc = subprocess.Popen([str(python), str(DRIVER), str(spec_file)], cwd=cwd, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                self.returncode = proc.wait(timeout=600)
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the container
                except ProcessLookupError:
                    pass
        self.output = self.log.read_text()
        lines = [line for line in self.output.splitlines() if line.startswith("RESULT ")]
        self.result = json.loads(lines[-1][len("RESULT "):]) if lines else None


def checkpoints(vol: FakeVolume) -> list[str]:
    return sorted(p.name for p in (vol.root / "checkpoints").glob("*.pt"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the resumed run differs from the uninterrupted one"


def reference_run(base: Path, name: str, config: dict, nproc: int) -> tuple[FakeVolume, dict]:
    """The same run uninterrupted, from this process (torch on one thread, as in the containers): the reference."""
    from cs336_basics import train_modal

    vol = make_volume(base, name)
    mounted = vol.mount(base / f"{name}-mount")
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # torchrun's workers
    try:
        result = train_modal.run_training(mounted.path, config, commit=mounted.commit, launch_id="ref", nproc=nproc,
                                          poll_s=0.05)
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
    return vol, result


def _kwargs(config: dict, launch_id: str, nproc: int) -> dict:
    return dict(config=config, source="rehearsal", wandb=False, run_name=None, resume=False, launch_id=launch_id,
                nproc=nproc, gpu="A10G" if nproc == 1 else f"H100:{nproc}")


def test_single_gpu_container_is_preempted_and_the_retry_resumes_bit_exactly(layout):
    root, _, base = layout
    config = _config()
    reference_vol, reference = reference_run(base, "single-reference", config, 1)
    assert reference["iterations"] == 8

    vol = make_volume(base, "single")
    first = Container(layout, vol, _kwargs(config, "launch", 1), cwd=root, preempt_after_commit=2)
    assert first.returncode != 0 and first.result is None and "KeyboardInterrupt" in first.output
    assert checkpoints(vol) == ["checkpoint_iter_2.pt"]  # committed: the claim (1), checkpoint_iter_2 (2)

    second = Container(layout, vol, _kwargs(config, "launch", 1), cwd=root)
    assert second.returncode == 0, second.output[-3000:]
    assert second.result["resumed"] is True and second.result["attempts"] == 2 and second.result["iterations"] == 8
    assert "restarted by Modal (attempt 2): continuing from" in second.output
    assert_same_weights(vol.root / "checkpoints" / "checkpoint_final.pt",
                        reference_vol.root / "checkpoints" / "checkpoint_final.pt")
    assert second.result["final_val_loss"] == reference["final_val_loss"]


def test_two_process_torchrun_container_is_preempted_and_the_retry_resumes_bit_exactly(layout):
    """torchrun's workers find the package through the launcher's PYTHONPATH alone: the container's working
    directory is not the folder holding it (Modal does not promise one; an image may set its own)."""
    root, _, base = layout
    elsewhere = base / "workdir"
    elsewhere.mkdir()
    # The launcher's watcher thread commits what the workers wrote; it must get to run between the first checkpoint
    # and the last, or the "preempted" attempt has already finished: seconds of training after the first checkpoint
    # (0.3 s was too short on a loaded machine: the whole run was in the watcher's first commit).
    config = _config(batch_size=8, max_iters=240, checkpoint_interval=40, eval_interval=80, log_interval=40)
    reference_vol, reference = reference_run(base, "ddp-reference", config, 2)
    assert reference["iterations"] == 240

    vol = make_volume(base, "ddp")
    first = Container(layout, vol, _kwargs(config, "launch", 2), cwd=elsewhere, preempt_after_commit=2)
    assert first.returncode != 0 and first.result is None, first.output[-3000:]
    kept = checkpoints(vol)
    assert kept and "checkpoint_final.pt" not in kept, kept  # preempted mid-run, some checkpoint committed

    second = Container(layout, vol, _kwargs(config, "launch", 2), cwd=elsewhere)
    assert second.returncode == 0, second.output[-3000:]
    assert second.result["resumed"] is True and second.result["attempts"] == 2 and second.result["iterations"] == 240
    assert "restarted by Modal (attempt 2): continuing from" in second.output
    # each worker ran train.py's main and recorded its exit code where the launcher reads it (torchrun exits 1
    # whatever its workers' codes: these records are how a user error or divergence avoids a retry)
    assert "torchrun exited with code 0; its workers with [0, 0]" in second.output
    assert_same_weights(vol.root / "checkpoints" / "checkpoint_final.pt",
                        reference_vol.root / "checkpoints" / "checkpoint_final.pt")


def test_sweep_runs_in_their_own_containers_and_the_last_one_completes_the_table(layout):
    """Two runs of a sweep, each in a container laid out as Modal lays it out (only the package's .py files):
    the diverging one is a result, not a retry, and the container ending last leaves the whole table in the volume."""
    root, _, base = layout
    vol = make_volume(base, "sweep")
    axes = [["training.max_lr", ["1e-2", "1e6"]]]
    codes = {}
    for lr, name in (("1e-2", "max_lr=1e-2"), ("1e6", "max_lr=1e6")):
        config = _config(max_lr=float(lr), grad_clip=0.0, warmup_iters=0, max_iters=6, checkpoint_interval=2)
        config["wandb"] = {"group": "lr"}
        sweep = {"name": "lr", "axes": axes, "run": name, "started_at": None, "command": ["modal", "run", "x"]}
        kwargs = {**_kwargs(config, f"launch-{name}", 1), "run_name": name, "resume": True, "sweep": sweep}
        container = Container(layout, vol, kwargs, cwd=root)
        assert container.returncode == 0, container.output[-3000:]
        codes[name] = container.result["row"]["status"]
    assert codes == {"max_lr=1e-2": "finished", "max_lr=1e6": "diverged"}
    folder = vol.root / "checkpoints" / "sweeps" / "lr"
    table = json.loads((folder / "sweep.json").read_text())
    assert [(r["name"], r["status"]) for r in table["runs"]] == [("max_lr=1e-2", "finished"), ("max_lr=1e6", "diverged")]
    assert table["best"] == "max_lr=1e-2" and (folder / "curves.png").stat().st_size > 1000
    for name, status in codes.items():
        record = json.loads((folder / name / "run.json").read_text())
        assert record["status"] == status and record["sweep"]["values"] == {"training.max_lr": name.split("=")[1]}
