"""transformers glue: capture queries/keys/values and score through a compacted cache.

Imports torch and transformers, never vLLM: it is the independent reference the engine is
tested against.
"""

from .attention import (
    ATTN_IMPLEMENTATION,
    Prefix,
    PrefixLayer,
    attention_implementation,
    compaction_attention,
)
from .capture import LayerCapture, Queries, capture, pool_queries
from .chat import (
    ChatContext,
    Turn,
    answer_turn,
    appended_turn,
    chat_token_count,
    encode_context,
    generation_prompt,
    render,
    repeat_turn,
)
from .loading import load_model
from .on_policy import CompactFn, compact_on_policy
from .scoring import continuation_logits, next_token_logprobs, score_with_compacted

__all__ = [
    "ATTN_IMPLEMENTATION",
    "ChatContext",
    "CompactFn",
    "LayerCapture",
    "Prefix",
    "PrefixLayer",
    "Queries",
    "Turn",
    "answer_turn",
    "appended_turn",
    "attention_implementation",
    "capture",
    "chat_token_count",
    "compact_on_policy",
    "compaction_attention",
    "continuation_logits",
    "encode_context",
    "generation_prompt",
    "load_model",
    "next_token_logprobs",
    "pool_queries",
    "render",
    "repeat_turn",
    "score_with_compacted",
]
