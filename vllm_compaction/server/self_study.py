"""Self-study reference queries (`queries: "self-study"`): the model answers a few short tasks
about the context (a summary, its key facts, a question and its answer), and the queries of
those turns, read right after the context, are the ones the compaction fits. They ask about
the whole text, where the context's own queries mostly look back a little way."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

from vllm import SamplingParams
from vllm.inputs.engine import tokens_input

from vllm_compaction.self_study import ANSWER_TOKENS, TASKS

if TYPE_CHECKING:
    from vllm_compaction.server.service import CompactionService


async def self_study_ids(
    service: CompactionService,
    model: str,
    ids: list[int],
    messages: list[dict[str, Any]] | None,
    room: int,
) -> list[int]:
    """`ids` (a document's tokens, or a conversation's rendered tokens when `messages` is
    given) followed by the tasks and the model's greedy answers, within `room` positions;
    [] when not one task fits."""
    if len(ids) + ANSWER_TOKENS + 64 > room:  # 64: room for a task and its chat template
        return []
    if messages is None:
        encode = service.engine.get_tokenizer().encode
        asks = [encode(f"\n\n{task}\n", add_special_tokens=False) for task in TASKS]
        answers = await asyncio.gather(*(_answer(service, ids + ask) for ask in asks))
        studied = list(ids)
        for ask, answer in zip(asks, answers, strict=True):
            if len(studied) + len(ask) + len(answer) + 1 > room:
                break
            studied += ask + answer
        return studied if len(studied) > len(ids) else []
    turns = [[{"role": "user", "content": task}] for task in TASKS]
    prompts = [
        await service.render(service.chat_request(model, [*messages, *turn], True))
        for turn in turns
    ]
    answers = await asyncio.gather(*(_answer(service, prompt) for prompt in prompts))
    decode = service.engine.get_tokenizer().decode
    for turn, answer in zip(turns, answers, strict=True):
        turn.append({"role": "assistant", "content": decode(answer, skip_special_tokens=True)})
    # As many tasks as fit, all rendered after the conversation by its own template.
    for count in range(len(turns), 0, -1):
        extra = [message for turn in turns[:count] for message in turn]
        studied = await service.render(service.chat_request(model, [*messages, *extra]))
        if studied[: len(ids)] != ids:  # the template renders the context differently
            return []
        if len(studied) + 1 <= room:
            return studied
    return []


async def _answer(service: CompactionService, prompt: list[int]) -> list[int]:
    params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0)
    outputs = service.engine.generate(tokens_input(prompt), params, f"study-{uuid.uuid4().hex}")
    final = [out async for out in outputs][-1]
    return list(final.outputs[0].token_ids)
