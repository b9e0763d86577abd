"""Token ids of chat conversations, split into a context and the turns that follow it.

A context is rendered with the tokenizer's chat template; the tokens of its body (the document
text) may be compacted, every other token (template, instructions) is kept verbatim. Later turns
are the exact text the template appends after the context, so context + turn tokenizes as the
whole conversation does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

Messages = Sequence[dict[str, str]]
REPEAT_REQUEST = "Repeat the previous text verbatim."


@dataclass(frozen=True)
class ChatContext:
    """A rendered chat context.

    Attributes:
        ids: [T] long token ids.
        protected: [T] bool, True for tokens outside the body (kept verbatim, never compacted).
        messages: the conversation it renders.
    """

    ids: Tensor
    protected: Tensor
    messages: tuple[dict[str, str], ...]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def protected_spans(self) -> list[tuple[int, int]]:
        """The protected tokens as maximal runs [start, end)."""
        flags = [False, *self.protected.tolist(), False]
        edges = [i for i in range(len(flags) - 1) if flags[i + 1] != flags[i]]
        return list(zip(edges[::2], edges[1::2], strict=True))


@dataclass(frozen=True)
class Turn:
    """Tokens appended after a context.

    Attributes:
        ids: [L] long token ids.
        target: [L] bool, True for the tokens to score (e.g. a teacher-forced answer).
    """

    ids: Tensor
    target: Tensor


def render(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, generation_prompt: bool = False
) -> str:
    """The chat template's text for `messages` ("" for no messages)."""
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of already-templated text (the template carries its own special tokens)."""
    return tokenizer(text, add_special_tokens=False).input_ids


def chat_token_count(tokenizer: PreTrainedTokenizerBase) -> Callable[[Messages], int]:
    """A `count_tokens(messages)` for `vllm_compaction.documents.squad_article`."""
    return lambda messages: len(encode(tokenizer, render(tokenizer, messages)))


def encode_context(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, body: str
) -> ChatContext:
    """Tokenize `messages`; tokens lying entirely inside the last occurrence of `body` are
    compactable, all others protected."""
    text = render(tokenizer, messages)
    start = text.rfind(body)
    if start < 0:
        raise ValueError("the body does not occur in the rendered chat")
    end = start + len(body)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [a >= start and b <= end for a, b in encoded["offset_mapping"]]
    return ChatContext(
        ids=torch.tensor(encoded.input_ids),
        protected=~torch.tensor(inside),
        messages=tuple(messages),
    )


def _appended_text(
    tokenizer: PreTrainedTokenizerBase, history: Messages, new: Messages, generation_prompt: bool
) -> str:
    before = render(tokenizer, history)
    after = render(tokenizer, [*history, *new], generation_prompt)
    if not after.startswith(before):
        raise ValueError("the chat template does not render the history as a prefix")
    return after[len(before) :]


def appended_turn(
    tokenizer: PreTrainedTokenizerBase, history: Messages, messages: Messages
) -> Turn:
    """The tokens `messages` add after `history`, all of them targets."""
    ids = torch.tensor(encode(tokenizer, _appended_text(tokenizer, history, messages, False)))
    return Turn(ids=ids, target=torch.ones_like(ids, dtype=torch.bool))


def repeat_turn(tokenizer: PreTrainedTokenizerBase, history: Messages, body: str) -> Turn:
    """The repeat-prefill turns after `history`: a user asks for the text verbatim and the
    assistant answers with `body` (the queries to keep)."""
    repeat = [{"role": "user", "content": REPEAT_REQUEST}, {"role": "assistant", "content": body}]
    return appended_turn(tokenizer, history, repeat)


def generation_prompt(
    tokenizer: PreTrainedTokenizerBase, history: Messages, messages: Messages
) -> list[int]:
    """The tokens `messages` add after `history`, up to where the assistant's answer begins."""
    return encode(tokenizer, _appended_text(tokenizer, history, messages, True))


def answer_turn(
    tokenizer: PreTrainedTokenizerBase, history: Messages, question: str, answer: str
) -> Turn:
    """A user `question` after `history`, then the assistant's `answer` (the targets)."""
    prompt_ids = generation_prompt(tokenizer, history, [{"role": "user", "content": question}])
    answer_ids = encode(tokenizer, answer)
    target = [False] * len(prompt_ids) + [True] * len(answer_ids)
    return Turn(ids=torch.tensor(prompt_ids + answer_ids), target=torch.tensor(target))
