"""Request and response bodies of the compaction routes (OpenAI style).

The field descriptions are the API reference: docs/api.md is generated from the OpenAPI schema
they end up in (`python -m vllm_compaction.server.openapi_doc`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vllm_compaction.core import METHODS
from vllm_compaction.core.methods import Method, ScoreMethod

DEFAULT_RATIO = 10.0
# Longer inputs are compacted chunk by chunk: the prefill's attention and the recorded queries
# grow with the length of one pass (on CPU an 8k chunk after 800 slots took over 10 minutes).
DEFAULT_CHUNK_TOKENS = 4096
DEFAULT_TTL_S = 24 * 3600
MAX_TTL_S = 365 * 24 * 3600


class CompactRequest(BaseModel):
    """`POST /v1/compact`: a document (`prompt`) or a conversation (`messages`) to compact.
    Give exactly one of them, and at most one of `ratio` and `target_tokens`. With `previous`,
    the input continues that handle's context and only the input is compacted."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A served model name, as listed by `GET /v1/models`.")
    prompt: str | list[int] | None = Field(
        default=None,
        description="A document: text or token ids. The handle continues it on `/v1/completions`. "
        "With `previous`: the text or tokens that follow the previous handle's document.",
    )
    messages: list[dict[str, Any]] | None = Field(
        default=None,
        description="A conversation in chat format (`role`, `content`). The chat template's "
        "own tokens are kept verbatim. The handle continues it on `/v1/chat/completions`. "
        "With `previous`: the turns that follow the previous handle's conversation (the "
        "template is rendered over both, as a chat on the handle does).",
    )
    previous: str | None = Field(
        default=None,
        description="Extend this handle (made from the same kind of input): the new handle "
        "holds its compacted rows unchanged, then the input compacted in their presence. The "
        "previous handle stays valid until deleted. Its slots and the input must fit in the "
        "model's context; the whole context need not.",
    )
    recompact: bool = Field(
        default=False,
        description="With `previous`: compact the previous handle's rows again together with "
        "the input (their betas carried), so the new handle's size is set by `ratio` or "
        "`target_tokens` over both, not added to the previous one. Keeps a growing context "
        "under a fixed size; the input must fit in one chunk.",
    )
    ratio: float | None = Field(
        default=None,
        ge=1.0,
        description=f"Input tokens per compacted token; {DEFAULT_RATIO:g} when neither this "
        "nor `target_tokens` is given. Tokens kept verbatim count toward the budget. With "
        "`previous`, it applies to the new input only (with `recompact`, to the previous "
        "handle's rows and the input together).",
    )
    target_tokens: int | None = Field(
        default=None,
        ge=1,
        description="The number of compacted tokens, instead of a ratio; below the input's "
        "length. With `previous`, the tokens the new input adds (with `recompact`, the new "
        "handle's tokens in all).",
    )
    queries: Literal["repeat", "context", "self-study"] = Field(
        default="repeat",
        description="Where the reference queries come from. `repeat`: the model reads the "
        "context again after an instruction to repeat it (about twice the context's positions; "
        "when that exceeds the model's context, or the input is compacted in chunks, "
        "`context` is used and the answer says so). "
        "`context`: the context's own queries, each seeing only the keys before it. "
        "`self-study`: the model first answers three short tasks about the input (a summary, "
        "its key facts, a question and its answer; up to 128 tokens each) and the queries of "
        "those turns are used (falls back to `context` with `previous`, in chunks, or when "
        "they do not fit the model's context).",
    )
    method: str = Field(
        default="am-highest",
        description="`am-highest` or `am-omp` (Attention Matching: kept keys, a bias per key, "
        "refitted values), or an eviction baseline that only keeps keys.",
        json_schema_extra={"enum": list(METHODS)},
    )
    head_budgets: Literal["uniform", "pooled"] = Field(
        default="uniform",
        description="How each layer's budget is shared by its KV heads. `uniform`: every head "
        "keeps the same number of rows. `pooled`: the heads' keys are ranked together, so a "
        "head whose attention spreads over many keys keeps more rows than one that reads a "
        "few (each keeps at least a quarter of its share); the handle stores each head's rows "
        "packed by KV block, so `slots` follows the rows kept, not the largest head. Not with "
        "`previous`, inputs compacted in chunks, or the methods `am-omp` and `strided`.",
    )
    max_queries: int = Field(
        default=Method.max_queries,
        ge=1,
        description="Reference queries per KV head the fit reads (a seeded random subset of "
        "them when there are more). Compaction time grows with it; fewer keep less (on SQuAD "
        "with Qwen2.5-Coder-0.5B, 4096 kept clearly less than 8192, and 8192 less than the "
        "default).",
    )
    keep_first: int | None = Field(
        default=None,
        ge=0,
        description="The first tokens of the input, kept verbatim (attention sinks); 4 by "
        "default, 0 with `previous` (its handle holds the context's first tokens). With "
        "`recompact`, the previous handle's first rows are the ones kept (4 by default).",
    )
    ttl_seconds: int = Field(
        default=DEFAULT_TTL_S,
        ge=1,
        le=MAX_TTL_S,
        description="The handle's lifetime; after it, every use answers 410.",
    )
    chunk_tokens: int | None = Field(
        default=None,
        ge=32,
        description=f"Compact inputs longer than this chunk by chunk ({DEFAULT_CHUNK_TOKENS} "
        "when not given): near-equal chunks, each prefilled after the compacted chunks before "
        "it and compacted with its own context queries, in their presence (as `previous` "
        "does). Each chunk and the slots before it must fit in the model's context; the whole "
        "input need not, but an input longer than the model's context is refused unless this "
        "is given.",
    )
    stream: bool = Field(
        default=False,
        description="Answer with server-sent events: `compaction.progress` events (fields "
        "`chunk`, `chunks`, `tokens_done`, `total_tokens`, `elapsed_s`; chunk 0 once the input "
        "is checked, then one per chunk compacted), then the handle, then `[DONE]`; an error "
        "after the stream began comes as an `error` event.",
    )

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
        if self.recompact and self.previous is None:
            raise ValueError("'recompact' needs 'previous'")
        if self.head_budgets == "pooled":
            if self.previous is not None:
                raise ValueError("'head_budgets': 'pooled' cannot extend a handle ('previous')")
            chosen = METHODS.get(self.method)  # an unknown one is refused on its own
            if chosen is not None and not issubclass(chosen, ScoreMethod):
                raise ValueError(f"'head_budgets': 'pooled' does not work with {self.method!r}")
        return self

    @property
    def kind(self) -> Literal["prompt", "messages"]:
        return "prompt" if self.prompt is not None else "messages"

    @property
    def first_kept(self) -> int:
        """`keep_first` with its default resolved."""
        if self.keep_first is not None:
            return self.keep_first
        return 0 if self.previous is not None and not self.recompact else 4


