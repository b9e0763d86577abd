"""`vllm.general_plugins` entry point: runs in every vLLM process before the engine is built."""

from __future__ import annotations

import logging

from vllm_compaction.engine.params import ensure_secret

SUPPORTED_VLLM = "0.32.0"
ATTENTION_BACKEND = "vllm_compaction.engine.attention.CompactionAttentionBackend"

# A child of vLLM's logger, so vLLM's handler and level apply in its processes.
logger = logging.getLogger(f"vllm.{__name__}")


def register() -> None:
    """Check the vLLM version, then route CPU attention through the compaction backend.

    The backend defers to the stock kernel for every batch that touches no compacted context.
    """
    import vllm
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if vllm.__version__ != SUPPORTED_VLLM:
        raise RuntimeError(
            f"vllm-compaction supports vLLM {SUPPORTED_VLLM}; this environment has "
            f"{vllm.__version__}. Run deploy/setup.sh to get the supported version."
        )
    ensure_secret()
    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, ATTENTION_BACKEND)
    logger.info("vllm-compaction plugin loaded (vLLM %s)", vllm.__version__)
