"""kvpress baselines on our fidelity task; runs inside the kvpress side venv (issue #7).

Started by `bench/presses.py`, never by hand in the main venv: this file imports torch,
transformers and kvpress only (no vllm_compaction; kvpress pins transformers<5.3). Run it with
`python -P` so that the other files of bench/ do not shadow installed modules.

Input JSON (written by bench/presses.py from our tokenizer, so the token ids are ours):
    {"article": i, "title": ..., "context_ids": [T], "protected": [T] bools,
     "turns": [{"ids": [L], "target": [L]}], "bare_turns": [...]}
"turns" follow the article (question turn + teacher-forced gold answer); "bare_turns" are the
same turns with no article. Each press compresses the context's cache during the prefill, the way
kvpress's own pipeline does (`with press(model): model.model(context, past_key_values=cache)`);
each turn is then scored over that cache at its original positions and cut off again.

Budget: our ratio r is T / kept rows, kvpress's compression_ratio the fraction removed. A ratio r
keeps t = round(T / r) rows (as ours does), passed as compression_ratio = 1 - (t + 0.5) / T so
that kvpress's int(T * (1 - compression_ratio)) is exactly t. With --protect on, the chat-template
tokens (ours keeps them verbatim) are kept first, inside the same t.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import kvpress
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import logging as transformers_logging

PRESSES = {
    "snapkv": kvpress.SnapKVPress,
    "expected-attention": kvpress.ExpectedAttentionPress,
    "kvzip": kvpress.KVzipPress,
    "streaming-llm": kvpress.StreamingLLMPress,
    "tova": kvpress.TOVAPress,
    "keydiff": kvpress.KeyDiffPress,
    "knorm": kvpress.KnormPress,
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def kept_rows(length: int, ratio: float) -> int:
    """Rows a ratio keeps: the same rounding as vllm_compaction.core."""
    return max(1, round(length / ratio))


def removed_fraction(length: int, ratio: float) -> float:
    """kvpress's compression_ratio that keeps exactly kept_rows(length, ratio)."""
    return 1.0 - (kept_rows(length, ratio) + 0.5) / length


def protect(press: Any, protected: torch.Tensor) -> Any:
    """Make `press` keep the `protected` positions [T] first (the rest of its budget unchanged)."""
    if isinstance(press, kvpress.ScorerPress):
        score = press.score

        def protected_score(*args: Any, **kwargs: Any) -> torch.Tensor:
            scores = score(*args, **kwargs)
            return scores.masked_fill(protected.to(scores.device), torch.finfo(scores.dtype).max)

        press.score = protected_score
    elif isinstance(press, kvpress.KVzipPress):
        compress_post = press.compress_post

        def protected_compress_post(model: Any) -> None:
            press.score_val[..., protected] = press.score_val.amax() + 1.0
            compress_post(model)

        press.compress_post = protected_compress_post
    else:
        raise ValueError(f"--protect is not implemented for {type(press).__name__}")
    return press


def cache_rows(cache: DynamicCache, model: Any) -> float:
    """Rows left per layer and KV head, averaged (kvpress's head-wise presses only mask keys)."""
    total = sum(layer.keys.shape[2] for layer in cache.layers)
    heads, layers = model.config.num_key_value_heads, len(cache.layers)
    masked = 0
    for layer in model.model.layers:
        indices = getattr(layer.self_attn, "masked_key_indices", None)
        if indices is not None:
            masked += len(indices[0])
    return (total * heads - masked) / (layers * heads)


