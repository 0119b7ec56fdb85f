"""Checkpoint save/load roundtrips, atomic writes, wrapper-prefix stripping and load_model."""

from __future__ import annotations

import io
import os

import pytest
import torch

from cs336_basics.checkpoint import load_checkpoint, load_model, read_checkpoint, save_checkpoint
from cs336_basics.model import TransformerLM
from cs336_basics.optimizer import AdamW

CFG = dict(vocab_size=50, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=24, rope_theta=10000.0)


def _trained(seed=0):
    torch.manual_seed(seed)
    model = TransformerLM(**CFG)
    opt = AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 50, (2, 8))
    for _ in range(2):
        opt.zero_grad()
        model(ids).square().mean().backward()
        opt.step()
    return model, opt, ids


def _assert_same(model_a, model_b, opt_a=None, opt_b=None):
    for (ka, a), (kb, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    if opt_a is not None:
        sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(sa[i][k], sb[i][k])


@pytest.mark.parametrize("via", ["path", "bytesio"])
def test_roundtrip_restores_model_optimizer_iteration_and_extras(tmp_path, via):
    model, opt, ids = _trained()
    target = tmp_path / "sub" / "ckpt.pt" if via == "path" else io.BytesIO()
    save_checkpoint(model, opt, 123, target, config={"model": CFG}, wandb_run_id="abc")
    if via == "bytesio":
        target.seek(0)
    fresh, _, _ = _trained(seed=1)
    fresh_opt = AdamW(fresh.parameters(), lr=1e-2)
    assert load_checkpoint(target, fresh, fresh_opt) == 123
    _assert_same(model, fresh, opt, fresh_opt)
    if via == "bytesio":
        target.seek(0)
    ckpt = read_checkpoint(target)
    assert set(ckpt) == {"model", "optimizer", "iteration", "config", "wandb_run_id"}
    assert ckpt["wandb_run_id"] == "abc" and ckpt["iteration"] == 123
    # both continue identically
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.zero_grad()
        m(ids).square().mean().backward()
        o.step()
    _assert_same(model, fresh, opt, fresh_opt)


def test_path_save_is_atomic(tmp_path, monkeypatch):
    model, opt, _ = _trained()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, opt, 1, path)
    good = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, opt, 2, path)
    assert path.read_bytes() == good  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # and no temporary file is left behind


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module."])
def test_prefixed_state_dicts_load_into_plain_model(tmp_path, prefix):
    """Simulates checkpoints written from torch.compile / DDP wrapped models (no compile in tests)."""
    model, opt, _ = _trained()
    prefixed = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"model": prefixed, "optimizer": opt.state_dict(), "iteration": 7, "config": {"model": CFG}},
               tmp_path / "c.pt")
    fresh = TransformerLM(**CFG)
    assert load_checkpoint(tmp_path / "c.pt", fresh) == 7
    _assert_same(model, fresh)
    _assert_same(model, load_model(tmp_path / "c.pt"))


def test_wrapped_models_are_unwrapped_before_saving(tmp_path):
    model, opt, _ = _trained()

    class FakeCompiled(torch.nn.Module):  # what torch.compile returns: the model under _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    wrapped = FakeCompiled(model)
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    save_checkpoint(wrapped, opt, 3, tmp_path / "c.pt")
    assert list(read_checkpoint(tmp_path / "c.pt")["model"]) == list(model.state_dict())
    target = FakeCompiled(TransformerLM(**CFG))
    load_checkpoint(tmp_path / "c.pt", target)  # loading into a wrapped model works too
    _assert_same(model, target._orig_mod)


def test_load_model_rebuilds_from_config(tmp_path):
    model, opt, ids = _trained()
    cfg = dict(CFG, attention_impl="reference")
    save_checkpoint(model, opt, 5, tmp_path / "c.pt", config={"model": cfg, "training": {"lr": 1}})
    loaded = load_model(tmp_path / "c.pt", device="cpu")
    assert isinstance(loaded, TransformerLM) and not loaded.training
    assert loaded.layers[0].attn.attention_impl == "reference"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_clear_errors(tmp_path):
    model, opt, _ = _trained()
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt", model)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        read_checkpoint(tmp_path / "junk.pt")
    save_checkpoint(model, None, 1, tmp_path / "noconf.pt")
    with pytest.raises(ValueError, match="config"):
        load_model(tmp_path / "noconf.pt")
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(tmp_path / "noconf.pt", model, opt)
