"""kvpress presses on the fidelity task of bench/fidelity.py, for the side-by-side report (#7).

kvpress pins transformers<5.3, so it lives in a side venv ($KVPRESS_VENV, default
<repo>/.venv-kvpress, made by deploy/setup-kvpress.sh). This side (the main venv) tokenizes each
article exactly as bench/fidelity.py does (same context, same question + gold-answer turns, same
ids) into a JSON file; bench/kvpress_runner.py, run in the side venv, loads the same model folder,
compresses the context's cache with each press and scores the same answer tokens.

    python -m bench.presses --articles 0 --ratios 10 --presses snapkv kvzip --questions 6
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from vllm_compaction import documents, hf
from vllm_compaction.models import pull

from .output import RESULTS, RESUME_HELP, markdown_table, parse_indices, saved_runs, write_json

logger = logging.getLogger("bench.presses")

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "bench" / "kvpress_runner.py"
SETUP = ROOT / "deploy" / "setup-kvpress.sh"
MODEL = "qwen2.5-coder-0.5b"
PRESSES = ("snapkv", "expected-attention", "kvzip", "streaming-llm", "tova", "keydiff")


def side_python() -> Path:
    """The side venv's python, set up (idempotently) on first use."""
    venv = Path(os.environ.get("KVPRESS_VENV", ROOT / ".venv-kvpress"))
    subprocess.run([str(SETUP)], check=True, env={**os.environ, "KVPRESS_VENV": str(venv)})
    return venv / "bin" / "python"


def prepare_article(
    tokenizer: PreTrainedTokenizerBase, index: int, max_tokens: int, max_questions: int
) -> dict[str, Any]:
    """Article `index` as bench/fidelity.py reads it, as plain token ids."""
    article = documents.squad_article(
        index, hf.chat_token_count(tokenizer), max_tokens, max_questions
    )
    history = article.messages()
    context = hf.encode_context(tokenizer, history, article.text)

    def plain(turn: hf.Turn) -> dict[str, list]:
        return {"ids": turn.ids.tolist(), "target": turn.target.tolist()}

    def turns(before: list[dict[str, str]]) -> list[dict[str, list]]:
        questions = article.questions
        return [plain(hf.answer_turn(tokenizer, before, q.text, q.answer)) for q in questions]

    return {
        "article": index,
        "title": article.title,
        "context_ids": context.ids.tolist(),
        "protected": context.protected.tolist(),
        "turns": turns(history),  # after the article
        "bare_turns": turns([]),  # alone: the "no context" baseline
    }


def run_article(
    python: Path, model_dir: Path, inputs: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The runner's result for one prepared article."""
    work = RESULTS / "kvpress"
    work.mkdir(parents=True, exist_ok=True)
    source, out = work / f"inputs-{inputs['article']}.json", work / f"run-{inputs['article']}.json"
    source.write_text(json.dumps(inputs) + "\n")
    command = [
        str(python),
        "-P",  # bench/ must not shadow installed modules (bench/kernels.py vs `kernels`)
        str(RUNNER),
        f"--inputs={source}",
        f"--model={model_dir}",
        f"--out={out}",
        "--presses",
        *args.presses,
        "--ratios",
        *map(str, args.ratios),
        "--protect",
        *args.protect,
    ]
    if args.threads:
        command.append(f"--threads={args.threads}")
    start = time.perf_counter()
    subprocess.run(command, check=True)
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - start
    return result


def retained(run: dict[str, Any], nll: float) -> float:
    none, full = run["none"]["nll"], run["full"]["nll"]
    return (none - nll) / (none - full)


def table(runs: Sequence[dict[str, Any]]) -> str:
    rows = []
    for run in runs:
        for c in run["conditions"]:
            name = c["press"] + (" +protect" if c["protect"] else "")
            rows.append(
                [
                    run["article"],
                    name,
                    f"{c['ratio']:g}x",
                    f"{c['kept_rows']:.1f}",
                    c["nll"],
                    retained(run, c["nll"]),
                    f"{c['prefill_seconds']:.1f}",
                ]
            )
    header = ["article", "press", "ratio", "kept rows", "NLL", "retained", "prefill s"]
    return markdown_table(header, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--articles", default="0", help="SQuAD article indices, e.g. 0-19")
    parser.add_argument("--ratios", type=float, nargs="+", default=[10.0])
    parser.add_argument("--presses", nargs="+", default=list(PRESSES))
    parser.add_argument(
        "--protect",
        nargs="+",
        default=["off"],
        choices=["off", "on"],
        help="on: the chat-template tokens are kept first, as ours keeps them (inside the budget)",
    )
    parser.add_argument("--model", default=MODEL, help="a name known to vllm_compaction.models")
    parser.add_argument("--max-tokens", type=int, default=3000)
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--threads", type=int, help="torch threads of the runner")
    parser.add_argument("--tag", default="kvpress", help="name of the result file")
    parser.add_argument("--resume", action="store_true", help=RESUME_HELP)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    model_dir = pull(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    python = side_python()
    config = vars(args) | {"model_dir": str(model_dir)}
    same = ("model", "ratios", "presses", "protect", "max_tokens", "questions")
    done = saved_runs(args.tag, config, same, "runs", "article") if args.resume else {}
    runs = []
    for index in parse_indices(args.articles):
        if index in done:
            logger.info("article %d: kept from bench/results/%s.json", index, args.tag)
            runs.append(done[index])
            continue
        inputs = prepare_article(tokenizer, index, args.max_tokens, args.questions)
        runs.append(run_article(python, model_dir, inputs, args))
        write_json(args.tag, {"config": config, "runs": runs})
    print(table(runs))


if __name__ == "__main__":
    main()
