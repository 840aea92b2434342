"""Which floating-point precision a compute path runs in: the one home of ``precision: auto``.

``auto`` resolves per path and device; an explicit ``fp32``, ``bf16`` or ``fp16`` is always kept.

==================== ====== ===================== ==========
path                 CUDA   CPU with native bf16  other CPUs
==================== ====== ===================== ==========
``thor-inference``   fp32   bf16                  fp32
``embedding``        fp16   bf16                  fp32
``thor-training``    bf16   bf16                  fp32
``training`` (other) bf16   fp32                  fp32
``generation``       fp16   fp32                  fp32
==================== ====== ===================== ==========

A CPU has native bf16 when it executes bf16 dot products in hardware (x86 ``avx512_bf16`` or
``amx_bf16``: Intel Xeon since Cooper Lake / Sapphire Rapids, AMD EPYC since Zen 4) and torch's
oneDNN backend is built in; elsewhere bf16 has no hardware dot products and auto keeps fp32. The CPU
column comes from ``benchmarks/cpu_bf16.py`` (docs/performance.md has the table and the command):
a path runs bf16 there only where bf16 was faster at equal accuracy. On an AVX512-BF16 CPU without
AMX, THOR inference ran 1.2-1.4× faster at the same pixel AUPRC, THOR's training step 1.3-1.5× at
the same loss, the embedder 2.1-2.5× (embeddings' cosine to fp32 ≥ 0.995), while the tiny synthesis
UNet's training step was slower in bf16 (0.7×); generation was not measured. The CUDA column is
what ``auto`` gave before CPUs were considered.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Literal

PrecisionPath = Literal["thor-inference", "embedding", "thor-training", "training", "generation"]

# What auto gives on a GPU (unchanged from before CPUs could run bf16): THOR's inferer has always
# run fp32 on CUDA, the embedder fp16 (the paper's DINO pipeline), training loops bf16 and the
# generation pipeline fp16 weights.
CUDA_AUTO: dict[str, str] = {
    "thor-inference": "fp32",
    "embedding": "fp16",
    "thor-training": "bf16",
    "training": "bf16",
    "generation": "fp16",
}
# Paths measured faster in bf16 at equal accuracy on a native-bf16 CPU (benchmarks/cpu_bf16.py).
CPU_BF16_AUTO: frozenset[str] = frozenset({"thor-inference", "embedding", "thor-training"})
CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_bf16_native() -> bool:
    """True when this CPU runs bf16 matmuls and convolutions in hardware (AVX512-BF16 or AMX)
    through torch's oneDNN backend; False elsewhere (older x86, ARM: not measured, no oneDNN)."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    probes = [
        getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    probes = [p for p in probes if p is not None]
    if probes:
        return any(bool(p()) for p in probes)
    return bool(cpu_flags() & set(CPU_FLAGS))


def cpu_flags() -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (Linux); empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_capability() -> dict[str, object]:
    """What a benchmark or a summary records about the CPU: torch's vector ISA level, whether
    AVX512-BF16 and AMX are present, and whether bf16 counts as native here."""
    import torch

    flags = cpu_flags()
    return {
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "bf16_native": cpu_bf16_native(),
    }


def resolve(precision: str, device: str, path: PrecisionPath) -> str:
    """``precision`` (``auto``/``fp32``/``bf16``/``fp16``) for ``path`` on ``device`` (``cuda``,
    ``cpu``, or another torch device type, which gets fp32): explicit values unchanged, ``auto``
    per the module's table.

    Raises:
        ValueError: an unknown ``path``.
    """
    if path not in CUDA_AUTO:
        raise ValueError(f"unknown precision path {path!r}; one of {sorted(CUDA_AUTO)}")
    if precision != "auto":
        return precision
    if device == "cuda":
        return CUDA_AUTO[path]
    if device == "cpu" and path in CPU_BF16_AUTO and cpu_bf16_native():
        return "bf16"
    return "fp32"


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bf16/fp16 on ``device`` for a resolved ``precision``; a no-op for
    fp32."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=dtype)
