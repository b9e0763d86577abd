"""`vllm.general_plugins` entry point: runs in every vLLM process before the engine is built."""

from __future__ import annotations

import logging

SUPPORTED_VLLM = "0.32.0"

# A child of vLLM's logger, so vLLM's handler and level apply in its processes.
logger = logging.getLogger(f"vllm.{__name__}")


def register() -> None:
    """Refuse vLLM versions whose internals (KV layout, backends) this plugin was not built on."""
    import vllm

    if vllm.__version__ != SUPPORTED_VLLM:
        raise RuntimeError(
            f"vllm-compaction supports vLLM {SUPPORTED_VLLM}; this environment has "
            f"{vllm.__version__}. Run deploy/setup.sh to get the supported version."
        )
    logger.info("vllm-compaction plugin loaded (vLLM %s)", vllm.__version__)
