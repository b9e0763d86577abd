"""Attention Matching against eviction on a real model reading real text, on held-out queries.

SmolLM2 reads a SQuAD article; the fit sees the context's own (causal) queries and the
repeat-prefill queries; the errors are measured on queries of question-and-answer turns about the
article, which the fit never saw: the article block's own attention output and its mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from vllm_compaction import documents, hf
from vllm_compaction.core import Errors, compact_cache, compaction_errors

pytestmark = pytest.mark.slow

RATIOS = (10, 20)
BASELINES = ("recent", "strided", "h2o", "snapkv", "kvzip", "random")
FIT_SOURCES = ("context", "repeat")
MAX_QUERIES = 2048  # per head; the [H, n, T] scores dominate the test's run time


@dataclass(frozen=True)
class Reading:
    context: hf.ChatContext
    fit: list[hf.LayerCapture]  # keys/values of the context, fit queries
    held_out: list[hf.LayerCapture]  # question-turn queries


@pytest.fixture(scope="module")
def reading(smollm2_dir) -> Reading:
    model, tokenizer = hf.load_model(smollm2_dir)
    article = documents.squad_article(0, hf.chat_token_count(tokenizer), max_tokens=1000)
    history = article.messages()
    context = hf.encode_context(tokenizer, history, article.text)
    t = len(context)

    repeat = hf.repeat_turn(tokenizer, history, article.text)
    fit = hf.capture(
        model,
        torch.cat([context.ids, repeat.ids]),
        t,
        {"context": (0, t), "repeat": (t, t + len(repeat.ids))},
    )
    qa = [
        {"role": role, "content": text}
        for q in article.questions
        for role, text in (("user", q.text), ("assistant", q.answer))
    ]
    questions = hf.appended_turn(tokenizer, history, qa)
    n = t + len(questions.ids)
    held_out = hf.capture(model, torch.cat([context.ids, questions.ids]), t, {"qa": (t, n)})
    return Reading(context, fit, held_out)


def mean_errors(reading: Reading, method: str, ratio: int) -> Errors:
    """Held-out errors of `method` at `ratio` over the article block, averaged over layers."""
    queries = [layer.select(FIT_SOURCES) for layer in reading.fit]
    compacted = compact_cache(
        [layer.keys for layer in reading.fit],
        [layer.values for layer in reading.fit],
        [q.vectors for q in queries],
        ratio=ratio,
        query_positions=[q.positions for q in queries],
        protected=reading.context.protected_spans(),
        method=method,
        max_queries=MAX_QUERIES,
    )
    errors = [
        compaction_errors(held.queries["qa"].vectors, held.keys, held.values, layer)
        for held, layer in zip(reading.held_out, compacted, strict=True)
    ]
    return Errors(
        output=sum(e.output for e in errors) / len(errors),
        log_mass=sum(e.log_mass for e in errors) / len(errors),
    )


@pytest.mark.parametrize("ratio", RATIOS)
def test_attention_matching_beats_every_baseline_on_held_out_queries(reading, ratio):
    am = mean_errors(reading, "am-highest", ratio)
    baselines = {method: mean_errors(reading, method, ratio) for method in BASELINES}
    worse_output = {m: e.output for m, e in baselines.items() if e.output <= am.output}
    worse_mass = {m: e.log_mass for m, e in baselines.items() if e.log_mass <= am.log_mass}
    assert not worse_output, f"output error {am.output:.4f} not below {worse_output}"
    assert not worse_mass, f"log-mass error {am.log_mass:.4f} not below {worse_mass}"
