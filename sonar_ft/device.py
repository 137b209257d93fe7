"""The one device resolver (``--device auto | cpu | cuda | cuda:N``), the frozen decoder's dtype, and what a run records of its hardware.

Used by training, evaluation, ``embed`` and ``translate`` alike, so a device name that works for
one works for all.
"""

from __future__ import annotations

from typing import Any

import torch

from sonar_ft.errors import ConfigError

DECODER_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, *, flag: str = "--device") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` / ``cuda:N`` without that GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{flag} {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{flag} {name!r}: sonar-ft runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{flag} {name} was asked for but no CUDA GPU is visible. In Colab: Runtime > Change runtime type > GPU; "
            f"or pass {flag} cpu (slow) / {flag} auto."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"{flag} {name}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
        )
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` → bf16 on GPUs that support it, else fp32 (never fp16 for the T5 encoder)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16 needs a GPU with bf16 support (Ampere or newer); use --precision fp32")
    return name


def hardware_record(device: torch.device) -> dict[str, Any]:
    """GPU name and memory, CUDA and cuDNN versions (what ``config.json`` keeps of the machine)."""
    record: dict[str, Any] = {
        "device": str(device),
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 2), gpu_count=torch.cuda.device_count())
    else:
        record.update(gpu_name=None, gpu_memory_gib=None)
    return record


def decoder_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype the frozen decoder's weights are held in for ``--decoder_dtype name``.

    fp16 is only for GPUs without bf16 (a T4): bf16 keeps fp32's range and is the safer half type,
    and CPUs run fp16 matmuls slowly or not at all.
    """
    if name not in DECODER_DTYPES:
        raise ConfigError(f"--decoder_dtype must be one of {', '.join(DECODER_DTYPES)} (got {name!r})")
    if name == "fp16":
        if device.type != "cuda":
            raise ConfigError("--decoder_dtype fp16 is for GPUs without bf16 (e.g. a T4); on CPU use --decoder_dtype bf16 or fp32")
        if torch.cuda.is_bf16_supported():
            raise ConfigError("this GPU supports bf16: use --decoder_dtype bf16 (fp16 is only for GPUs without it, e.g. a T4)")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support: use --decoder_dtype fp16 (or fp32)")
    return DECODER_DTYPES[name]
