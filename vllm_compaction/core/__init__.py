"""Engine-free Attention Matching: compact a layer's KV cache to keys, biases and values.

Pure torch; nothing here imports vLLM or transformers.
"""

from .attention import attention
from .cache import compact_cache
from .compact import compact_layer
from .compacted import Compacted
from .methods import METHODS
from .metrics import Errors, compaction_errors

__all__ = [
    "METHODS",
    "Compacted",
    "Errors",
    "attention",
    "compact_cache",
    "compact_layer",
    "compaction_errors",
]
