"""Data-parallel training on CPU with gloo, in two launches of 2 processes each (process start-up dominates):

1. the real command line, ``torchrun --nproc-per-node 2 cs336_basics/train.py ...``, for 8 iterations;
2. this file run as 2 plain processes (RANK/WORLD_SIZE set, a file rendezvous; no launcher to start): DDP gradients
   of half batches (1 and 2 micro-batches) for comparison with one process on the whole batch, then the same
   8-iteration run stopped at 4 and resumed with ``resume=True``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tiny_run import CONTEXT, make_data, read_metrics, tiny_overrides

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "cs336_basics" / "train.py"
SCHEDULE = dict(max_iters=8, cosine_cycle_iters=8, checkpoint_interval=4, eval_interval=4)
GRAD_MODEL = dict(vocab_size=50, context_length=12, d_model=32, num_layers=2, num_heads=2, d_ff=64, rope_theta=1e4)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}


def torchrun(cwd: Path, script: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def two_workers(root: Path) -> str:
    """Run ``_worker`` in 2 processes (output to files: a full pipe must not stall one rank); rank 0's stdout."""
    procs, logs = [], []
    for r in (0, 1):
        out, err = root / f"rank{r}.out", root / f"rank{r}.err"
        with open(out, "w") as fo, open(err, "w") as fe:
            procs.append(subprocess.Popen([sys.executable, __file__, str(root)], cwd=root, stdout=fo, stderr=fe,
                                          env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"}))
        logs.append((out, err))
    for p, (out, err) in zip(procs, logs):
        assert p.wait(timeout=600) == 0, out.read_text()[-2000:] + err.read_text()[-4000:]
    return logs[0][0].read_text()


def grad_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 50, (8, 12), generator=g), torch.randint(0, 50, (8, 12), generator=g)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    make_data(root)
    cli = torchrun(root, TRAIN_SCRIPT, *tiny_overrides(root, **SCHEDULE), f"data.checkpoint_dir={root / 'full'}")
    return root, cli, two_workers(root)


@pytest.mark.slow
def test_torchrun_cli_trains_and_rank0_alone_writes(runs):
    from cs336_basics.checkpoint import read_checkpoint

    root, cli, _ = runs
    assert cli.stdout.count("Training Transformer LM") == 1  # rank 0 alone prints
    assert "processes 2" in cli.stdout and "4 per micro-batch" in cli.stdout
    ckpt = root / "full"
    assert sorted(p.name for p in ckpt.glob("*.pt")) == ["checkpoint_final.pt", "checkpoint_iter_4.pt", "checkpoint_iter_8.pt"]
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    train = read_metrics(ckpt)
    assert [r["iteration"] for r in train] == list(range(1, 9))  # one writer: no duplicated lines
    assert all(r["tokens"] == r["iteration"] * 8 * CONTEXT for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    saved = read_checkpoint(ckpt / "checkpoint_final.pt")
    assert saved["world_size"] == 2 and len(saved["rng_states"]) == 2
    assert saved["rng_states"][0]["numpy"] != saved["rng_states"][1]["numpy"]  # each rank has its own stream


@pytest.mark.slow
def test_torchrun_resume_repeats_the_uninterrupted_run_exactly(runs):
    from cs336_basics.checkpoint import read_checkpoint

    root, _, worker_stdout = runs
    assert "resumed from" in worker_stdout
    # on_checkpoint (Modal's volume commit) runs on rank 0 alone, once per checkpoint
    assert json.loads((root / "callbacks.0.json").read_text()) == ["checkpoint_iter_8.pt", "checkpoint_final.pt"]
    assert json.loads((root / "callbacks.1.json").read_text()) == []
    full, cut = read_metrics(root / "full"), read_metrics(root / "cut")
    assert [r["iteration"] for r in cut] == list(range(1, 9))
    assert [r["loss"] for r in cut] == [r["loss"] for r in full]  # bit for bit
    assert [r["val_loss"] for r in read_metrics(root / "cut", "val")] == [
        r["val_loss"] for r in read_metrics(root / "full", "val")]
    a = read_checkpoint(root / "full" / "checkpoint_final.pt")["model"]
    b = read_checkpoint(root / "cut" / "checkpoint_final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ranks_under_a_time_budget_stop_together(runs):
    from cs336_basics.checkpoint import read_checkpoint

    root, _, _ = runs
    rank0, rank1 = (json.loads((root / f"budget.{r}.json").read_text()) for r in (0, 1))
    assert rank0["status"] == rank1["status"] == "out_of_time"
    assert rank0["iterations"] == rank1["iterations"] > 2
    lrs = [r["lr"] for r in read_metrics(root / "budget")]
    assert lrs[-1] == pytest.approx(1e-3, abs=3e-4)  # min_lr as the budget ended
    assert read_checkpoint(root / "budget" / "checkpoint_final.pt")["iteration"] == rank0["iterations"]


@pytest.mark.slow
def test_two_ranks_with_half_batches_match_one_process(runs):
    from cs336_basics.config import ModelConfig
    from cs336_basics.model import TransformerLM
    from cs336_basics.train import forward_backward

    root, _, _ = runs
    x, y = grad_batch()
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(**GRAD_MODEL))  # rank 0's weights, which DDP broadcasts to rank 1
    loss = forward_backward(model, [(x, y)])
    reference = [p.grad for p in model.parameters()]
    for rank in (0, 1):
        got = torch.load(root / f"grads.{rank}.pt")
        assert all(torch.equal(w, p.detach()) for w, p in zip(got["weights"], model.parameters()))
        for accum in (1, 2):
            assert len(got[accum]) == len(reference)
            for g, ref in zip(got[accum], reference):
                torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5)
    # Each rank's loss is the mean over its own half; their average is the whole batch's loss.
    halves = [torch.load(root / f"grads.{r}.pt")["loss1"] for r in (0, 1)]
    assert float(sum(halves) / 2) == pytest.approx(float(loss), abs=1e-6)


def _worker(root: Path) -> None:
    """Body of launch 2: one process per rank; train() finds the process group already set up."""
    from cs336_basics.config import load_config
    from cs336_basics.train import close_process_group, train

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"file://{root / 'rendezvous'}", rank=rank, world_size=world)
    try:
        _ddp_gradients(root, rank, world)  # its DDP wrapper is gone when it returns
        cut = [f"data.checkpoint_dir={root / 'cut'}"]
        train(load_config(None, tiny_overrides(root, **dict(SCHEDULE, max_iters=4)) + cut))
        written = []
        train(load_config(None, tiny_overrides(root, **SCHEDULE) + cut), resume=True,
              on_checkpoint=lambda path: written.append(path.name))
        (root / f"callbacks.{rank}.json").write_text(json.dumps(written))
        # A time budget: the ranks' clocks differ, yet they must stop at the same step with the same learning rates.
        budget = tiny_overrides(root, **dict(SCHEDULE, max_iters=10**6, checkpoint_interval=10**6, eval_interval=10**6,
                                             max_time="3s"))
        result = train(load_config(None, budget + [f"data.checkpoint_dir={root / 'budget'}"]))
        (root / f"budget.{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # no rank tears down its connections while another still uses them
    finally:
        close_process_group()


def _ddp_gradients(root: Path, rank: int, world: int) -> None:
    """Gradients of DDP on this rank's half batch, with 1 and 2 micro-batches, saved to grads.RANK.pt."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cs336_basics.config import ModelConfig
    from cs336_basics.model import TransformerLM
    from cs336_basics.train import forward_backward

    torch.manual_seed(rank)  # a different init per rank: DDP must broadcast rank 0's weights
    model = TransformerLM(ModelConfig(**GRAD_MODEL))
    ddp = DDP(model)
    x, y = grad_batch()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    result = {"weights": [p.detach().clone() for p in model.parameters()]}
    for accum in (1, 2):  # accum 2 takes the no_sync path for the first micro-batch
        model.zero_grad(set_to_none=True)
        result[f"loss{accum}"] = forward_backward(ddp, list(zip(xs.chunk(accum), ys.chunk(accum))))
        result[accum] = [p.grad.clone() for p in model.parameters()]
    torch.save(result, root / f"grads.{rank}.pt")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
