"""cs336_basics/gpus.py: the --gpu values Modal accepts, peak FLOP/s by torch device name, MFU, time and cost."""

from __future__ import annotations

import inspect
import re

import modal
import pytest

from cs336_basics import gpus
from cs336_basics.common import EXIT_USER_ERROR, UserError

# What Modal's GPU guide lists for `gpu=` (https://modal.com/docs/guide/gpu), with GPUs per container.
MODAL_DOCUMENTED = {"T4": 8, "L4": 8, "A10": 4, "A10G": 4, "L40S": 8, "A100": 8, "A100-40GB": 8, "A100-80GB": 8,
                    "H100": 8, "H100!": 8, "H200": 8, "B200": 8, "B200+": 8, "RTX-PRO-6000": 8}


def test_every_documented_gpu_with_its_maximum_count():
    assert {g.name: g.max_count for g in gpus.MODAL_GPUS} == MODAL_DOCUMENTED
    for name, most in MODAL_DOCUMENTED.items():
        assert gpus.parse_gpu_spec(name).modal_value == name
        assert gpus.parse_gpu_spec(f"{name.lower()}:{most}").modal_value == f"{name}:{most}"
        with pytest.raises(gpus.GPUSpecError, match=re.escape(f"1 to {most} {name} GPUs, not {most + 1}")):
            gpus.parse_gpu_spec(f"{name}:{most + 1}")


def test_fallback_lists_become_the_list_modal_takes():
    spec = gpus.parse_gpu_spec("H100, a100-80gb")
    assert spec.modal_value == ["H100", "A100-80GB"] and spec.count == 1 and str(spec) == "H100,A100-80GB"
    assert gpus.parse_gpu_spec("H100:2,A100-80GB:2").modal_value == ["H100:2", "A100-80GB:2"]
    # modal's own declaration accepts both forms
    inspect.signature(modal.App.function).bind(None, gpu=spec.modal_value)
    inspect.signature(modal.App.function).bind(None, gpu=gpus.parse_gpu_spec("H100:8").modal_value)


@pytest.mark.parametrize("bad, expected", [
    ("V100", "unknown GPU 'V100'"),
    ("A10:8", "1 to 4 A10 GPUs, not 8"),
    ("H100:0", "1 to 8 H100 GPUs, not 0"),
    ("H100:2,A100", "same count"),
    ("H100,H100", "names a GPU twice"),
    ("", "names no GPU"),
    ("H100,", "names no GPU"),
    ("A10G x2", "is not a GPU type"),
])
def test_invalid_specs_get_one_line_listing_the_valid_ones(bad, expected):
    with pytest.raises(gpus.GPUSpecError) as err:
        gpus.parse_gpu_spec(bad)
    msg = str(err.value)
    assert expected in msg and "\n" not in msg
    assert isinstance(err.value, UserError) and err.value.exit_code == EXIT_USER_ERROR
    if "unknown" in expected or "no GPU" in expected:
        assert "H100!" in msg and "B200+" in msg and "H100,A100-80GB" in msg


@pytest.mark.parametrize("device_name, chip", [
    ("Tesla T4", "T4"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA A10G", "A10G"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA A100-SXM4-40GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA B200", "B200"),
])
def test_torch_device_names_map_to_their_chip(device_name, chip):
    assert gpus.chip_for(device_name).name == chip


def test_peaks_units_precisions_and_unknown_devices():
    assert gpus.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.5e12)
    assert gpus.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16 autocast (float32 weights)") == pytest.approx(989.5e12)
    assert gpus.peak_flops("NVIDIA A100-SXM4-80GB", "tf32") == pytest.approx(156e12)
    assert gpus.peak_flops("NVIDIA A100-SXM4-80GB", "float32") == pytest.approx(19.5e12)
    assert gpus.peak_flops("Tesla T4", "tf32") == pytest.approx(8.1e12)  # no TF32 cores: plain fp32
    assert gpus.peak_flops("Tesla T4", "bf16") is None
    for unknown in ("NVIDIA GeForce RTX 4090", "NVIDIA RTX PRO 6000 Blackwell Server Edition", "cpu", ""):
        assert gpus.peak_flops(unknown, "bf16") is None
    with pytest.raises(ValueError, match="unknown precision"):
        gpus.peak_flops("NVIDIA H100 80GB HBM3", "int8")
    # every chip's dense peaks are ordered as the hardware is: bf16 >= tf32 >= fp32
    for chip in gpus.CHIPS:
        values = [v for v in (chip.bf16, chip.tf32, chip.fp32) if v is not None]
        assert values == sorted(values, reverse=True), chip.name
    assert gpus.training_precision("float32", "high") == "tf32"
    assert gpus.training_precision("float32", "highest") == "fp32"
    assert gpus.training_precision("bfloat16 autocast (float32 weights)", "high") == "bf16"


