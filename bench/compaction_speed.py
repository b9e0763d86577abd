"""Compaction time against the model's own prefill time, on real text.

SmolLM2-135M (fp32, transformers, CPU) reads about T tokens of the Paul Graham essays in one user
turn, for T = 1k, 2k, 4k, 8k. Measured per T:

- prefill: the model's stock forward over the context (sdpa attention);
- context queries: compaction of every layer with the context's own queries (causal), which
  the prefill produces anyway;
- repeat queries: the extra repeat-prefill forward ([context][repeat request][context again],
  capturing its queries) plus the compaction of every layer with those queries.

    python -m bench.compaction_speed                # T = 1024 2048 4096 8192, 10x
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vllm_compaction import documents, hf
from vllm_compaction.core import compact_cache
from vllm_compaction.models import pull

from .output import markdown_table, update_doc, write_json

logger = logging.getLogger("bench.compaction_speed")

MODEL = "smollm2-135m"
LENGTHS = (1024, 2048, 4096, 8192)
RATIO = 10.0


def seconds(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def essay_context(tokenizer: PreTrainedTokenizerBase, length: int) -> tuple[hf.ChatContext, str]:
    """A chat context of about `length` tokens of essay text, and that text."""
    overhead = hf.chat_token_count(tokenizer)([{"role": "user", "content": documents.READ_PROMPT}])
    ids = tokenizer(documents.paul_graham_text()[: length * 8], add_special_tokens=False).input_ids
    text = tokenizer.decode(ids[: length - overhead])
    messages = [{"role": "user", "content": documents.READ_PROMPT + text}]
    return hf.encode_context(tokenizer, messages, text), text


@torch.inference_mode()
def prefill(model: PreTrainedModel, ids: torch.Tensor) -> None:
    """The model's own forward with its stock attention, as a serving prefill runs it."""
    with hf.attention_implementation(model, "sdpa"):
        model(input_ids=ids[None], logits_to_keep=1)


def compact_all(
    context: hf.ChatContext, layers: list[hf.LayerCapture], source: str, args: argparse.Namespace
) -> None:
    queries = [layer.queries[source] for layer in layers]
    compact_cache(
        [layer.keys for layer in layers],
        [layer.values for layer in layers],
        [q.vectors for q in queries],
        ratio=args.ratio,
        query_positions=[q.positions for q in queries],
        protected=context.protected_spans(),
        method=args.method,
        **({} if args.max_queries is None else {"max_queries": args.max_queries}),
    )


def measure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    context, text = essay_context(tokenizer, length)
    t = len(context)
    _, prefill_s = seconds(lambda: prefill(model, context.ids))
    layers, capture_s = seconds(lambda: hf.capture(model, context.ids, t, {"context": (0, t)}))
    _, context_s = seconds(lambda: compact_all(context, layers, "context", args))
    del layers
    repeat = hf.repeat_turn(tokenizer, context.messages, text)
    ids = torch.cat([context.ids, repeat.ids])
    layers, repeat_prefill_s = seconds(
        lambda: hf.capture(model, ids, t, {"repeat": (t, ids.shape[0])})
    )
    _, repeat_s = seconds(lambda: compact_all(context, layers, "repeat", args))
    row = {
        "tokens": t,
        "prefill_s": prefill_s,
        "capture_prefill_s": capture_s,
        "compact_context_s": context_s,
        "repeat_prefill_s": repeat_prefill_s,
        "compact_repeat_s": repeat_s,
    }
    logger.info("%s", row)
    return row


def table(rows: Sequence[dict[str, Any]]) -> str:
    header = [
        "T",
        "prefill s",
        "compact, context queries s",
        "x prefill",
        "repeat prefill s",
        "compact, repeat queries s",
        "repeat total x prefill",
    ]
    body = [
        [
            r["tokens"],
            r["prefill_s"],
            r["compact_context_s"],
            r["compact_context_s"] / r["prefill_s"],
            r["repeat_prefill_s"],
            r["compact_repeat_s"],
            (r["repeat_prefill_s"] + r["compact_repeat_s"]) / r["prefill_s"],
        ]
        for r in rows
    ]
    return markdown_table(header, body)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--ratio", type=float, default=RATIO)
    parser.add_argument("--method", default="am-highest")
    parser.add_argument(
        "--max-queries", type=int, help="reference queries per head (core default if unset)"
    )
    parser.add_argument("--tag", default="compaction_speed")
    parser.add_argument("--no-doc", action="store_true", help="do not update the docs table")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    model, tokenizer = hf.load_model(pull(MODEL))
    prefill(model, torch.arange(64))  # warm-up: first calls pay one-off costs
    rows = [measure(model, tokenizer, length, args) for length in args.lengths]
    text = table(rows)
    print(text)
    config = {
        "model": MODEL,
        "ratio": args.ratio,
        "method": args.method,
        "max_queries": args.max_queries,
        "threads": torch.get_num_threads(),
    }
    write_json(args.tag, {"config": config, "rows": rows})
    if not args.no_doc:
        update_doc(
            args.tag,
            f"""## Compaction speed: {MODEL} (`bench/compaction_speed.py`)

fp32 transformers on CPU, {torch.get_num_threads()} threads; Paul Graham essays in one user turn.
Compaction: {args.method} at {args.ratio:g}x over all layers, max_queries
{args.max_queries or "default"}. "x prefill" divides by the model's own prefill of the context.
Repeat queries cost an extra forward over about T more tokens
(past SmolLM2's 8k positions at T = 8k: timing only).
Data: `bench/results/{args.tag}.json`.

{text}
""",
        )


if __name__ == "__main__":
    main()
