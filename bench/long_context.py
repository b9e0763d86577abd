"""Long inputs: chunked /v1/compact of 16k-32k tokens against a plain prefill of the same input.

Serves Qwen2.5-Coder-0.5B-Instruct (fp32) with the plugin, packs SQuAD articles 0-19 into
inputs of each length, and for each one times a plain prefill (one generated token, no
prefix-cache hit) and a streaming `/v1/compact` at 20x with the default chunk size, recording
when each chunk's progress event arrives; then reads from the engine how many KV blocks a
session on the handle holds. Prints a table, writes bench/results/long_context.json and
docs/benchmarks-serving.md's "long inputs" section.

    python -m bench.long_context [--lengths 16000 32000] [--chunk-tokens N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx
from transformers import AutoTokenizer

from bench import serving
from bench.output import RESULTS, markdown_table, update_doc, write_json
from tests.server import served
from vllm_compaction import documents, models
from vllm_compaction.server.protocol import DEFAULT_CHUNK_TOKENS

MODEL = "qwen2.5-coder-0.5b"
RATIO = 20
BLOCK = 128  # vLLM's CPU default
QUESTION = " Summarise the text above in one sentence."
SESSION_TOKENS = 128  # generated per session


def _inputs(tokenizer, lengths: list[int]) -> list[list[int]]:
    """The first `length` tokens of SQuAD articles 0-19 read in order."""
    text = "\n\n".join(
        p["context"] for article in documents.squad()["data"][:20] for p in article["paragraphs"]
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < max(lengths):
        raise SystemExit(f"articles 0-19 hold {len(ids)} tokens, fewer than {max(lengths)}")
    return [ids[:length] for length in lengths]


def _prefill_s(base: str, ids: list[int]) -> float:
    body = {"model": MODEL, "prompt": ids, "max_tokens": 1, "cache_salt": str(time.time_ns())}
    began = time.perf_counter()
    httpx.post(f"{base}/v1/completions", json=body, timeout=3600).raise_for_status()
    return time.perf_counter() - began


def _session_blocks(base: str, handle_id: str) -> tuple[int, int]:
    """KV blocks a session on the handle held (read from the engine), and its own tokens."""
    body = {
        "model": MODEL,
        "prompt": QUESTION,
        "max_tokens": SESSION_TOKENS,
        "ignore_eos": True,
        "compaction": handle_id,
    }
    out = httpx.post(f"{base}/v1/completions", json=body, timeout=3600).raise_for_status().json()
    blocks = out["kv_transfer_params"]["compaction"]["blocks"]
    return len(blocks), out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]


def _compact(base: str, ids: list[int], chunk_tokens: int) -> dict:
    """A streaming compaction: the handle, and the seconds at which each chunk finished."""
    body = {
        "model": MODEL,
        "prompt": ids,
        "ratio": RATIO,
        "queries": "context",
        "chunk_tokens": chunk_tokens,
        "stream": True,
    }
    began, marks, handle = time.perf_counter(), [], None
    with httpx.stream("POST", f"{base}/v1/compact", json=body, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("object") == "compaction.progress" and event["chunk"]:
                marks.append(round(time.perf_counter() - began, 2))
            elif event.get("object") == "compaction":
                handle = event
            elif "error" in event:
                raise SystemExit(f"compaction failed: {event['error']['message']}")
    total = time.perf_counter() - began
    blocks, own = _session_blocks(base, handle["id"])
    httpx.delete(f"{base}/v1/compactions/{handle['id']}", timeout=60)
    return {
        "handle": handle,
        "chunk_done_s": marks,
        "total_s": total,
        "session_blocks": blocks,
        "full_blocks": -(-(len(ids) + own) // BLOCK),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Qwen's 32768 positions hold 32000 tokens and the session that follows.
    parser.add_argument("--lengths", type=int, nargs="+", default=[16000, 32000])
    parser.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    parser.add_argument(
        "--prefill-max",
        type=int,
        default=16000,
        help="time the plain prefill only up to this length (32k takes over an hour here)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the lengths the results file already has"
    )
    parser.add_argument("--no-doc", action="store_true", help="do not update the docs section")
    args = parser.parse_args()
    model_dir = models.pull(MODEL)
    inputs = _inputs(AutoTokenizer.from_pretrained(model_dir), args.lengths)
    logs = Path("bench/results")
    logs.mkdir(parents=True, exist_ok=True)
    # fp32: without AVX512-BF16 or AMX, vLLM's CPU GEMMs fall back to a slow bf16 path.
    flags = [MODEL, "--max-model-len", "32768", "--dtype", "float32"]
    saved = RESULTS / "long_context.json"
    done = {r["tokens"]: r for r in json.loads(saved.read_text())["rows"]} if args.resume else {}
    rows = []
    with served(flags, logs / "long_context.log") as base:
        for ids in inputs:
            if len(ids) in done:
                rows.append(done[len(ids)])
                continue
            prefill = _prefill_s(base, ids) if len(ids) <= args.prefill_max else None
            run = _compact(base, ids, args.chunk_tokens)
            handle = run["handle"]
            rows.append(
                {
                    "tokens": len(ids),
                    "chunks": handle["chunks"],
                    "compacted_tokens": handle["compacted_tokens"],
                    "prefill_s": prefill,
                    "compact_s": run["total_s"],
                    "x_prefill": run["total_s"] / prefill if prefill else None,
                    "chunk_done_s": run["chunk_done_s"],
                    "full_blocks": run["full_blocks"],
                    "session_blocks": run["session_blocks"],
                    "sessions_gain": run["full_blocks"] / run["session_blocks"],
                    "timing": handle["timing"],
                }
            )
            print(rows[-1], flush=True)
            data = {"model": MODEL, "chunk_tokens": args.chunk_tokens, "rows": rows}
            write_json("long_context", data)
    header = ["tokens", "chunks", "compacted", "prefill s", "compact s", "x prefill"]
    header += ["chunk ends s", "full blocks", "session blocks", "sessions gain"]
    table = markdown_table(
        header,
        [
            [r["tokens"], r["chunks"], r["compacted_tokens"], r["prefill_s"] or "not run",
             r["compact_s"], r["x_prefill"] or "", ", ".join(f"{s:g}" for s in r["chunk_done_s"]),
             r["full_blocks"], r["session_blocks"], r["sessions_gain"]]
            for r in rows
        ],
    )  # fmt: skip
    print(table)
    if not args.no_doc:
        text = (
            f"{MODEL} (fp32: this CPU has no bf16 GEMMs), {RATIO}x, context queries, chunks of "
            f"at most {args.chunk_tokens} tokens; SQuAD articles 0-19 read in order. The plain "
            "prefill is one completion token on the same server without a prefix-cache hit "
            f"(timed up to {args.prefill_max} tokens). Sessions: KV blocks ({BLOCK} tokens) "
            f"that a request of a short question and {SESSION_TOKENS} generated tokens held on "
            "the handle (read from the engine), against the blocks of the whole input plus the "
            "same tokens; the gain is how many more such sessions, one document each, fit one "
            "KV budget."
        )
        title = "## Long inputs, compacted in chunks (`python -m bench.long_context`)"
        update_doc("long-inputs", f"{title}\n\n{text}\n\n{table}\n", serving.DOC, serving.TITLE)


if __name__ == "__main__":
    main()
