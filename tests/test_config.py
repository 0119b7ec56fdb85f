"""Config loading: packaged defaults, type coercion, overrides and one-line errors for bad keys/values."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

import pytest

from cs336_basics.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_packaged_config_has_the_workflow_values():
    cfg = load_config(None)
    assert cfg.source is not None and Path(cfg.source).name == "config.yaml"
    m, t, d = cfg.model, cfg.training, cfg.data
    assert (m.vocab_size, m.d_model, m.num_heads, m.num_layers, m.context_length) == (10000, 512, 8, 6, 1024)
    assert (m.d_ff, m.rope_theta, m.attention_impl) == (1344, 10000.0, "sdpa")
    assert (t.batch_size, t.max_iters) == (32, 100000)
    assert (d.train_path, d.val_path, d.data_dir, d.checkpoint_dir, d.tokenizer_dir) == (
        "train.bin", "val.bin", "data", "checkpoints", "tokenizer")
    assert isinstance(t.max_lr, float) and t.max_lr == 3e-4  # "3e-4" is a string to YAML 1.1
    assert isinstance(t.eps, float) and t.eps == 1e-8
    assert t.betas == (0.9, 0.95) and t.cosine_cycle_iters is None and t.lr_cycle_iters == t.max_iters
    assert (t.device, t.dtype, t.compile) == ("auto", "auto", False)
    # Every field of every section is written in the packaged YAML (the file documents them all).
    text = DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")
    for section in ("model", "training", "data", "wandb"):
        for f in fields(getattr(cfg, section)):
            assert f"  {f.name}:" in text, f"{section}.{f.name} missing from config.yaml"


def test_model_section_builds_the_model_and_resolves_d_ff():
    from cs336_basics.model import TransformerLM

    cfg = load_config(None, ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.vocab_size=50",
                             "model.context_length=8"])
    model = TransformerLM(cfg.model)
    assert model.config is cfg.model and model.vocab_size == 50 and model.context_length == 8
    assert cfg.model.d_ff == 64  # 8/3 * 32 = 85.3, rounded down to a multiple of 64 (at least 64)
    assert load_config(None).model.d_ff == 1344  # the CS336 TinyStories value for d_model 512
    assert load_config(None, ["model.ffn=silu"]).model.d_ff == 2048  # 4 * d_model
    assert load_config(None, ["model.ffn=silu", "model.d_ff=1000"]).model.d_ff == 1000  # given: kept
    assert ModelConfig(**asdict(cfg.model)) == cfg.model  # what checkpoints store rebuilds the same model


def test_ablation_switches_are_checked():
    for key, bad in (("norm", "layernorm"), ("norm_position", "sandwich"), ("position_embedding", "alibi"),
                     ("ffn", "geglu")):
        with pytest.raises(ConfigError, match=f"model.{key} must be one of"):
            load_config(None, [f"model.{key}={bad}"])


def test_round_trip_through_plain_dicts():
    cfg = load_config(None, ["training.batch_size=16", "wandb.entity=me"])
    plain = config_to_dict(cfg)
    assert set(plain) == {"model", "training", "data", "wandb"}
    assert plain["training"]["betas"] == [0.9, 0.95]  # JSON/YAML friendly
    assert config_from_dict(plain) == cfg


def test_overrides_are_coerced():
    cfg = load_config(None, [
        "training.batch_size=16", "model.d_model=256", "training.max_lr=1e-3", "training.max_iters=1e4",
        "training.compile=true", "training.betas=[0.8, 0.99]", "training.cosine_cycle_iters=500",
        "data.data_dir=/vol/data", "wandb.entity=null", "model.rope_theta=500000",
    ])
    t = cfg.training
    assert (t.batch_size, cfg.model.d_model, t.max_lr, t.max_iters, t.compile) == (16, 256, 1e-3, 10000, True)
    assert isinstance(t.max_iters, int) and isinstance(cfg.model.rope_theta, float)
    assert t.betas == (0.8, 0.99) and t.lr_cycle_iters == 500
    assert cfg.data.train_file == Path("/vol/data/train.bin") and cfg.wandb.entity is None


def test_yaml_strings_and_numbers_are_coerced(tmp_path):
    path = write(tmp_path, "training:\n  max_lr: 3e-4\n  min_lr: 0\n  batch_size: '64'\n  compile: 'yes'\n")
    t = load_config(path).training
    assert (t.max_lr, t.min_lr, t.batch_size, t.compile) == (3e-4, 0.0, 64, True)
    assert type(t.min_lr) is float and type(t.batch_size) is int
    assert load_config(path).model == ModelConfig()  # missing sections keep their defaults


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["training.batch_sise=16"], "unknown key training.batch_sise; did you mean training.batch_size?"),
        (["trainig.batch_size=16"], "unknown section 'trainig'; did you mean training?"),
        (["model.dmodel=16"], "did you mean model.d_model?"),
        (["training.max_lr=fast"], "training.max_lr must be a number"),
        (["training.batch_size=2.5"], "training.batch_size must be an integer"),
        (["training.compile=maybe"], "training.compile must be true or false"),
        (["training.betas=[0.9]"], "training.betas must be a list of 2 numbers"),
        (["batch_size=16"], "must look like section.key=value"),
        (["training.batch_size"], "must look like section.key=value"),
        (["model.d_model=100"], "model.d_model=100 must be divisible by model.num_heads=8"),
        (["training.batch_size=0"], "training.batch_size must be > 0"),
        (["training.min_lr=1", "training.max_lr=0.1"], "must not exceed"),
        (["model.attention_impl=flash"], "model.attention_impl must be one of sdpa, reference"),
        (["training.dtype=float16"], "training.dtype must be one of auto, float32, bfloat16"),
        (["training.device=tpu"], "training.device must be"),
        (["training.batch_size=30", "training.gradient_accumulation_steps=4"], "must be divisible by"),
    ],
)
def test_bad_overrides_give_one_line_errors(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_bad_files_name_the_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key model\.vocab_sise; did you mean model\.vocab_size\?"):
        load_config(write(tmp_path, "model:\n  vocab_sise: 500\n"))
    with pytest.raises(ConfigError, match=r"config\.yaml.*training\.max_iters must be an integer"):
        load_config(write(tmp_path, "training:\n  max_iters: lots\n"))
    with pytest.raises(ConfigError, match=r"config\.yaml line \d+: .*; fix the YAML syntax"):
        load_config(write(tmp_path, "model:\n  d_model: [512\n"))
    with pytest.raises(ConfigError, match="not found: pass --config-path"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        load_config(write(tmp_path, "model: 5\n"))


def test_config_defaults_match_packaged_yaml():
    # The dataclass defaults are the documented defaults, so a config file may list only what it changes.
    assert Config(source=str(DEFAULT_CONFIG_PATH)) == load_config(None)


def test_non_utf8_or_folder_config_is_one_line(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model:\n  d_model: 512  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(invalid byte 0xe9"):
        load_config(bad)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_presets_resolve_and_bad_ones_are_one_line():
    from cs336_basics.config import PRESETS_DIR, config_path

    assert config_path(None, "cpu") == str(PRESETS_DIR / "cpu.yaml")
    assert config_path("my.yaml", None) == "my.yaml" and config_path(None, None) is None
    with pytest.raises(ConfigError, match="no such preset; choose one of cpu, leaderboard, owt, tinystories"):
        config_path(None, "gpt5")
    with pytest.raises(ConfigError, match="give one of them"):
        config_path("my.yaml", "cpu")