class CompactionUsage(BaseModel):
    """Tokens the engine prefilled to make the handle."""

    prompt_tokens: int = Field(description="The input's tokens (an extension: the new ones).")
    query_tokens: int = Field(
        description="Tokens prefilled after the input to make repeat or self-study queries (0 "
        "with context queries)."
    )
    total_tokens: int = Field(description="`prompt_tokens` + `query_tokens`.")


class CompactionTiming(BaseModel):
    """Seconds spent making the handle, measured by the API server."""

    prefill_s: float = Field(
        description="Prefill of the input (and the repeat), which also "
        "records the reference queries."
    )
    queries_s: float = Field(description="Always 0: the queries are recorded during the prefill.")
    compact_s: float = Field(description="Compaction on the workers.")
    total_s: float = Field(description="The whole call.")


class Compaction(BaseModel):
    """A handle: what `/v1/compact`, `GET /v1/compactions/{id}` and an import answer."""

    id: str = Field(
        description="The handle's id (`cmp_` and 32 random characters). Pass it as "
        "`compaction` to continue from the compacted context."
    )
    object: Literal["compaction"] = "compaction"
    model: str = Field(description="The served model name it was made with.")
    kind: Literal["prompt", "messages"] = Field(
        description="What it was made from: `prompt` handles are used with `/v1/completions`, "
        "`messages` handles with `/v1/chat/completions`."
    )
    created_at: int = Field(description="Unix time, seconds.")
    expires_at: int = Field(description="Unix time, seconds: `created_at` + `ttl_seconds`.")
    original_tokens: int = Field(
        description="The input's tokens (an extension: its previous handle's too)."
    )
    compacted_tokens: int = Field(
        description="Tokens of the compacted context (rows per KV head), verbatim ones "
        "included. A request on the handle occupies `slots` positions before its own tokens."
    )
    ratio: float = Field(description="`original_tokens` / `compacted_tokens`.")
    slots: int = Field(
        description="KV cache positions a request on the handle occupies before its own "
        "tokens: `compacted_tokens` rounded up to whole KV blocks, or with pooled head budgets "
        "the blocks its heads' packed rows fill.",
    )
    method: str = Field(description="The method that made it.")
    head_budgets: Literal["uniform", "pooled"] = Field(
        default="uniform", description="How each layer's rows were shared by its KV heads."
    )
    max_queries: int | None = Field(
        default=None,
        description="Reference queries per KV head, at most (null for handles stored before "
        "it was recorded).",
    )
    queries: Literal["repeat", "context", "self-study"] = Field(
        description="The query source that was used (`context` when `repeat` or `self-study` "
        "did not fit or the input was compacted in chunks)."
    )
    previous: str | None = Field(
        default=None, description="The handle it extends (`previous` of the request), or null."
    )
    chunks: int = Field(default=1, description="Chunks the input was compacted in.")
    usage: CompactionUsage = Field(description="Tokens prefilled to make it.")
    timing: CompactionTiming = Field(description="Seconds spent making it.")


