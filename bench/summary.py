"""Text-summary baselines for the side-by-side report (#7), on the task of bench/fidelity.py.

`summary`: the model (greedy) summarises the article within a token budget of T / r, and each
question is scored over a chat that holds the summary instead of the article. `summary+am`: the
summary of the smallest ratio is read once more and its cache compacted by Attention Matching
(default options) by a further factor, as in the paper's summary + compaction result; its ratio
is the product. Reported ratios are nominal; `actual_ratio` is T / the rows the questions attend to.

    python -m bench.summary --articles 0-1        # summary at 5x-50x, summary+am at 10x-50x
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vllm_compaction import documents, hf
from vllm_compaction.core import compact_cache
from vllm_compaction.documents import Question
from vllm_compaction.models import pull

from . import fidelity
from .output import RESUME_HELP, parse_indices, saved_runs, write_json

logger = logging.getLogger("bench.summary")

RATIOS = (5, 10, 20, 50)
AM_FACTORS = (2, 4, 10)  # on the 5x summary: 10x, 20x, 50x in all
INSTRUCTION = (
    "Summarise the article above in at most {words} words. Keep the names, dates, numbers and "
    "facts someone might ask about."
)
SUMMARY_PROMPT = "Read this summary of an article:\n"


@torch.inference_mode()
def summarise(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    history: list[dict[str, str]],
    budget: int,
) -> str:
    """The model's greedy summary of the article in `history`, cut at `budget` tokens."""
    request = [*history, {"role": "user", "content": INSTRUCTION.format(words=budget * 3 // 4)}]
    prompt = tokenizer.apply_chat_template(request, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    # The reference attention has no KV-cache decoding (its causal mask assumes L_q = L_k).
    with hf.attention_implementation(model, "sdpa"):
        out = model.generate(ids, max_new_tokens=budget, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def summary_conditions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    reading: fidelity.Reading,
    questions: Sequence[Question],
    ratios: Sequence[float],
    factors: Sequence[float],
) -> list[dict[str, Any]]:
    """Every summary and summary+am condition of one article."""
    t = len(reading.context)
    messages = list(reading.context.messages)
    template = hf.chat_token_count(tokenizer)([{"role": "user", "content": SUMMARY_PROMPT}])
    conditions = []
    for ratio in ratios:
        text = summarise(model, tokenizer, messages, max(8, t // ratio - template))
        history = [{"role": "user", "content": SUMMARY_PROMPT + text}]
        context = hf.encode_context(tokenizer, history, text)
        n = len(context)
        layers = hf.capture(model, context.ids, n, {"context": (0, n)})
        turns = [hf.answer_turn(tokenizer, history, q.text, q.answer) for q in questions]
        prefix = [layer.full_prefix() for layer in layers]
        nll, each = fidelity.answer_nll(model, prefix, n, turns)
        logger.info("  summary %4gx  %d tokens  nll %.3f", ratio, n, nll)
        conditions.append(_condition("summary", ratio, t / n, nll, each, text))
        if ratio != min(ratios):
            continue
        verbatim = int(context.protected.sum()) + fidelity.KEEP_FIRST
        for factor in factors:
            if n / factor < verbatim:  # the template tokens alone take more than the budget
                logger.info(
                    "  summary+am %4gx: skipped, %d rows < %d", ratio * factor, n / factor, verbatim
                )
                continue
            compacted = compact_cache(
                [layer.keys for layer in layers],
                [layer.values for layer in layers],
                [layer.queries["context"].vectors for layer in layers],
                ratio=factor,
                query_positions=[layer.queries["context"].positions for layer in layers],
                keep_first=fidelity.KEEP_FIRST,
                protected=context.protected_spans(),
            )
            nll, each = fidelity.answer_nll(model, compacted, n, turns)
            rows = int(compacted[0].lengths.max())
            logger.info("  summary+am %4gx  %d rows  nll %.3f", ratio * factor, rows, nll)
            conditions.append(_condition("summary+am", ratio * factor, t / rows, nll, each, text))
    return conditions


def _condition(
    variant: str, ratio: float, actual: float, nll: float, each: list[float], text: str
) -> dict[str, Any]:
    return {
        "variant": variant,
        "ratio": ratio,
        "actual_ratio": actual,
        "nll": nll,
        "per_question": each,
        "summary": text,
    }


def run_article(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    index: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    reading = fidelity.cached_reading(model, tokenizer, index, args, repeat=False)
    article = documents.squad_article(
        index, hf.chat_token_count(tokenizer), args.max_tokens, args.questions
    )
    none, none_each = fidelity.answer_nll(model, None, 0, reading.bare_turns)
    full_prefix = [layer.full_prefix() for layer in reading.layers]
    full, full_each = fidelity.answer_nll(model, full_prefix, len(reading.context), reading.turns)
    logger.info("article %d %r: none %.3f  full %.3f", index, reading.title, none, full)
    return {
        "index": index,
        "title": reading.title,
        "context_tokens": len(reading.context),
        "questions": len(reading.turns),
        "none": {"nll": none, "per_question": none_each},
        "full": {"nll": full, "per_question": full_each},
        "conditions": summary_conditions(
            model, tokenizer, reading, article.questions, args.ratios, args.am_factors
        ),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--articles", default="0-1", help="SQuAD article indices, e.g. 0-19")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument(
        "--am-factors",
        type=float,
        nargs="+",
        default=list(AM_FACTORS),
        help="summary+am: how much further the smallest ratio's summary is compacted",
    )
    parser.add_argument("--model", default=fidelity.MODEL)
    parser.add_argument("--max-tokens", type=int, default=3000)
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--readings", help="bench/fidelity.py's folder of captured readings")
    parser.add_argument("--tag", default="summary", help="name of the result file")
    parser.add_argument("--resume", action="store_true", help=RESUME_HELP)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    config = vars(args)
    same = ("model", "ratios", "am_factors", "max_tokens", "questions")
    done = saved_runs(args.tag, config, same, "articles", "index") if args.resume else {}
    model, tokenizer = hf.load_model(pull(args.model))
    runs = []
    for index in parse_indices(args.articles):
        if index in done:
            logger.info("article %d: kept from bench/results/%s.json", index, args.tag)
            runs.append(done[index])
            continue
        runs.append(run_article(model, tokenizer, index, args))
        write_json(args.tag, {"config": config, "articles": runs})


if __name__ == "__main__":
    main()
