"""Device and precision choice, made once per run.

bf16 autocast is about 1.7x faster than fp32 on CPUs with AVX512-BF16/AMX and is the
norm on recent GPUs; the weights and optimizer state stay fp32, so it is safe for
fine-tuning. ``auto`` uses it only where the hardware does bf16 natively.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from privtune.errors import PrivtuneError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # "bf16" or "fp32"

    def autocast(self):
        """The autocast context for forward passes (a no-op in fp32)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Pick the device (GPU when there is one) and the precision."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PrivtuneError(f"device {device!r} was asked for but no CUDA GPU is visible",
                            "use device: auto or device: cpu")
    dev = torch.device(device)
    if precision == "auto":
        native = (torch.cuda.is_bf16_supported() if dev.type == "cuda" else _cpu_has_native_bf16())
        precision = "bf16" if native else "fp32"
    if precision not in ("bf16", "fp32"):
        raise PrivtuneError(f"unknown precision {precision!r}", "use auto, bf16 or fp32")
    return Runtime(dev, precision)
