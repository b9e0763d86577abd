"""Lower Triton kernels to Triton IR for an sm_90 target, without a GPU.

The interpreter runs kernels as plain Python and accepts code the compiler rejects; lowering
catches that. It runs in a fresh process, since the interpreter patches triton.language.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any


def lower(kernel: Any, signature: dict[str, str], constants: dict[str, Any]) -> None:
    """Lower one specialisation (runs inside the fresh process); AssertionError if invalid."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = ASTSource(kernel, signature, constants).make_ir(
        target,
        options,
        backend.get_codegen_implementation(options),
        backend.get_module_map(),
        context,
    )
    assert module.verify(), kernel.__name__


def run_lowering(script: str) -> str:
    """Run `script` (which calls `lower`) in a fresh interpreter-free process; its stdout."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout
