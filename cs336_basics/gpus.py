"""The one table of GPU facts: Modal's GPU names, their limits and prices, and each chip's peak FLOP/s; and MFU.

``parse_gpu_spec("H100:8")`` / ``parse_gpu_spec("H100,A100-80GB")`` checks a ``--gpu`` value against what Modal
documents (names, GPUs per container, fallback lists). ``peak_flops(torch.cuda.get_device_name(), "bf16")`` gives
the dense peak of the GPU torch sees (None for a device not in the table), and ``mfu(...)`` the model FLOPs
utilisation: the model's FLOPs per token x tokens per second / peak FLOP/s.

Peaks are dense (no 2:4 sparsity) tensor-core figures from NVIDIA's datasheets (which print the sparse figure, twice
the dense one, for tensor cores): bf16 for bfloat16 autocast, tf32 for float32 matmuls with
``torch.set_float32_matmul_precision("high")`` (what train.py sets on CUDA), fp32 for plain CUDA-core float32.
Prices are Modal's list prices per GPU-hour, recorded on the date in ``PRICES_AS_OF``; CPU and memory are billed on
top, by the second. Check https://modal.com/pricing before relying on them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cs336_basics.common import UserError

PRICES_AS_OF = "2025"  # Modal's list prices as recorded in 2025 from https://modal.com/pricing; re-check there
PRECISIONS = ("bf16", "tf32", "fp32")


class GPUSpecError(UserError):
    """A ``--gpu`` value Modal would not accept; the message lists the valid ones."""


@dataclass(frozen=True)
class Chip:
    """A GPU model as torch names it, with its dense peak TFLOP/s (None: not published / not supported)."""

    name: str
    pattern: str  # regex searched in torch.cuda.get_device_name(), lower-cased
    bf16: float | None
    tf32: float | None
    fp32: float | None


# Ordered: the first pattern that matches wins (so "H100 PCIe" is tried before plain "H100").
CHIPS = (
    # NVIDIA T4 datasheet: FP32 8.1 TFLOPS; no bf16 or tf32 tensor cores (Turing).
    Chip("T4", r"\bt4\b", None, None, 8.1),
    # NVIDIA L4 datasheet: BF16 tensor 242 TFLOPS sparse, TF32 120 sparse, FP32 30.3.
    Chip("L4", r"\bl4\b", 121.0, 60.0, 30.3),
    # NVIDIA publishes no A10G datasheet (an AWS variant of the A10); the A10's figures are used for it.
    # NVIDIA A10 datasheet: BF16 tensor 250 TFLOPS sparse, TF32 125 sparse, FP32 31.2.
    Chip("A10G", r"\ba10g\b", 125.0, 62.5, 31.2),
    Chip("A10", r"\ba10\b", 125.0, 62.5, 31.2),
    # NVIDIA L40S datasheet: BF16 tensor 733 TFLOPS sparse (362.05 dense), TF32 366 sparse, FP32 91.6.
    Chip("L40S", r"\bl40s\b", 362.05, 183.0, 91.6),
    # NVIDIA A100 datasheet (40 GB and 80 GB, SXM and PCIe): BF16 tensor 312 TFLOPS, TF32 156, FP32 19.5.
    Chip("A100", r"\ba100\b", 312.0, 156.0, 19.5),
    # NVIDIA H100 datasheet: PCIe BF16 1,513 sparse, TF32 756 sparse, FP32 51; NVL BF16 1,671, TF32 835, FP32 60;
    # SXM ("H100 80GB HBM3", what Modal runs) BF16 1,979 sparse, TF32 989 sparse, FP32 67.
    Chip("H100 PCIe", r"\bh100\b.*\bpcie\b", 756.5, 378.0, 51.0),
    Chip("H100 NVL", r"\bh100\b.*\bnvl\b", 835.5, 417.5, 60.0),
    Chip("H100 SXM", r"\bh100\b", 989.5, 494.5, 67.0),
    # NVIDIA H200 datasheet: NVL BF16 1,671 sparse, TF32 835, FP32 60; SXM BF16 1,979 sparse, TF32 989, FP32 67.
    Chip("H200 NVL", r"\bh200\b.*\bnvl\b", 835.5, 417.5, 60.0),
    Chip("H200", r"\bh200\b", 989.5, 494.5, 67.0),
    # NVIDIA HGX B200 datasheet, per GPU (8 per board): FP16/BF16 36 PFLOPS sparse / 8, TF32 18 / 8, FP32 600 / 8.
    Chip("B200", r"\bb200\b", 2250.0, 1125.0, 75.0),
)


@dataclass(frozen=True)
class ModalGPU:
    """A GPU type as ``@app.function(gpu=...)`` names it (https://modal.com/docs/guide/gpu)."""

    name: str
    chip: str | None  # the CHIPS entry it runs on (None: no datasheet figures in this table)
    max_count: int  # GPUs per container
    memory_gb: int
    usd_per_hour: float | None  # per GPU, as of PRICES_AS_OF
    note: str = ""


MODAL_GPUS = (
    ModalGPU("T4", "T4", 8, 16, 0.59),
    ModalGPU("L4", "L4", 8, 24, 0.80),
    ModalGPU("A10", "A10", 4, 24, 1.10),
    ModalGPU("A10G", "A10G", 4, 24, 1.10, "the default"),
    ModalGPU("L40S", "L40S", 8, 48, 1.95),
    ModalGPU("A100", "A100", 8, 40, 2.10, "40 GB; Modal may give an 80 GB one at the same price"),
    ModalGPU("A100-40GB", "A100", 8, 40, 2.10),
    ModalGPU("A100-80GB", "A100", 8, 80, 2.50),
    ModalGPU("RTX-PRO-6000", None, 8, 96, None, "price and peaks not in this table"),
    ModalGPU("H100", "H100 SXM", 8, 80, 3.95, "Modal may run it on an H200 at the H100 price"),
    ModalGPU("H100!", "H100 SXM", 8, 80, 3.95, "an H100, never upgraded"),
    ModalGPU("H200", "H200", 8, 141, 4.54),
    ModalGPU("B200", "B200", 8, 180, 6.25),
    ModalGPU("B200+", "B200", 8, 180, 6.25, "a B200 or a B300, billed as a B200"),
)
_BY_NAME = {g.name.upper(): g for g in MODAL_GPUS}


def modal_gpu(name: str) -> ModalGPU:
    """The table row for a Modal GPU name (any case); GPUSpecError listing the valid names otherwise."""
    gpu = _BY_NAME.get(name.strip().upper())
    if gpu is None:
        raise GPUSpecError(f"unknown GPU {name.strip()!r}: {_VALID}")
    return gpu


_VALID = (f"use one of {', '.join(g.name for g in MODAL_GPUS)}, with :N for N GPUs in one container (e.g. H100:8), "
          "or a comma-separated fallback list (e.g. H100,A100-80GB)")


@dataclass(frozen=True)
class GPUSpec:
    """A checked ``--gpu`` value: one GPU type, or a fallback list Modal tries in order; ``count`` GPUs each."""

    choices: tuple[ModalGPU, ...]
    count: int

    @property
    def modal_value(self) -> str | list[str]:
        """What ``@app.function(gpu=...)`` takes: ``"H100:8"``, or a list for a fallback list."""
        names = [g.name if self.count == 1 else f"{g.name}:{self.count}" for g in self.choices]
        return names[0] if len(names) == 1 else names

    def __str__(self) -> str:
        value = self.modal_value
        return value if isinstance(value, str) else ",".join(value)


def parse_gpu_spec(spec: str) -> GPUSpec:
    """Check a ``--gpu`` value ("A10G", "H100:8", "H100,A100-80GB", "H100:2,A100-80GB:2"); GPUSpecError if invalid."""
    parts = [p.strip() for p in str(spec).split(",")]
    if not spec or not spec.strip() or not all(parts):
        raise GPUSpecError(f"--gpu {spec!r} names no GPU: {_VALID}")
    choices, counts = [], set()
    for part in parts:
        match = re.fullmatch(r"([A-Za-z0-9!+-]+)(?::(\d+))?", part)
        if match is None:
            raise GPUSpecError(f"--gpu {spec!r}: {part!r} is not a GPU type: {_VALID}")
        try:
            gpu = modal_gpu(match.group(1))
        except GPUSpecError:
            raise GPUSpecError(f"--gpu {spec!r}: unknown GPU {match.group(1)!r}: {_VALID}") from None
        count = int(match.group(2) or 1)
        if not 1 <= count <= gpu.max_count:
            raise GPUSpecError(f"--gpu {spec!r}: a container has 1 to {gpu.max_count} {gpu.name} GPUs, not {count}")
        choices.append(gpu)
        counts.add(count)
    if len(counts) > 1:
        raise GPUSpecError(f"--gpu {spec!r}: every GPU of a fallback list needs the same count (e.g. H100:2,A100-80GB:2)")
    if len({g.name for g in choices}) < len(choices):
        raise GPUSpecError(f"--gpu {spec!r} names a GPU twice")
    return GPUSpec(tuple(choices), counts.pop())


# ----------------------------------------------------------------------------- peaks and MFU


def chip_for(device_name: str) -> Chip | None:
    """The table entry for a ``torch.cuda.get_device_name()`` string, e.g. "NVIDIA H100 80GB HBM3"; None if unknown."""
    name = device_name.lower()
    return next((c for c in CHIPS if re.search(c.pattern, name)), None)


def precision_key(label: str) -> str:
    """"bf16" / "tf32" / "fp32" from a precision label such as train.py's "bfloat16 autocast (float32 weights)"."""
    text = label.lower()
    if "bf16" in text or "bfloat16" in text:
        return "bf16"
    if "tf32" in text:
        return "tf32"
    if "fp32" in text or "float32" in text:
        return "fp32"
    raise ValueError(f"unknown precision {label!r}: use one of {', '.join(PRECISIONS)}")


def training_precision(dtype_label: str, matmul_precision: str = "highest") -> str:
    """The peak to compare a run against: bf16 autocast -> "bf16"; float32 with TF32 matmuls ("high") -> "tf32"."""
    key = precision_key(dtype_label)
    return "tf32" if key == "fp32" and matmul_precision in ("high", "medium") else key


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one GPU at ``precision`` (bf16 / tf32 / fp32, or a label containing one); None if unknown.

    A chip without tf32 tensor cores (T4) runs "tf32" matmuls in plain fp32, so that peak is used.
    """
    chip = chip_for(device_name)
    return None if chip is None else _chip_peak(chip, precision)


def _chip_peak(chip: Chip, precision: str) -> float | None:
    key = precision_key(precision)
    tflops = (chip.tf32 if chip.tf32 is not None else chip.fp32) if key == "tf32" else getattr(chip, key)
    return None if tflops is None else tflops * 1e12


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: ``flops_per_token * tokens_per_s / (peak * num_devices)``; None when peak is unknown.

    ``tokens_per_s`` counts the tokens of all ``num_devices`` GPUs together; ``peak`` is one GPU's peak FLOP/s.
    """
    if not peak or num_devices < 1:
        return None
    return flops_per_token * tokens_per_s / (peak * num_devices)


# ----------------------------------------------------------------------------- time and cost

PLAN_MFU = (0.10, 0.35)  # the MFU band a time estimate assumes (small models rarely pass 35 %; 10 % is a slow run)


def hourly_price(gpu: ModalGPU, count: int) -> float | None:
    """US$ per hour for ``count`` GPUs of this type (GPU time only), or None when the table has no price."""
    return None if gpu.usd_per_hour is None else gpu.usd_per_hour * count


def estimate_hours(total_flops: float, gpu: ModalGPU, count: int, precision: str) -> tuple[float, float] | None:
    """(fast, slow) hours to compute ``total_flops`` on ``count`` GPUs at the PLAN_MFU band; None without a peak.

    Assumes data-parallel scaling is linear in the GPU count (close, on one machine with NVLink).
    """
    chip = next((c for c in CHIPS if c.name == gpu.chip), None)
    peak = _chip_peak(chip, precision) if chip is not None else None
    if peak is None:
        return None
    low, high = PLAN_MFU
    return total_flops / (peak * count * high) / 3600, total_flops / (peak * count * low) / 3600


def price_for(spec: GPUSpec, device_name: str | None) -> tuple[ModalGPU, float | None]:
    """The row a finished run is billed at: the first choice of ``spec`` whose chip torch saw, else the first choice.

    (Modal bills an upgraded H100 -> H200 run at the H100 price, hence the requested row when nothing matches.)
    """
    chip = chip_for(device_name) if device_name else None
    row = next((g for g in spec.choices if chip is not None and g.chip == chip.name), spec.choices[0])
    return row, hourly_price(row, spec.count)
