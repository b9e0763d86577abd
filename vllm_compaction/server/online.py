"""Online compaction: `context_management` on a chat or completion request compacts the
request's own context whenever its cache reaches a threshold, and generation goes on from the
compacted context, so a long generation runs under a fixed cache size.

The generation runs in segments, each an engine request that stops where the cache reaches the
threshold. Between segments everything but the newest `keep_last` tokens is compacted on the
workers, folded together with the rows of the compaction before (as `POST /v1/compact` with
`previous` and `recompact` does), with the causal queries of the tokens it replaces. The
handles made on the way belong to this request alone and are dropped when it ends.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from typing import Any

from vllm import SamplingParams
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatMessage,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionResponse,
    CompletionResponseChoice,
)
from vllm.entrypoints.serve.engine.protocol import UsageInfo
from vllm.inputs.engine import tokens_input
from vllm.logprobs import Logprob

from vllm_compaction.server import metrics
from vllm_compaction.server.errors import CompactionError
from vllm_compaction.server.protocol import ContextManagement
from vllm_compaction.server.service import PLACEHOLDER_ID, CompactionService, Link, placement

logger = logging.getLogger(f"vllm.{__name__}")

KEEP_FIRST = 4  # the context's first rows stay verbatim through every compaction (sinks)
PARAM = "context_management"


@dataclasses.dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_tokens: int  # the handle's slots, if the request named one, + the prompt's tokens
    compactions: int
    prompt_logprobs: list[dict[int, Logprob] | None] | None  # of the prompt's tokens

    def usage(self) -> UsageInfo:
        completion = len(self.token_ids)
        return UsageInfo(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
            compactions=self.compactions,
        )


async def generate(
    service: CompactionService,
    request: Any,
    settings: ContextManagement,
    tenant: str,
    handle_id: str | None,
    defaults: dict[str, Any],
) -> CompletionResponse | ChatCompletionResponse:
    """Serve a completion or chat request (on a handle, if `handle_id`) under `settings`."""
    chat = isinstance(request, ChatCompletionRequest)
    link = None
    if handle_id is not None:
        if chat:
            record, ids = await service.chat_ids(handle_id, request, tenant)
        else:
            record, ids = await service.completion_ids(handle_id, request.prompt, tenant)
        link = Link(handle_id, record.slots, record.info.compacted_tokens)
    elif chat:
        ids = await service.render(request)
    else:
        ids = service.prompt_ids(request.prompt, request.add_special_tokens)
    generation = OnlineGeneration(service, settings, tenant, ids, link)
    asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
    max_tokens = asked or defaults.get("max_tokens") or service.max_model_len
    params = request.to_sampling_params(max_tokens, defaults)
    result = await generation.run(params, max_tokens, request.prompt_logprobs)
    return (chat_response if chat else completion_response)(request, result)


def completion_response(request: Any, result: Generation) -> CompletionResponse:
    choice = CompletionResponseChoice(
        index=0,
        text=result.text,
        finish_reason=result.finish_reason,
        stop_reason=result.stop_reason,
        token_ids=result.token_ids if request.return_token_ids else None,
        prompt_logprobs=result.prompt_logprobs,
    )
    return CompletionResponse(model=request.model, choices=[choice], usage=result.usage())


def chat_response(request: Any, result: Generation) -> ChatCompletionResponse:
    choice = ChatCompletionResponseChoice(
        index=0,
        message=ChatMessage(role="assistant", content=result.text),
        finish_reason=result.finish_reason,
        stop_reason=result.stop_reason,
        token_ids=result.token_ids if request.return_token_ids else None,
    )
    return ChatCompletionResponse(
        model=request.model,
        choices=[choice],
        usage=result.usage(),
        prompt_logprobs=result.prompt_logprobs,
    )


def unavailable(request: Any) -> list[str]:
    """Request fields a segmented generation cannot honour (each segment is its own engine
    request: a stream, several choices, logprobs or tools would have to be stitched)."""
    used = {
        "stream": bool(request.stream),
        "n": (request.n or 1) > 1,
        "logprobs": bool(request.logprobs) or bool(getattr(request, "top_logprobs", None)),
        "echo": bool(getattr(request, "echo", False)),
        "truncate_prompt_tokens": request.truncate_prompt_tokens is not None,
        "use_beam_search": request.use_beam_search,
        "tools": bool(getattr(request, "tools", None)),
    }
    return [name for name, on in used.items() if on]


class OnlineGeneration:
    """One request's generation under `settings`, from `ids` after `link`'s slots (a handle
    the request named, or none)."""

    def __init__(
        self,
        service: CompactionService,
        settings: ContextManagement,
        tenant: str,
        ids: list[int],
        link: Link | None,
    ) -> None:
        self.service, self.settings, self.tenant = service, settings, tenant
        self.link, self.tail = link, []  # the cache: the link's slots, then the tail's tokens
        self.pending = list(ids)  # prompt tokens not in the cache yet
        self.prompt_tokens = self._cache() + len(ids)
        self.compactions = 0
        self._check()

    def _check(self) -> None:
        """Refuse settings under which a compaction could not make room (checked up front: the
        sizes at every compaction follow from them)."""
        limit, keep = self.settings.compact_threshold, self.settings.keep_last
        context = self.service.max_model_len
        if limit > context:
            raise CompactionError(
                f"compact_threshold {limit} exceeds the model's context of {context}",
                param=PARAM,
            )
        slots = self.link.slots if self.link is not None else 0
        if slots + keep >= limit:
            raise CompactionError(
                f"{slots} compacted slots + keep_last {keep} leave nothing to compact below "
                f"compact_threshold {limit}",
                param=PARAM,
            )
        # Every compaction happens at the threshold and replaces at most limit - keep rows and
        # tokens: it must leave room for at least one more token.
        after = self._slots_after(limit - keep) + keep
        if after >= limit:
            raise CompactionError(
                f"a compaction at {limit} tokens would leave {after} (keep_fraction of the rest "
                f"in whole KV blocks of {self.service.block_size}, + keep_last), not below "
                "compact_threshold: raise compact_threshold or lower keep_fraction or keep_last",
                param=PARAM,
            )

    def _budget(self, rows: int) -> int:
        return min(rows - 1, max(math.ceil(self.settings.keep_fraction * rows), KEEP_FIRST + 1))

    def _slots_after(self, rows: int) -> int:
        size = self.service.block_size
        return math.ceil(self._budget(rows) / size) * size

    async def run(
        self, params: SamplingParams, max_tokens: int, prompt_logprobs: int | None = None
    ) -> Generation:
        """Read the prompt, then generate, compacting whenever the cache is full; with
        `prompt_logprobs`, score each prompt stretch as it is read (teacher forcing through
        the compactions)."""
        generated: list[int] = []
        scores: list[dict[int, Logprob] | None] = []
        text, finish, stop = "", None, None
        try:
            while self.pending:
                await self._make_room()
                take = self.pending[: self.settings.compact_threshold - self._cache()]
                if prompt_logprobs is not None:
                    scores += await self._score(take, prompt_logprobs)
                self.tail += take
                del self.pending[: len(take)]
            while len(generated) < max_tokens:
                await self._make_room()
                room = self.settings.compact_threshold - self._cache()
                out = await self._segment(params, min(room, max_tokens - len(generated)), generated)
                finish, stop = out.finish_reason, out.stop_reason
                tokens, boundary = list(out.token_ids), len(text)
                text += out.text
                if across := self._stop_across(params, generated, tokens, text, boundary):
                    count, text, stop = across
                    tokens, finish = tokens[:count], "stop"
                generated += tokens
                self.tail += tokens
                if finish != "length":
                    break
        finally:
            await self._drop_own_link()
        return Generation(
            text,
            generated,
            finish,
            stop,
            self.prompt_tokens,
            self.compactions,
            scores if prompt_logprobs is not None else None,
        )

    async def _make_room(self) -> None:
        if self._cache() < self.settings.compact_threshold:
            return
        await self._compact()
        self.compactions += 1
        metrics.ONLINE_COMPACTIONS.inc()
        if self._cache() >= self.settings.compact_threshold:  # _check rules this out
            raise CompactionError("a compaction made no room", status=500)

    async def _drop_own_link(self) -> None:
        """Free the current handle if this request made it (never the caller's handle)."""
        if self.link is not None and self.link.made_here:
            await self.service.engine.collective_rpc("compaction_delete", args=(self.link.id,))

    def _cache(self) -> int:
        return (self.link.slots if self.link is not None else 0) + len(self.tail)

    async def _compact(self) -> None:
        """Compact the previous rows and every token but the last keep_last into one handle."""
        keep = self.settings.keep_last
        region = self.tail[: len(self.tail) - keep]
        rows = (self.link.rows if self.link is not None else 0) + len(region)
        options = {
            "budget": self._budget(rows),
            "keep_first": KEEP_FIRST,
            "protected": [],
            "method": "am-highest",
            "causal": True,
            "fold": self.link is not None,
        }
        made = await self.service.compact_on_workers(
            region, len(region), (0, len(region)), self.link, options
        )
        await self._drop_own_link()  # the compaction before, folded into this one
        logger.info(
            "online compaction %s: %d rows -> %d in %.1f s",
            made.id, rows, made.rows, made.prefill_s + made.compact_s,
        )  # fmt: skip
        self.link, self.tail = made, self.tail[len(region) :]

    async def _segment(self, params: SamplingParams, tokens: int, generated: list[int]) -> Any:
        """Generate up to `tokens` tokens after the current context, `generated` of them so far
        (a CompletionOutput)."""
        segment = params.clone()
        segment.max_tokens = tokens
        segment.min_tokens = min(tokens, max(0, params.min_tokens - len(generated)))
        # The prompt was scored stretch by stretch; skipping the prefix cache would also skip
        # the handle's slots.
        segment.prompt_logprobs, segment.skip_reading_prefix_cache = None, False
        return (await self._request(self.tail, segment)).outputs[0]

    def _stop_across(
        self,
        params: SamplingParams,
        generated: list[int],
        tokens: list[int],
        text: str,
        boundary: int,
    ) -> tuple[int, str, str] | None:
        """A stop string that begins before `boundary`, where the segment of `tokens` begins in
        `text`, and ends after it: the segment's engine request never saw the text before.
        Returns how many of `tokens` to keep (up to the one completing it), the text cut as
        vLLM cuts it, and the stop string; None if there is none (a stop string wholly inside
        the segment already ended it)."""
        found = [
            (at, s)
            for s in params.stop or []
            if s and -1 < (at := text.find(s, max(0, boundary - len(s) + 1))) < boundary
        ]
        if not found:
            return None
        at, string = min(found)
        # Decoded after the tokens before the segment, as vLLM's detokenizer reads a segment
        # after its prompt (a lone token can decode differently, e.g. without its leading space).
        tokenizer, skip = self.service.engine.get_tokenizer(), params.skip_special_tokens
        before = generated[-8:]

        def chars(ids: list[int]) -> int:
            return len(tokenizer.decode(ids, skip_special_tokens=skip))

        offset, need = chars(before), at + len(string) - boundary
        count = next(
            (k for k in range(1, len(tokens)) if chars(before + tokens[:k]) - offset >= need),
            len(tokens),
        )
        if len(generated) + count <= params.min_tokens:
            return None
        return count, text[: at + len(string) if params.include_stop_str_in_output else at], string

    async def _score(self, take: list[int], top: int) -> list[dict[int, Logprob] | None]:
        """Prompt logprobs of `take` read after the current context."""
        # Not a token from the prefix cache: vLLM scores only the positions it computes. The
        # handle's slots come through the KV connector, which the default would skip.
        params = SamplingParams(
            max_tokens=1, prompt_logprobs=top, detokenize=False, skip_reading_prefix_cache=False
        )
        final = await self._request(self.tail + take, params, salt=uuid.uuid4().hex)
        scores = final.prompt_logprobs[len(final.prompt_token_ids) - len(take) :]
        if self.link is not None and not self.tail:  # predicted from a slot: never computed
            scores[0] = None
        return scores

    async def _request(self, ids: list[int], params: SamplingParams, salt: str = "") -> Any:
        """One engine request for `ids` after the current handle (if any); its final output."""
        if self.link is None:
            prompt = tokens_input(ids, cache_salt=salt or None)
        else:
            handle_salt, transfer = placement(self.tenant, self.link.id, self.link.slots)
            params.extra_args = {**(params.extra_args or {}), "kv_transfer_params": transfer}
            slots = [PLACEHOLDER_ID] * self.link.slots
            prompt = tokens_input(slots + ids, cache_salt=f"{handle_salt}{salt}")
        outputs = self.service.engine.generate(prompt, params, f"online-{uuid.uuid4().hex}")
        return [out async for out in outputs][-1]  # FINAL_ONLY: one output at the end