def test_mfu():
    peak = gpus.peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    # the TinyStories shape: 111.7 MFLOP per token; 400k tokens/s on one H100 is 4.5 %
    assert gpus.mfu(111.7e6, 400e3, peak) == pytest.approx(111.7e6 * 400e3 / 989.5e12)
    assert gpus.mfu(111.7e6, 800e3, peak, num_devices=2) == pytest.approx(gpus.mfu(111.7e6, 400e3, peak))
    assert gpus.mfu(111.7e6, 400e3, None) is None


def test_time_and_cost_estimates_come_from_the_table():
    a10g = gpus.modal_gpu("a10g")
    fast, slow = gpus.estimate_hours(1e18, a10g, 1, "bf16")
    low, high = gpus.PLAN_MFU
    assert fast == pytest.approx(1e18 / (125e12 * high) / 3600) and slow == pytest.approx(1e18 / (125e12 * low) / 3600)
    fast8, _ = gpus.estimate_hours(1e18, gpus.modal_gpu("H100"), 8, "bf16")
    assert fast8 == pytest.approx(1e18 / (989.5e12 * 8 * high) / 3600)
    assert gpus.estimate_hours(1e18, gpus.modal_gpu("RTX-PRO-6000"), 1, "bf16") is None
    assert gpus.hourly_price(gpus.modal_gpu("H100"), 8) == pytest.approx(8 * gpus.modal_gpu("H100").usd_per_hour)
    assert gpus.hourly_price(gpus.modal_gpu("RTX-PRO-6000"), 1) is None
    assert gpus.PRICES_AS_OF  # dated


def test_a_finished_run_is_billed_at_the_row_it_ran_on():
    spec = gpus.parse_gpu_spec("H100,A100-80GB")
    assert gpus.price_for(spec, "NVIDIA A100-SXM4-80GB")[0].name == "A100-80GB"
    assert gpus.price_for(spec, "NVIDIA H100 80GB HBM3")[0].name == "H100"
    assert gpus.price_for(spec, "NVIDIA H200")[0].name == "H100"  # upgraded: billed as requested
    assert gpus.price_for(gpus.parse_gpu_spec("A10G:2"), None)[1] == pytest.approx(2 * 1.10)


def test_modal_guide_tables_match_this_table():
    """MODAL_GUIDE.md's GPU table and cost table say what gpus.py and the launch plan say."""
    from pathlib import Path

    from cs336_basics import train_modal
    from cs336_basics.config import load_config

    guide = (Path(__file__).resolve().parent.parent / "MODAL_GUIDE.md").read_text()
    assert f"as recorded in {gpus.PRICES_AS_OF}" in guide
    listed = {}
    for row in guide.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if not row.startswith("| `") or len(cells) < 4 or not re.fullmatch(r"\d+ GB", cells[1]):
            continue
        for name in re.findall(r"`([^`]+)`", cells[0]):
            listed[name] = cells
    assert set(listed) == {g.name for g in gpus.MODAL_GPUS}
    for gpu in gpus.MODAL_GPUS:
        cells = listed[gpu.name]
        assert cells[1] == f"{gpu.memory_gb} GB" and cells[2] == f"1-{gpu.max_count}", gpu.name
        assert cells[3] == (f"${gpu.usd_per_hour:.2f}" if gpu.usd_per_hour else "not in the table"), gpu.name

    cfg = load_config(None)
    for name in ("A10G", "L40S", "A100", "H100", "B200"):
        plan = train_modal.plan_lines(cfg, gpus.parse_gpu_spec(name))[1]
        low, high = re.search(r"\$([\d.,]+) to \$([\d.,]+)", plan).groups()
        assert re.search(rf"\| `{re.escape(name)}` +\| [\d.]+-[\d.]+ h +\| \${low}-\${high} +\|", guide), (name, plan)
