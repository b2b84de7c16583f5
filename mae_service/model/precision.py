"""Which autocast dtype a device computes in (``train.amp``), decided in one pure function, and its context.

``auto`` is bf16 where the device has native bf16 arithmetic — CPUs with AVX512-BF16 or AMX-BF16 (as reported by
``torch.cpu.get_capabilities()``), CUDA devices that compute in bf16 (``torch.cuda.is_bf16_supported`` without
emulation) — and fp32 elsewhere. ``bf16`` insists on it (ValueError where the device lacks it), ``fp16`` is
CUDA-only (with a GradScaler), ``none`` is fp32. Used by the training step, the embeddings of k-NN and probes, and
the reconstruction pictures, so they all compute as the run trains. Torch only.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

AMP_MODES = ("auto", "bf16", "fp16", "none")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 capabilities with native bf16 dot products / matmuls


def cpu_has_bf16() -> bool:
    """Whether this machine's CPU has native bf16 arithmetic (``torch.cpu.get_capabilities()``, cached by torch)."""
    caps = torch.cpu.get_capabilities()
    return any(bool(caps.get(flag, False)) for flag in CPU_BF16_FLAGS)


def device_has_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bf16 natively (not emulated)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return cpu_has_bf16()
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def resolve_amp(mode: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``train.amp=mode`` on ``device``: ``torch.bfloat16``, ``torch.float16`` or None (fp32).

    ValueError, naming the value and what this device allows, for ``bf16`` where the device lacks native bf16,
    ``fp16`` off CUDA, and values outside :data:`AMP_MODES`.
    """
    dev = torch.device(device)
    if mode not in AMP_MODES:
        raise ValueError(f"train.amp={mode!r}: allowed {', '.join(AMP_MODES)}")
    if mode == "none":
        return None
    has_bf16 = device_has_bf16(dev)
    if mode == "auto":
        return torch.bfloat16 if has_bf16 else None
    if mode == "bf16" and has_bf16:
        return torch.bfloat16
    if mode == "fp16" and dev.type == "cuda":
        return torch.float16
    usable = {"auto": True, "bf16": has_bf16, "fp16": dev.type == "cuda", "none": True}
    allowed = ", ".join(m for m in AMP_MODES if usable[m])
    why = {
        "bf16": f"{describe_device(dev)} has no native bf16 arithmetic "
        f"(CPUs need {' or '.join(CPU_BF16_FLAGS)}; GPUs compute capability ≥ 8.0)",
        "fp16": "fp16 autocast runs on CUDA only (with train.use_gpu=true)",
    }[mode]
    raise ValueError(f"train.amp={mode!r}: {why}; allowed on this device: {allowed}")


def describe_device(device: torch.device | str) -> str:
    """``"this CPU (AMD EPYC)"`` / ``"cuda:0 (NVIDIA …)"``: the device as a person knows it."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return f"this CPU ({torch.cpu.get_capabilities().get('cpu_name', 'unknown')})"
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def amp_name(dtype: torch.dtype | None) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: what a resolved dtype is called in logs and MLflow params."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]


def autocast(dtype: torch.dtype | None, device: torch.device | str) -> AbstractContextManager:
    """``torch.autocast`` on ``device``'s type in ``dtype``; a no-op for None (fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
