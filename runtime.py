"""Where and in which precision the networks run: the device --device names and the autocast dtype --amp
asks for on it."""
import contextlib

import torch

from cli import UserError

DEVICE_HELP = "auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu"


def pick_device(name: str) -> torch.device:
    """auto = cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but CUDA is not available")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated, slowly."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype --amp asks for on `device`, or None for full fp32.

    auto is bf16 on CUDA and on CPUs with native bf16, where it trains the CPU preset 1.57x and samples
    1.8x faster than fp32 (docs/speed.md); fp32 on other CPUs, which emulate bf16, and on other devices.
    """
    if amp == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        amp = "bf16" if native else "none"
    if amp == "none":
        return None
    if device.type not in ("cuda", "cpu") or (amp == "fp16" and device.type != "cuda"):
        raise UserError(f"--amp {amp} is not supported on {device.type}")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, amp: str = "auto"):
    dtype = amp_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
