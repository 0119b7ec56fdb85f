"""Checkpoint save/load roundtrips, atomic writes, wrapper-prefix stripping and load_model."""

from __future__ import annotations

import io
import os

import pytest
import torch

from cs336_basics.config import ModelConfig
from cs336_basics.checkpoint import (CheckpointError, load_checkpoint, load_model, load_model_with_info, read_checkpoint,
                                     save_checkpoint)
from cs336_basics.common import UserError
from cs336_basics.model import TransformerLM
from cs336_basics.optimizer import AdamW

CFG = dict(vocab_size=50, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=24, rope_theta=10000.0)


def _trained(seed=0):
    torch.manual_seed(seed)
    model = TransformerLM(ModelConfig(**CFG))
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
    fresh = TransformerLM(ModelConfig(**CFG))
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
    target = FakeCompiled(TransformerLM(ModelConfig(**CFG)))
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
    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.pt"):
        read_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt", model)
    for junk in (b"not a checkpoint", b"garbage\n"):  # the second reaches torch's weights-only unpickler
        (tmp_path / "junk.pt").write_bytes(junk)
        with pytest.raises(CheckpointError, match="junk.pt is not a checkpoint") as info:
            read_checkpoint(tmp_path / "junk.pt")
        assert "weights_only" not in str(info.value)  # never advise the unsafe load
    save_checkpoint(model, None, 1, tmp_path / "noconf.pt")
    with pytest.raises(CheckpointError, match="config"):
        load_model(tmp_path / "noconf.pt")
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(tmp_path / "noconf.pt", model, opt)
    assert all(issubclass(CheckpointError, c) for c in (UserError,))


def test_truncated_checkpoint_is_not_a_checkpoint(tmp_path):
    model, opt, _ = _trained()
    save_checkpoint(model, opt, 3, tmp_path / "full.pt", config={"model": CFG})
    data = (tmp_path / "full.pt").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 20):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cut.pt is not a checkpoint"):
            read_checkpoint(tmp_path / "cut.pt")


class _Payload:
    """Unpickling this would create a file: what a malicious 'checkpoint' could do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    created = tmp_path / "pwned.txt"
    torch.save({"model": {}, "iteration": 0, "config": _Payload(created)}, evil)
    for load in (read_checkpoint, load_model):
        with pytest.raises(CheckpointError, match="refused to load .*evil.pt"):
            load(evil)
    assert not created.exists()


def test_config_and_weights_that_do_not_fit_give_one_line(tmp_path):
    model, _, _ = _trained()
    save_checkpoint(model, None, 1, tmp_path / "future.pt", config={"model": {**CFG, "moe_experts": 8}})
    with pytest.raises(CheckpointError, match="keys this version does not know: moe_experts"):
        load_model(tmp_path / "future.pt")
    save_checkpoint(model, None, 1, tmp_path / "other.pt", config={"model": {**CFG, "d_model": 32}})
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "other.pt")
    assert "do not fit the model" in str(info.value) and "wrong shape" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"the weights in .*other\.pt do not fit"):  # read once, still named
        load_model_with_info(tmp_path / "other.pt")
    fresh, opt = _trained()[:2]
    with pytest.raises(CheckpointError, match=r"checkpoint .*other\.pt holds no optimizer state"):
        load_checkpoint(read_checkpoint(tmp_path / "future.pt"), fresh, opt, name=str(tmp_path / "other.pt"))
    save_checkpoint(model, None, 1, tmp_path / "bad.pt", config={"model": {**CFG, "ffn": "geglu"}})
    with pytest.raises(CheckpointError, match="ffn='geglu'"):
        load_model(tmp_path / "bad.pt")


def test_checkpoints_written_by_training_load_with_weights_only(tmp_path):
    """Everything train.py stores (RNG states, config, optimizer) passes torch's weights_only loader."""
    import json

    import numpy as np

    model, opt, _ = _trained()
    gen = np.random.default_rng(0)
    save_checkpoint(model, opt, 5, tmp_path / "c.pt", config={"model": CFG, "training": {"betas": [0.9, 0.95]}},
                    rng_states=[{"numpy": json.dumps(gen.bit_generator.state), "torch": torch.get_rng_state(),
                                 "cuda": None}], wandb_run_id=None, best_val_loss=1.5, tokenizer_sha256="ab" * 32)
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ckpt["iteration"] == 5 and ckpt["tokenizer_sha256"] == "ab" * 32
