"""The compaction flow in the API server: tokenize, capture, compact on the workers, and place
a handle in front of a later request's tokens.

The blocks that hold a handle's KV carry a cache salt keyed by its tenant and id, so no two
handles (and no plain request) ever share a block.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from vllm import SamplingParams
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.inputs.engine import tokens_input

from vllm_compaction.core import METHODS
from vllm_compaction.engine.params import private_salt, signed
from vllm_compaction.server import metrics
from vllm_compaction.server.errors import CompactionError
from vllm_compaction.server.protocol import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_RATIO,
    Compaction,
    CompactionProgress,
    CompactionTiming,
    CompactionUsage,
    CompactRequest,
)
from vllm_compaction.server.registry import HandleRecord, HandleRegistry, new_handle_id
from vllm_compaction.server.self_study import self_study_ids
from vllm_compaction.templates import verbatim_spans

logger = logging.getLogger(f"vllm.{__name__}")
Progress = Callable[[CompactionProgress], Awaitable[None]]

POLL_S = 0.05  # how often the server asks the workers whether a compaction finished
PLACEHOLDER_ID = 0  # any valid id: the engine never computes these positions
REPEAT_INSTRUCTION = "Repeat the previous context exactly, word for word."


class CompactionService:
    def __init__(
        self,
        engine_client: Any,
        chat_serving: Any,
        max_model_len: int,
        block_size: int,
        registry: HandleRegistry,
    ) -> None:
        self.engine = engine_client
        self.chat_serving = chat_serving
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.registry = registry

    async def compact(
        self, request: CompactRequest, tenant: str, progress: Progress | None = None
    ) -> Compaction:
        """Make a handle; `progress` hears of every chunk compacted."""
        # Callers' strings must not become label values (unbounded series).
        method = request.method if request.method in METHODS else "unknown"
        try:
            info, added = await self._compact(request, tenant, progress)
        except CompactionError:
            metrics.COMPACTIONS.labels(method, "refused").inc()
            raise
        except Exception:
            metrics.COMPACTIONS.labels(method, "failed").inc()
            raise
        metrics.COMPACTIONS.labels(method, "ok").inc()
        metrics.TOKENS.labels("in").inc(info.usage.prompt_tokens)
        metrics.TOKENS.labels("out").inc(added)
        metrics.RATIO.observe(info.ratio)
        for stage in ("prefill", "compact", "total"):
            metrics.SECONDS.labels(stage).observe(getattr(info.timing, f"{stage}_s"))
        return info

    async def _compact(
        self, request: CompactRequest, tenant: str, progress: Progress | None
    ) -> tuple[Compaction, int]:
        """The new handle and the compacted tokens it added."""
        if request.method not in METHODS:
            known = ", ".join(METHODS)
            raise CompactionError(
                f"unknown method {request.method!r}; known: {known}", param="method"
            )
        if request.previous is None:
            return await self._compact_input(request, tenant, None, progress)
        # Held until the new handle is made: its rows are read by the capture and the fit.
        self.registry.acquire(request.previous)
        try:
            previous = await self.registry.get(request.previous, tenant)
            if previous.info.head_budgets == "pooled":
                raise CompactionError(
                    f"{request.previous} has pooled head budgets, which cannot be extended yet",
                    param="previous",
                )
            if previous.info.kind != request.kind:
                raise CompactionError(
                    f"{request.previous} was made from {previous.info.kind}: extend it with "
                    f"'{previous.info.kind}'",
                    param="previous",
                )
            return await self._compact_input(request, tenant, previous, progress)
        finally:
            await self.registry.release(request.previous)

    async def _compact_input(
        self,
        request: CompactRequest,
        tenant: str,
        previous: HandleRecord | None,
        progress: Progress | None,
    ) -> tuple[Compaction, int]:
        began = time.perf_counter()
        source = await self._context_tokens(request, previous)
        total = len(source.ids)
        link = None
        if previous is not None:
            link = Link(previous.info.id, previous.slots, previous.info.compacted_tokens)
        # Recompacting sizes the whole new handle: the previous rows are compacted again too.
        folded = link.rows if request.recompact else 0
        budget = _budget(request, folded + total)
        chunks = self._chunks(request, source, budget, link)
        if len(chunks) == 1:
            capture_ids, query_range, queries = await self._capture_prompt(request, source)
        else:  # repeat queries would need each chunk twice; its own queries serve it
            queries = "context"
        if progress is not None:  # checked and split: the work begins
            await progress(_progress(0, chunks, 0, began))
        prefill_s = compact_s = 0.0
        query_tokens = 0
        try:
            for number, chunk in enumerate(chunks, 1):
                if len(chunks) > 1:
                    ids = source.ids[chunk.start : chunk.end]
                    capture_ids, query_range = ids, (0, len(ids))
                options = {
                    "budget": chunk.budget,
                    "keep_first": request.first_kept if chunk.start == 0 else 0,
                    "protected": chunk.protected,
                    "method": request.method,
                    "causal": queries == "context",
                    "fold": request.recompact,
                    "pool_heads": request.head_budgets == "pooled",
                    "max_queries": request.max_queries,
                }
                made = await self.compact_on_workers(
                    capture_ids, chunk.end - chunk.start, query_range, link, options
                )
                if link is not None and link.made_here:  # a chunk's step, superseded now
                    await self.engine.collective_rpc("compaction_delete", args=(link.id,))
                link = made
                prefill_s, compact_s = prefill_s + made.prefill_s, compact_s + made.compact_s
                query_tokens += len(capture_ids) - (chunk.end - chunk.start)
                if len(chunks) > 1:
                    logger.info(
                        "compaction %s: chunk %d/%d, %d of %d tokens in %.1f s",
                        made.id, number, len(chunks), chunk.end, total,
                        time.perf_counter() - began,
                    )  # fmt: skip
                if progress is not None:
                    await progress(_progress(number, chunks, chunk.end, began))
        except BaseException:
            if link is not None and link.made_here:
                await self.engine.collective_rpc("compaction_delete", args=(link.id,))
            raise
        done = time.perf_counter()

        original, compacted = total, link.rows
        if previous is not None:
            original += previous.info.original_tokens
        now = int(time.time())
        info = Compaction(
            id=link.id,
            model=request.model,
            kind=request.kind,
            created_at=now,
            expires_at=now + request.ttl_seconds,
            original_tokens=original,
            compacted_tokens=compacted,
            ratio=original / compacted,
            slots=link.slots,
            method=request.method,
            head_budgets=request.head_budgets,
            max_queries=request.max_queries,
            queries=queries,
            previous=request.previous,
            chunks=len(chunks),
            usage=CompactionUsage(
                prompt_tokens=total, query_tokens=query_tokens, total_tokens=total + query_tokens
            ),
            timing=CompactionTiming(
                prefill_s=prefill_s,
                queries_s=0.0,  # queries are recorded during the prefill itself
                compact_s=compact_s,
                total_s=done - began,
            ),
        )
        record = HandleRecord(info, source.context, link.slots, link.bytes, tenant, source.messages)
        await self.registry.add(record)
        return info, budget

    def _chunks(
        self, request: CompactRequest, source: _Source, budget: int, link: Link | None
    ) -> list[_Chunk]:
        """The input's chunks, each with its share of the budget; refuses a split that cannot
        hold its verbatim tokens or whose chunks do not fit after the slots before them."""
        total, offset = len(source.ids), link.slots if link is not None else 0
        if request.chunk_tokens is None and offset + total + 1 > self.max_model_len:
            before = f"{offset} slots of the previous handle + " if offset else ""
            raise CompactionError(
                f"{before}the input's {total} tokens exceed the model's context of "
                f"{self.max_model_len}; give 'chunk_tokens' to compact it chunk by chunk",
                param="prompt" if request.kind == "prompt" else "messages",
            )
        count = math.ceil(total / (request.chunk_tokens or DEFAULT_CHUNK_TOKENS))
        if request.head_budgets == "pooled" and count > 1:
            raise CompactionError(
                f"pooled head budgets take an input of one chunk; this one has {total} tokens "
                "(raise chunk_tokens, or use uniform head budgets)",
                param="head_budgets",
            )
        if request.recompact and count > 1:
            raise CompactionError(
                f"'recompact' takes an input of one chunk; this one has {total} tokens (raise "
                "chunk_tokens, or extend without 'recompact' first)",
                param="recompact",
            )
        ends = [total * i // count for i in range(count + 1)]  # near-equal chunks
        shares = [budget * end // total for end in ends]
        rows = link.rows if link is not None else 0
        chunks: list[_Chunk] = []
        for start, end, low, high in zip(ends, ends[1:], shares, shares[1:], strict=False):
            if chunks:  # after the chunks before it, padded to whole blocks as the workers do
                offset = math.ceil(rows / self.block_size) * self.block_size
            if offset + (end - start) + 1 > self.max_model_len:
                raise CompactionError(
                    f"a chunk of {end - start} tokens after {offset} compacted slots exceeds "
                    f"the model's context of {self.max_model_len}; lower chunk_tokens or raise "
                    "ratio",
                    param="chunk_tokens",
                )
            if high == low:
                raise CompactionError(
                    f"a budget of {budget} tokens cannot be shared by {count} chunks; raise "
                    "target_tokens, lower ratio or raise chunk_tokens",
                    param="chunk_tokens",
                )
            spans = [
                [max(a, start) - start, min(b, end) - start]
                for a, b in source.protected
                if a < end and b > start
            ]
            verbatim = set(range(min(request.first_kept, end))) if start == 0 else set()
            verbatim.update(i for a, b in spans for i in range(a, b))
            if high - low < len(verbatim):
                raise CompactionError(
                    f"a budget of {high - low} tokens cannot hold the {len(verbatim)} tokens "
                    "kept verbatim (first tokens and chat template); raise target_tokens or "
                    "lower ratio"
                )
            chunks.append(_Chunk(start, end, high - low, spans))
            rows += high - low
        return chunks

    async def compact_on_workers(
        self,
        capture_ids: list[int],
        context_len: int,
        query_range: tuple[int, int],
        link: Link | None,
        options: dict[str, Any],
    ) -> Link:
        """Prefill `capture_ids` after `link`'s slots, recording the keys and values of their
        first `context_len` tokens and the queries of `query_range`, then compact those on
        every worker into a new handle that the workers hold."""
        began = time.perf_counter()
        handle_id = new_handle_id()
        offset = link.slots if link is not None else 0
        capture = {
            "capture": handle_id,
            "context_len": context_len,
            "query_start": query_range[0],
            "query_end": query_range[1],
            "offset": offset,
        }
        if link is not None:
            # Prefilled after the previous handle's slots, which it reads like a completion.
            capture.update(handle=link.id, slots=link.slots)
            options = {**options, "previous": link.id, "previous_rows": link.rows}
        params = SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": signed(capture)})
        # A fresh salt: a prefix-cache hit would skip the forward that records the rows.
        prompt = tokens_input(
            [PLACEHOLDER_ID] * offset + capture_ids,
            cache_salt=f"compaction-capture:{handle_id}",
        )
        try:
            async for _ in self.engine.generate(prompt, params, f"compact-{uuid.uuid4().hex}"):
                pass
            prefilled = time.perf_counter()
            await self.engine.collective_rpc("compaction_compact", args=(handle_id, options))
            # The workers compact in a thread: the engine serves other requests meanwhile.
            while not all(await self.engine.collective_rpc("compaction_ready", args=(handle_id,))):
                await asyncio.sleep(POLL_S)
            replies = await self.engine.collective_rpc("compaction_finish", args=(handle_id,))
            if len({reply["slots"] for reply in replies}) > 1:
                # Each rank packs its own heads: their packed sizes can differ.
                raise RuntimeError(
                    "the tensor-parallel ranks packed their heads into different sizes; use "
                    "uniform head budgets"
                )
        except BaseException as error:
            # Cancelled (client gone) or failed: drop the recorded rows on the workers.
            await self.engine.collective_rpc("compaction_delete", args=(handle_id,))
            if isinstance(error, Exception):
                raise CompactionError(f"compaction failed: {error}") from error
            raise
        rows = options["budget"]
        if link is not None and not options.get("fold"):
            rows += link.rows
        return Link(
            handle_id,
            replies[0]["slots"],
            rows,
            bytes=replies[0]["bytes"] * len(replies),
            prefill_s=prefilled - began,
            compact_s=time.perf_counter() - prefilled,
            made_here=True,
        )

    async def completion_prompt(
        self, handle_id: str, prompt: Any, tenant: str
    ) -> tuple[list[int], str, dict]:
        """Token prompt, cache salt and kv_transfer_params for a completion on a handle."""
        record, ids = await self.completion_ids(handle_id, prompt, tenant)
        return self._placed(record, handle_id, ids)

    async def completion_ids(
        self, handle_id: str, prompt: Any, tenant: str
    ) -> tuple[HandleRecord, list[int]]:
        """The handle's record and the prompt's tokens that follow its context."""
        record = await self.registry.get(handle_id, tenant)
        if record.info.kind != "prompt":
            raise CompactionError(
                f"{handle_id} was made from messages: use it with /v1/chat/completions",
                param="compaction",
            )
        return record, self.prompt_ids(prompt, add_special_tokens=False)

    def prompt_ids(self, prompt: Any, add_special_tokens: bool) -> list[int]:
        """One completion prompt (text or token ids) as token ids."""
        if isinstance(prompt, str):
            ids = self.engine.get_tokenizer().encode(prompt, add_special_tokens=add_special_tokens)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise CompactionError("'prompt' must be one string or one token list", param="prompt")
        if not ids:
            raise CompactionError("'prompt' must not be empty", param="prompt")
        return ids

    async def chat_prompt(
        self, handle_id: str, request: Any, tenant: str
    ) -> tuple[list[int], str, dict]:
        """The same for a chat: the handle's messages, then the request's, templated once."""
        record, ids = await self.chat_ids(handle_id, request, tenant)
        return self._placed(record, handle_id, ids)

    async def chat_ids(
        self, handle_id: str, request: Any, tenant: str
    ) -> tuple[HandleRecord, list[int]]:
        """The handle's record and the chat's tokens that follow its conversation."""
        record = await self.registry.get(handle_id, tenant)
        if record.messages is None:
            raise CompactionError(
                f"{handle_id} was made from a prompt: use it with /v1/completions",
                param="compaction",
            )
        whole = _WholeChat.model_validate(request.model_dump(exclude_unset=True))
        whole.messages = [*record.messages, *request.messages]
        ids = await self.render(whole)
        prefix = record.prefix_ids
        if ids[: len(prefix)] != prefix or len(ids) == len(prefix):
            raise CompactionError(
                "the chat template does not render the compacted messages as a prefix of this "
                "conversation",
                param="messages",
            )
        return record, ids[len(prefix) :]

    def _placed(self, record: HandleRecord, handle_id: str, ids: list[int]):
        if record.slots + len(ids) > self.max_model_len:
            raise CompactionError(
                f"{record.slots} compacted slots + {len(ids)} tokens exceed the model's "
                f"context of {self.max_model_len}"
            )
        salt, params = placement(record.tenant, handle_id, record.slots)
        return [PLACEHOLDER_ID] * record.slots + ids, salt, params

    async def _context_tokens(
        self, request: CompactRequest, previous: HandleRecord | None
    ) -> _Source:
        """The tokens to compact and the template spans among them kept verbatim; with
        `previous`, what follows its context."""
        prefix = previous.prefix_ids if previous is not None else []
        offset = previous.slots if previous is not None else 0
        if request.kind == "prompt":
            if isinstance(request.prompt, str):
                ids = self.engine.get_tokenizer().encode(request.prompt, add_special_tokens=False)
            else:
                ids = list(request.prompt)
            if not ids:
                raise CompactionError("'prompt' has no tokens", param="prompt")
            return _Source(ids, [], offset, prefix + ids, None)
        messages = [*(previous.messages if previous is not None else []), *request.messages]
        context, spans = await self._conversation(request.model, messages)
        start = len(prefix)
        if context[:start] != prefix or len(context) == start:
            raise CompactionError(
                "the chat template does not render the previous handle's messages as a prefix "
                "of this conversation",
                param="messages",
            )
        spans = [[max(a, start) - start, b - start] for a, b in spans if b > start]
        return _Source(context[start:], spans, offset, context, messages)

    async def _conversation(
        self, model: str, messages: list[dict[str, Any]]
    ) -> tuple[list[int], list[list[int]]]:
        """A conversation's rendered tokens and the spans of its template's own tokens."""
        ids = await self.render(self.chat_request(model, messages))
        tokenizer = self.engine.get_tokenizer()
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if encoded["input_ids"] != ids:  # cannot map the template: keep only the first tokens
            return ids, []
        contents = [m.get("content") or "" for m in messages]
        spans = verbatim_spans(encoded["offset_mapping"], text, contents)
        return ids, [list(span) for span in spans]

    async def _capture_prompt(
        self, request: CompactRequest, source: _Source
    ) -> tuple[list[int], tuple[int, int], str]:
        """Tokens to prefill (after the previous handle's slots), which of them give the
        queries to keep, and the query source used."""
        total, room = len(source.ids), self.max_model_len - source.offset
        # Repeat queries need about 2T positions; past the model's context, fall back to causal
        # context queries and say so in the answer. Checked before rendering too, which would
        # be time spent for nothing.
        if request.queries == "repeat" and 2 * total < room:
            repeated = await self._repeated(request, source)
            if repeated and len(repeated) + 1 <= room:
                return repeated, (total, len(repeated)), "repeat"
        # Self-study answers about the input alone: with `previous` they would have to be
        # generated on the previous handle too.
        if request.queries == "self-study" and request.previous is None:
            studied = await self_study_ids(self, request.model, source.ids, source.messages, room)
            if studied:
                return studied, (total, len(studied)), "self-study"
        return source.ids, (0, total), "context"

    async def render(self, request: Any) -> list[int]:
        rendered = await self.chat_serving.render_chat_request(request)
        if not isinstance(rendered, tuple):
            raise CompactionError(rendered.error.message, status=rendered.error.code)
        return list(rendered[1][0]["prompt_token_ids"])

    async def _repeated(self, request: CompactRequest, source: _Source) -> list[int]:
        """The input, a request to repeat it, and the input again (its queries are kept)."""
        ids = source.ids
        if request.kind == "prompt":
            text = f"\n\n{REPEAT_INSTRUCTION}\n\n"
            instruction = self.engine.get_tokenizer().encode(text, add_special_tokens=False)
            return ids + instruction + ids
        body = "\n\n".join(str(m.get("content") or "") for m in request.messages)
        turns = [
            {"role": "user", "content": REPEAT_INSTRUCTION},
            {"role": "assistant", "content": body},
        ]
        messages = [*source.messages, *turns]
        repeated = await self.render(self.chat_request(request.model, messages))
        # A template that renders the context differently inside a longer chat gives no
        # usable repeat queries.
        context = source.context
        return repeated[len(context) - len(ids) :] if repeated[: len(context)] == context else []

    @staticmethod
    def chat_request(
        model: str, messages: list[dict[str, Any]], generation_prompt: bool = False
    ) -> ChatCompletionRequest:
        return _WholeChat(model=model, messages=messages, add_generation_prompt=generation_prompt)


class _WholeChat(ChatCompletionRequest):
    """A chat rendered only for its token ids. A handle's whole conversation may be longer than
    the model's context (extensions make it so): only the compacted part and what follows it
    need to fit, which the callers check."""

    def build_tok_params(self, model_config: Any) -> Any:
        return dataclasses.replace(super().build_tok_params(model_config), max_total_tokens=None)


@dataclasses.dataclass
class _Source:
    """What one compaction reads: `ids` are compacted, prefilled `offset` positions in (after
    the previous handle's slots, for an extension)."""

    ids: list[int]
    protected: list[list[int]]  # [start, end) spans of ids kept verbatim (chat template)
    offset: int
    context: list[int]  # every token of the context so far: the previous handle's, then ids
    messages: list[dict[str, Any]] | None  # the whole conversation, for a messages handle


@dataclasses.dataclass
class _Chunk:
    """Tokens [start, end) of the input, compacted in one pass to `budget` rows."""

    start: int
    end: int
    budget: int
    protected: list[list[int]]  # spans kept verbatim, relative to start


@dataclasses.dataclass
class Link:
    """A handle the workers hold that the next chunk is prefilled after."""

    id: str
    slots: int
    rows: int  # compacted rows before the padding to whole blocks
    bytes: int = 0
    prefill_s: float = 0.0
    compact_s: float = 0.0
    made_here: bool = False  # one of this call's steps, not the caller's previous handle


def placement(tenant: str, handle_id: str, slots: int) -> tuple[str, dict]:
    """Cache salt and kv_transfer_params of a request that continues from a handle."""
    return private_salt(f"{tenant}:{handle_id}"), signed({"handle": handle_id, "slots": slots})


def _progress(number: int, chunks: list[_Chunk], done: int, began: float) -> CompactionProgress:
    return CompactionProgress(
        chunk=number,
        chunks=len(chunks),
        tokens_done=done,
        total_tokens=chunks[-1].end,
        elapsed_s=time.perf_counter() - began,
    )


def _budget(request: CompactRequest, total: int) -> int:
    if request.target_tokens is not None:
        if request.target_tokens >= total:
            raise CompactionError(
                f"target_tokens {request.target_tokens} must be below the input's {total} tokens",
                param="target_tokens",
            )
        return request.target_tokens
    return max(1, math.ceil(total / (request.ratio or DEFAULT_RATIO)))
