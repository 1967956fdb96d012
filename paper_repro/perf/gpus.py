"""The GPUs the suite knows, in one table: plan's name, the device-name pattern, the dense peak.

bench divides its achieved FLOP/s by this peak (`mfu_datasheet`), plan divides FLOPs by peak × that
MFU (GPU-hours), gpucheck names the card it measured: one table, so an MFU measured on a card is
applied against the same card's peak (an H100 PCIe's MFU against 756, not the SXM's 989.4).
Peaks are dense tensor-core TFLOP/s (performance.md §1; datasheets print 2:4-sparse figures), in
bf16, except the V100, which has no bf16: its fp16 peak. A device matches at most one entry (the
patterns exclude each other, a test checks it on each entry's example name); a card no entry
matches (an H100 NVL, a V100S) has no peak rather than a wrong one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Gpu:
    name: str           # `plan --gpu NAME`
    pattern: str        # searched, case-insensitively, in torch.cuda.get_device_name()
    peak_tflops: float  # dense tensor-core peak in `peak_dtype`
    peak_dtype: str
    example: str        # a device name as torch reports it (the tests match it)


GPUS: tuple[Gpu, ...] = (
    Gpu("h100", r"H100(?!.*(PCIe|NVL))", 989.4, "bf16", "NVIDIA H100 80GB HBM3"),  # SXM5
    Gpu("h100-pcie", r"H100.*PCIe", 756.0, "bf16", "NVIDIA H100 PCIe"),
    Gpu("h200", r"H200", 989.4, "bf16", "NVIDIA H200"),
    Gpu("a100", r"A100", 312.0, "bf16", "NVIDIA A100-SXM4-80GB"),  # SXM4 and PCIe alike
    Gpu("v100", r"V100(?!S)(?!.*PCIe)", 125.0, "fp16", "Tesla V100-SXM2-16GB"),  # SXM2
    Gpu("v100-pcie", r"V100(?!S).*PCIe", 112.0, "fp16", "Tesla V100-PCIE-16GB"),
)
_BY_NAME = {gpu.name: gpu for gpu in GPUS}


def names() -> tuple[str, ...]:
    """Every name `plan --gpu` accepts."""
    return tuple(_BY_NAME)


def get_gpu(name: str) -> Gpu:
    """The entry called `name`; an unknown name is one line listing the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"plan: unknown GPU '{name}' (known: {', '.join(names())})") from None


def gpu_of(device_name: str) -> Gpu | None:
    """The entry whose pattern matches a device name (torch's or a bench entry's), or None."""
    return next((gpu for gpu in GPUS if re.search(gpu.pattern, device_name, re.IGNORECASE)),
                None)


# --- the device a measurement ran on ----------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from ..runtime.provenance import hardware
    threads = torch.get_num_threads()
    return f"cpu: {hardware()['cpu']} ({threads} thread{'s' if threads > 1 else ''})"


def device_slug(device: torch.device) -> str:
    """File name of a device's results: 'cpu', or the GPU's name ('nvidia-h100-80gb-hbm3')."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def datasheet_peak(device: torch.device) -> float | None:
    """The device's dense datasheet peak (this table, the one plan uses), None if not known."""
    if device.type != "cuda":
        return None
    gpu = gpu_of(torch.cuda.get_device_name(device))
    return None if gpu is None else gpu.peak_tflops
