"""Native CPU kernels from csrc/, compiled on first use with torch.utils.cpp_extension.

`load()` builds csrc/ once per machine under `<home>/kernels/` (torch rebuilds it when a
source or the flags change) and returns the extension module. When it cannot
(no compiler, no ninja, a failed build) it logs one warning and returns None, and callers use
their plain-torch path. `build()` does the same ahead of time, for deploy/setup.sh.

The extension exposes `biased_attention(out, query, kv_cache, block_table, query_start_loc,
seq_lens, rows, biases, pages, region_slots, scale)`: for each batch row i in `rows`, causal
attention of its queries (its segment of query_start_loc in query [T, Hq, D]) over its
seq_lens[i] slots of vLLM's CPU paged `kv_cache`, with biases[j] [H_kv, S] float32 added to the
logits of slots [0, S), written into the same segment of `out`. A non-empty pages[j] [H_kv, P]
(int64) says the row's first region_slots[j] slots hold heads packed by page
(engine/pages.py): each head reads its pages' rows (biases[j] then [H_kv, P * block_size]),
then the slots after the region.

And `attention_statistics(queries, keys, values, bias, positions, outside, scale)`: the
compaction's statistics pass (core's `Problem._statistics`), empty tensors for no bias,
positions or outside mass.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

from vllm_compaction import models
from vllm_compaction.machine import cpu_flags

# A child of vLLM's logger, so vLLM's handler and level apply in its processes.
logger = logging.getLogger(f"vllm.{__name__}")

NAME = "vllm_compaction_cpu"


def _source(name: str) -> Path:
    """The copy of csrc/<name> a wheel carries (setup.py), else the source checkout's
    (an editable install)."""
    here = Path(__file__).resolve()
    wheel = here.parent / "csrc" / name
    return wheel if wheel.is_file() else here.parents[2] / "csrc" / name


SOURCES = [
    _source(name) for name in ("module.cpp", "biased_attention.cpp", "attention_statistics.cpp")
]
# -ffp-contract=fast: fused multiply-adds (off in GCC's ISO modes; torch passes -std=c++20).
# -mprefer-vector-width=512: GCC otherwise vectorises plain loops in 256-bit halves.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-mprefer-vector-width=512", "-fopenmp"]


def build_dir() -> Path:
    """Where the extension is built: -march=native output runs only on CPUs with the same
    features, so the folder is keyed by them (homes shared between machines stay safe), and
    by the sources' folder: torch rebuilds (about a minute) whenever the source path in a
    folder's build file changes, so two checkouts sharing a home would take turns."""
    features = " ".join(sorted(cpu_flags())) or platform.processor()
    key = hashlib.sha256(f"{features}\n{SOURCES[0].parent}".encode()).hexdigest()[:12]
    return models.home() / "kernels" / f"{platform.machine()}-{key}"


@functools.cache
def load() -> ModuleType | None:
    """The compiled extension, or None (after one warning) when it cannot be built."""
    try:
        return _compile()
    except Exception as exc:  # any failure means the same thing: use the torch path
        logger.warning(
            "vllm-compaction: the native CPU kernels are unavailable, so attention over "
            "compacted contexts and compaction itself use slower plain-torch paths. Reason: %s",
            _reason(exc),
        )
        return None


def build() -> bool:
    """Build the extension now, so the first request does not wait for a compile."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[kernels] %(message)s", stream=sys.stderr)
    start = time.perf_counter()
    module = load()
    if module is not None:
        logger.info(
            "native CPU kernels ready in %s (%.1f s)", build_dir(), time.perf_counter() - start
        )
    return module is not None


def _compile() -> ModuleType:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH)")
    missing = [str(path) for path in SOURCES if not path.is_file()]
    if missing:
        raise RuntimeError(f"kernel sources not found: {', '.join(missing)}")
    from torch.utils.cpp_extension import load as load_extension

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    return load_extension(
        name=NAME,
        sources=[str(path) for path in SOURCES],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
    )


def _reason(exc: Exception) -> str:
    """A build failure's useful part: torch puts the whole compiler log in the message, whose
    first line is the compile command; the compiler's own first error says more."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or [type(exc).__name__])[0][:500]
