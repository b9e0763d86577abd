"""Triton kernels are tested under Triton's interpreter on CPU tensors (no GPU here).

@triton.jit reads TRITON_INTERPRET when a kernel is defined and Triton again when one launches,
so it is set while the kernel modules load and during each test here, and only then: the rest
of the session (served engines included) runs without it.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest

with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
    from vllm_compaction.kernels import compaction, paged  # noqa: F401


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
