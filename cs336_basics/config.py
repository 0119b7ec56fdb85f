"""Training configuration: typed dataclasses loaded from YAML, with dotted command-line overrides.

``load_config("cs336_basics/config.yaml", ["training.batch_size=16"])`` gives a :class:`Config`. Every key is
checked: an unknown or misspelt key is an error naming it (with the closest valid key), and values are coerced to
the field's type, so ``max_lr: 3e-4`` (a *string* to YAML 1.1) becomes the float 0.0003. ``cfg.model`` is the
:class:`ModelConfig` that builds the model (``TransformerLM(cfg.model)``); checkpoints store it as a dict and
rebuild it with ``ModelConfig(**saved)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from cs336_basics.common import UserError

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "config.yaml"
PRESETS_DIR = Path(__file__).resolve().parent / "presets"  # the assignment's runs, as config files

ATTENTION_IMPLS = ("sdpa", "reference")
DTYPES = ("auto", "float32", "bfloat16")
MODEL_CHOICES = {  # ablation switches: the first choice is the CS336 architecture
    "norm": ("rmsnorm", "none"),
    "norm_position": ("pre", "post"),
    "position_embedding": ("rope", "none"),
    "ffn": ("swiglu", "silu"),
    "attention_impl": ATTENTION_IMPLS,
}


class ConfigError(UserError):
    """A bad configuration file or override; the message is one line that says how to fix it."""


@dataclass
class ModelConfig:
    """The one description of a Transformer LM: ``TransformerLM(ModelConfig(...))``; checkpoints store its fields.

    The ablation switches default to the CS336 architecture (pre-norm RMSNorm, RoPE, SwiGLU).
    """

    vocab_size: int = 10000
    context_length: int = 1024
    d_model: int = 512
    num_layers: int = 6
    num_heads: int = 8
    d_ff: int | None = None  # None: SwiGLU 8/3 d_model rounded down to a multiple of 64 (1344 for 512); SiLU 4 d_model
    rope_theta: float = 10000.0
    attention_impl: str = "sdpa"
    norm: str = "rmsnorm"  # rmsnorm | none
    norm_position: str = "pre"  # pre | post
    position_embedding: str = "rope"  # rope | none (NoPE)
    ffn: str = "swiglu"  # swiglu | silu (ungated, two matrices)

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model, self.ffn)


def default_d_ff(d_model: int, ffn: str) -> int:
    """SwiGLU: 8/3 d_model rounded down to a multiple of 64 (at least 64); SiLU: 4 d_model (same parameter count)."""
    if ffn == "silu":
        return 4 * d_model
    return max(64, (8 * d_model // 3) // 64 * 64)


@dataclass
class TrainingConfig:
    """Optimisation, schedule, logging and hardware settings."""

    batch_size: int = 32  # sequences per optimizer step, summed over all ranks and accumulation steps
    max_iters: int = 100000
    max_lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_iters: int = 1000
    cosine_cycle_iters: int | None = None  # None: max_iters
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global L2 norm of the gradients; 0 disables clipping
    gradient_accumulation_steps: int = 1
    eval_interval: int = 1000
    eval_batches: int = 20
    log_interval: int = 100
    checkpoint_interval: int = 5000
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16
    compile: bool = False
    max_time: str | None = None  # a time budget such as 90m or 1h30m: stop and decay the lr to min_lr within it

    @property
    def max_time_s(self) -> float | None:
        """``max_time`` in seconds (None: no budget)."""
        return None if self.max_time is None else parse_duration(self.max_time)

    @property
    def lr_cycle_iters(self) -> int:
        """Iterations of the cosine decay (``cosine_cycle_iters``, or ``max_iters`` when unset)."""
        return self.max_iters if self.cosine_cycle_iters is None else self.cosine_cycle_iters


@dataclass
class DataConfig:
    """Where data, checkpoints and the tokenizer live.

    ``train_path``/``val_path`` are relative to ``data_dir`` unless absolute; ``data_dir``, ``checkpoint_dir`` and
    ``tokenizer_dir`` are relative to the working directory unless absolute.
    """

    data_dir: str = "data"
    train_path: str = "train.bin"
    val_path: str = "val.bin"
    checkpoint_dir: str = "checkpoints"
    tokenizer_dir: str = "tokenizer"

    @property
    def train_file(self) -> Path:
        return Path(self.data_dir) / self.train_path

    @property
    def val_file(self) -> Path:
        return Path(self.data_dir) / self.val_path


@dataclass
class WandbConfig:
    """Weights & Biases destination (used only with ``--wandb``)."""

    project: str = "cs336-basics"
    entity: str | None = None
    group: str | None = None  # W&B run group (a sweep puts its runs in one group)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    source: str | None = field(default=None, compare=False, repr=False)  # file it was loaded from, for messages


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (None: the packaged ``config.yaml``), apply ``section.key=value`` overrides, validate."""
    path = DEFAULT_CONFIG_PATH if path is None else Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found: pass --config-path with an existing YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (invalid byte 0x{exc.object[exc.start]:02x} at byte "
                          f"{exc.start}): save it as UTF-8, or pass the YAML config with --config-path") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {path} is a folder: pass a YAML file with --config-path") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{line}: {problem}; fix the YAML syntax") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected sections model/training/data/wandb at top level, got {type(raw).__name__}")
    overridden = {_apply_override(raw, item): item for item in overrides}
    return config_from_dict(raw, source=_display_path(path), overridden=overridden)


def preset_names() -> list[str]:
    """The packaged presets (``cs336_basics/presets/NAME.yaml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def config_path(config_path: str | None = None, preset: str | None = None) -> str | None:
    """The config file for ``--config-path`` or ``--preset`` (None: the packaged default); ConfigError for both or
    an unknown preset."""
    if not preset:
        return config_path or None
    if config_path:
        raise ConfigError(f"--preset {preset} and --config-path {config_path}: give one of them (a preset is a config "
                          "file; add overrides on top instead)")
    path = PRESETS_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"--preset {preset}: no such preset; choose one of {', '.join(preset_names())}")
    return str(path)


def config_from_dict(raw: dict[str, Any], source: str = "config", overridden: dict[str, str] | None = None) -> Config:
    """Build and validate a :class:`Config` from nested dicts (e.g. a checkpoint's ``config``).

    ``overridden`` maps ``section.key`` to the command-line override that set it, so errors blame the override.
    """
    hints = typing.get_type_hints(Config)
    sections = [name for name in hints if name != "source"]
    built = {}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section {name!r}{_suggest(name, sections)}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping of key: value, got {value!r}")
        built[name] = _build_section(hints[name], value, source, name)
    cfg = Config(**built, source=source)
    _validate(cfg, source, overridden or {})
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Nested plain dict (tuples as lists) for checkpoints, W&B and YAML; inverse of :func:`config_from_dict`."""
    out = asdict(cfg)
    del out["source"]
    out["training"]["betas"] = list(out["training"]["betas"])
    return out


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter messages)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Set ``section.key=value`` in ``raw`` (the value coerced to the field's type); return ``section.key``."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. training.batch_size=16")
    section, name = parts
    sections = typing.get_type_hints(Config)
    sections.pop("source")
    if section not in sections:
        raise ConfigError(f"override {item!r}: unknown section {section!r}{_suggest(section, sections)}")
    hints = typing.get_type_hints(sections[section])
    if name not in hints:
        raise ConfigError(f"override {item!r}: unknown key {key}{_suggest(name, hints, section + '.')}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # e.g. an unquoted path with a colon; the field's type decides
    try:
        value = _coerce(value, hints[name], key)
    except ConfigError as exc:
        raise ConfigError(f"override {item!r}: {exc}") from None
    target = raw.setdefault(section, {})
    if target is None:
        target = raw[section] = {}
    if not isinstance(target, dict):
        raise ConfigError(f"override {item!r}: section {section!r} is not a mapping in the config file")
    target[name] = value
    return f"{section}.{name}"


def _build_section(cls: type, values: dict[str, Any], source: str, section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{source}: unknown key {section}.{key}{_suggest(key, names, f'{section}.')}")
        try:
            kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` to the type ``hint`` or raise a one-line ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} numbers, e.g. [0.9, 0.95]; got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip().replace("_", ""))
            except ValueError:
                raise ConfigError(f"{key} must be an integer, got {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value.strip().replace("_", "") if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number (e.g. 3e-4), got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module, not user input


def _suggest(name: str, valid: Iterable[str], prefix: str = "") -> str:
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return f"; valid choices: {', '.join(prefix + v for v in valid)}"


def _validate(cfg: Config, source: str, overridden: dict[str, str]) -> None:
    """Raise a ConfigError for the first bad value, blaming the override that set it, else ``source``."""
    m, t = cfg.model, cfg.training

    def need(ok: bool, message: str, *keys: str) -> None:
        if not ok:
            given = [overridden[k] for k in keys if k in overridden]
            where = f"override {given[0]!r}" if given else source
            raise ConfigError(f"{where}: {message}")

    for section, obj in (("model", m), ("training", t)):
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), f"{section}.{f.name}"
            if isinstance(value, float):
                need(math.isfinite(value), f"{key} must be a finite number, got {value}", key)
            positive = f.name not in ("warmup_iters", "seed", "grad_clip", "weight_decay", "min_lr")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and positive:
                need(value > 0, f"{key} must be > 0, got {value}", key)
    need(m.d_model % m.num_heads == 0, f"model.d_model={m.d_model} must be divisible by model.num_heads={m.num_heads}",
         "model.d_model", "model.num_heads")
    need((m.d_model // m.num_heads) % 2 == 0,
         f"model.d_model / model.num_heads must be even for RoPE, got {m.d_model // m.num_heads}",
         "model.d_model", "model.num_heads")
    for key, choices in MODEL_CHOICES.items():
        need(getattr(m, key) in choices, f"model.{key} must be one of {', '.join(choices)}; got {getattr(m, key)!r}",
             f"model.{key}")
    for key in ("warmup_iters", "seed", "grad_clip", "weight_decay", "min_lr"):
        need(getattr(t, key) >= 0, f"training.{key} must be >= 0, got {getattr(t, key)}", f"training.{key}")
    need(t.min_lr <= t.max_lr, f"training.min_lr={t.min_lr} must not exceed training.max_lr={t.max_lr}",
         "training.min_lr", "training.max_lr")
    need(all(0 <= b < 1 for b in t.betas), f"training.betas must each be in [0, 1), got {list(t.betas)}",
         "training.betas")
    need(t.dtype in DTYPES, f"training.dtype must be one of {', '.join(DTYPES)}; got {t.dtype!r}", "training.dtype")
    device = t.device.split(":")[0]
    need(device in ("auto", "cpu", "cuda", "mps"), f"training.device must be auto, cpu, cuda, cuda:N or mps; "
         f"got {t.device!r}", "training.device")
    if t.max_time is not None:
        try:
            parse_duration(t.max_time)
        except ValueError as exc:
            need(False, f"training.max_time: {exc}", "training.max_time")
    split_keys = ("training.batch_size", "training.gradient_accumulation_steps")
    given = [overridden[k] for k in split_keys if k in overridden]
    check_batch_split(t.batch_size, 1, t.gradient_accumulation_steps, f"override {given[0]!r}" if given else source)


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str | float | int) -> float:
    """Seconds in a duration such as '90m', '1h30m', '45m', '2h', '3600s' or a plain number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        spec = str(text).strip().lower().replace(" ", "")
        match = _DURATION.fullmatch(spec)
        if spec and match and any(match.groups()):
            h, m, sec = (float(g) if g else 0.0 for g in match.groups())
            seconds = h * 3600 + m * 60 + sec
        else:
            try:
                seconds = float(spec)
            except ValueError:
                raise ValueError(f"{text!r} is not a duration: write it like 90m, 1h30m, 45m or 3600s") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{text!r} must be a positive duration, e.g. 90m")
    return seconds


def check_batch_split(batch_size: int, processes: int, accumulation: int, source: str = "config") -> int:
    """Sequences per micro-batch, or a ConfigError when ``batch_size`` does not split evenly.

    ``training.batch_size`` counts sequences per optimizer step over all ``processes`` (GPUs under torchrun) and
    ``accumulation`` steps; each process runs ``batch_size / (processes * accumulation)`` at a time.
    """
    parts = processes * accumulation
    if batch_size % parts:
        lower, upper = batch_size // parts * parts, (batch_size // parts + 1) * parts
        who = f"{processes} process(es) x {accumulation} accumulation step(s)" if processes > 1 else \
            f"training.gradient_accumulation_steps={accumulation}"
        raise ConfigError(f"{source}: training.batch_size={batch_size} must be divisible by {who}: "
                          f"use a multiple of {parts}, e.g. training.batch_size={upper if lower == 0 else lower}")
    return batch_size // parts