@torch.inference_mode()
def turn_nll(model: Any, cache: DynamicCache | None, start: int, turn: dict[str, Any]) -> tuple:
    """(summed NLL, count) of a turn's target tokens read after `cache` from position `start`.

    The turn's first token is not scored (its logit belongs to the context's last token). The
    turn's rows are cut off the cache afterwards.
    """
    ids = torch.tensor(turn["ids"])[None]
    target = torch.tensor(turn["target"])[1:]
    lengths = [layer.keys.shape[2] for layer in cache.layers] if cache is not None else []
    positions = torch.arange(start, start + ids.shape[1])[None]
    logits = model(input_ids=ids, past_key_values=cache, position_ids=positions).logits[0]
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    nll = -logprobs.gather(1, ids[0, 1:, None]).squeeze(1)[target]
    if cache is not None:
        for layer, length in zip(cache.layers, lengths, strict=True):
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
    return float(nll.sum()), nll.numel()


def score_turns(model: Any, cache: DynamicCache | None, start: int, turns: list) -> dict:
    """Mean NLL per answer token over all turns, and each turn's own mean."""
    total, count, each = 0.0, 0, []
    for turn in turns:
        s, n = turn_nll(model, cache, start, turn)
        total, count = total + s, count + n
        each.append(s / n)
    return {"nll": total / count, "per_question": each}


@torch.inference_mode()
def prefill(model: Any, context: torch.Tensor, press: Any | None) -> tuple[DynamicCache, float]:
    """The context's cache, compressed by `press` as kvpress's pipeline does it."""
    cache = DynamicCache()
    start = time.perf_counter()
    if press is None:
        model.model(input_ids=context[None], past_key_values=cache)
    else:
        with press(model):
            model.model(input_ids=context[None], past_key_values=cache)
    return cache, time.perf_counter() - start


def clear_masks(model: Any) -> None:
    """Forget head-wise masks a previous press left on the attention modules."""
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


def run(args: argparse.Namespace) -> dict[str, Any]:
    inputs = json.loads(Path(args.inputs).read_text())
    context = torch.tensor(inputs["context_ids"])
    protected = torch.tensor(inputs["protected"])
    protected[: args.keep_first] = True
    t = context.shape[0]
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    none = score_turns(model, None, 0, inputs["bare_turns"])
    cache, seconds = prefill(model, context, None)
    full = score_turns(model, cache, t, inputs["turns"])
    log(f"article {inputs['article']}: T={t} none {none['nll']:.3f} full {full['nll']:.3f}")
    conditions = []
    for ratio in args.ratios:
        for name in args.presses:
            for protected_too in args.protect:
                press = PRESSES[name](compression_ratio=removed_fraction(t, ratio))
                if protected_too:
                    protect(press, protected)
                clear_masks(model)
                cache, seconds = prefill(model, context, press)
                rows = cache_rows(cache, model)
                scored = score_turns(model, cache, t, inputs["turns"])
                label = name + ("+protect" if protected_too else "")
                nll = scored["nll"]
                log(f"  {label:22s} {ratio:4g}x  rows {rows:6.1f}  nll {nll:.3f}  ({seconds:.1f}s)")
                conditions.append(
                    {
                        "press": name,
                        "protect": protected_too,
                        "ratio": ratio,
                        "compression_ratio": press.compression_ratio,
                        "kept_rows": rows,
                        "prefill_seconds": seconds,
                        **scored,
                    }
                )
    return {
        "article": inputs["article"],
        "title": inputs["title"],
        "context_tokens": t,
        "versions": {p: version(p) for p in ("kvpress", "torch", "transformers")},
        "threads": torch.get_num_threads(),
        "none": none,
        "full": full,
        "conditions": conditions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="kvpress presses on one prepared article")
    parser.add_argument("--inputs", required=True, help="JSON from bench/presses.py")
    parser.add_argument("--model", required=True, help="the Hugging Face folder of the model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--presses", nargs="+", default=list(PRESSES), choices=list(PRESSES))
    parser.add_argument("--ratios", type=float, nargs="+", default=[10.0])
    parser.add_argument(
        "--protect",
        type=lambda s: s == "on",
        nargs="+",
        default=[False],
        help="off: kvpress compresses the whole context; on: template tokens kept first",
    )
    parser.add_argument("--keep-first", type=int, default=4, help="also protected with --protect")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()
    torch.manual_seed(0)
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