class CompactionProgress(BaseModel):
    """An event of a streaming `POST /v1/compact`: one more chunk is compacted."""

    object: Literal["compaction.progress"] = "compaction.progress"
    chunk: int = Field(
        description="Chunks compacted so far: 0 in the first event, sent once the input is "
        "checked and split."
    )
    chunks: int = Field(description="Chunks in all.")
    tokens_done: int = Field(description="Input tokens compacted so far.")
    total_tokens: int = Field(description="The input's tokens.")
    elapsed_s: float = Field(description="Seconds since the call began.")


class CompactionDeleted(BaseModel):
    """`DELETE /v1/compactions/{id}`: the handle is gone."""

    id: str
    object: Literal["compaction.deleted"] = "compaction.deleted"
    deleted: bool = True


class CompactionList(BaseModel):
    """`GET /v1/compactions`: the caller's handles, oldest first, a page at a time."""

    object: Literal["list"] = "list"
    data: list[Compaction] = Field(description="This page's handles.")
    first_id: str | None = Field(description="The first handle's id (null on an empty page).")
    last_id: str | None = Field(
        description="The last handle's id: pass it as `after` for the next page."
    )
    has_more: bool = Field(description="Whether handles follow this page.")


class ContextManagement(BaseModel):
    """`context_management` of a chat or completion request: compact the request's own cache
    whenever it reaches `compact_threshold` tokens, so a long generation runs under a cap."""

    model_config = ConfigDict(extra="forbid")

    compact_threshold: int = Field(
        ge=2,
        description="Cache size in tokens (compacted slots, padded to whole KV blocks, and "
        "the tokens after them) at which the context is compacted; at most the model's "
        "context.",
    )
    keep_fraction: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="Size of the compacted part relative to what it replaces: the compacted "
        "rows so far and every token but the last `keep_last`.",
    )
    keep_last: int = Field(
        default=64,
        ge=1,
        description="The newest tokens, kept verbatim after the compacted part.",
    )
