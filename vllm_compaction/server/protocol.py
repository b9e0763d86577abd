"""Request and response bodies of the compaction routes (OpenAI style)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_RATIO = 10.0
DEFAULT_TTL_S = 24 * 3600
MAX_TTL_S = 365 * 24 * 3600


class CompactRequest(BaseModel):
    """`POST /v1/compact`: a document (`prompt`) or a conversation (`messages`) to compact."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    ratio: float | None = Field(default=None, ge=1.0)
    target_tokens: int | None = Field(default=None, ge=1)
    queries: Literal["repeat", "context"] = "repeat"
    method: str = "am-highest"
    keep_first: int = Field(default=4, ge=0)
    ttl_seconds: int = Field(default=DEFAULT_TTL_S, ge=1, le=MAX_TTL_S)

    @model_validator(mode="after")
    def _one_input_one_size(self) -> CompactRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.prompt is not None and len(self.prompt) == 0:
            raise ValueError("'prompt' is empty")
        if self.messages is not None and len(self.messages) == 0:
            raise ValueError("'messages' is empty")
        if self.ratio is not None and self.target_tokens is not None:
            raise ValueError("give at most one of 'ratio' or 'target_tokens'")
        return self

    @property
    def kind(self) -> Literal["prompt", "messages"]:
        return "prompt" if self.prompt is not None else "messages"


class CompactionUsage(BaseModel):
    prompt_tokens: int
    query_tokens: int
    total_tokens: int


class CompactionTiming(BaseModel):
    prefill_s: float
    queries_s: float
    compact_s: float
    total_s: float


class Compaction(BaseModel):
    """What `/v1/compact` and `GET /v1/compactions/{id}` answer."""

    id: str
    object: Literal["compaction"] = "compaction"
    model: str
    kind: Literal["prompt", "messages"]
    created_at: int
    expires_at: int
    original_tokens: int
    compacted_tokens: int
    ratio: float
    method: str
    queries: Literal["repeat", "context"]
    usage: CompactionUsage
    timing: CompactionTiming


class CompactionDeleted(BaseModel):
    id: str
    object: Literal["compaction.deleted"] = "compaction.deleted"
    deleted: bool = True


class CompactionList(BaseModel):
    """`GET /v1/compactions`: the caller's handles, oldest first, a page at a time."""

    object: Literal["list"] = "list"
    data: list[Compaction]
    first_id: str | None
    last_id: str | None
    has_more: bool
