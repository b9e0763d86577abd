"""Fidelity on real text: how much of an article's value a compacted cache keeps.

Qwen2.5-Coder-0.5B-Instruct (fp32, transformers) reads SQuAD article i packed to about 3,000
tokens in one user turn, once, together with the repeat-prefill turns that supply reference
queries. Every method then compacts the article's cache at every ratio (the first 4 tokens and
the chat-template tokens are kept verbatim and count toward the budget: ratio = T / kept rows),
and each of up to 24 questions is scored as a second user turn plus its gold answer,
teacher-forced, over the compacted cache applied as an additive attention bias at the original
positions. The measure is the mean NLL per answer token and

    retained = (NLL_none - NLL_method) / (NLL_none - NLL_full)

where "none" scores the question turn alone and "full" over the uncompacted cache.

    python -m bench.fidelity --quick                # articles 0-1 at 10x and 20x
    python -m bench.fidelity --articles 0-9         # every method at 5x, 10x, 20x, 50x
    python -m bench.fidelity --quick --variant 'am-b5=am-highest:{"beta_min": -5}'
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vllm_compaction import documents, hf, self_study
from vllm_compaction.core import METHODS, Compacted, compact_cache
from vllm_compaction.models import pull

from .output import (
    RESULTS,
    RESUME_HELP,
    markdown_table,
    parse_indices,
    saved_runs,
    update_doc,
    write_json,
)

logger = logging.getLogger("bench.fidelity")

MODEL = "qwen2.5-coder-0.5b"
RATIOS = (5, 10, 20, 50)
QUICK_RATIOS = (10, 20)
QUICK_ARTICLES = "0-1"
# Causal context queries alone kept the most in every comparison so far (docs/benchmarks-core.md);
# repeat-prefill queries are still captured for variants that ask for them.
SOURCES = ("context",)
QUERY_SOURCES = ("context", "repeat", "self-study")
KEEP_FIRST = 4
HEADLINE = "am-highest"  # the method the docs set against the best eviction baseline


@dataclass(frozen=True)
class Variant:
    """A method with its reference-query sources and core options (`method_options`).

    on_policy: fit each layer on the repeat queries as they arise once the layers below are
    compacted (one extra forward over the repeat turns per compaction).
    outside: weigh each query by the share of its attention on the compacted rows (the mass
    on verbatim tokens and on its own turn passed as ``outside_lse``).
    """

    name: str
    method: str
    sources: tuple[str, ...] = SOURCES
    on_policy: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    outside: bool = False

    @staticmethod
    def parse(spec: str) -> Variant:
        """'name=method' or 'name=method:{json}'; the json may also hold "sources": [...],
        "on_policy": true and "outside": true next to the core options."""
        name, _, rest = spec.partition("=")
        method, _, raw = rest.partition(":")
        options = json.loads(raw) if raw else {}
        sources = tuple(options.pop("sources", SOURCES))
        on_policy = bool(options.pop("on_policy", False))
        outside = bool(options.pop("outside", False))
        if method not in METHODS or not set(sources) <= set(QUERY_SOURCES):
            raise argparse.ArgumentTypeError(f"bad variant {spec!r}")
        if on_policy and "repeat" not in sources:
            raise argparse.ArgumentTypeError(f"on_policy needs repeat queries: {spec!r}")
        return Variant(name, method, sources, on_policy, options, outside)


@dataclass(frozen=True)
class Reading:
    """An article read once: its context, every layer captured, the turns to score."""

    title: str
    context: hf.ChatContext
    layers: list[hf.LayerCapture]
    repeat_ids: torch.Tensor  # [R] the repeat-prefill turns after the context (empty: not read)
    turns: list[hf.Turn]  # question + answer after the article
    bare_turns: list[hf.Turn]  # question + answer alone (no context)
    seconds: float
    self_study_seconds: float | None = None  # writing the answers and reading them


def read_article(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    index: int,
    max_tokens: int,
    max_questions: int,
    self_study: bool = False,
    repeat: bool = True,
) -> Reading:
    """One forward over [article turn][repeat turns], capturing context and repeat queries
    (over the article turn alone without `repeat`: half the tokens); with `self_study`,
    another over [article turn][self-study turns] for those queries."""
    article = documents.squad_article(
        index, hf.chat_token_count(tokenizer), max_tokens, max_questions
    )
    history = article.messages()
    context = hf.encode_context(tokenizer, history, article.text)
    t = len(context)
    repeat_ids, ranges = context.ids.new_zeros(0), {"context": (0, t)}
    if repeat:
        repeat_ids = hf.repeat_turn(tokenizer, history, article.text).ids
        ranges["repeat"] = (t, t + len(repeat_ids))
    start = time.perf_counter()
    layers = hf.capture(model, torch.cat([context.ids, repeat_ids]), t, ranges)
    seconds = time.perf_counter() - start
    studied = None
    if self_study:
        studied = time.perf_counter()
        turns = self_study_turn(model, tokenizer, history, context.ids)
        extra = hf.capture(
            model, torch.cat([context.ids, turns.ids]), t, {"self-study": (t, t + len(turns.ids))}
        )
        for layer, more in zip(layers, extra, strict=True):
            layer.queries["self-study"] = more.queries["self-study"]
        studied = time.perf_counter() - studied
    return Reading(
        title=article.title,
        context=context,
        layers=layers,
        repeat_ids=repeat_ids,
        turns=[hf.answer_turn(tokenizer, history, q.text, q.answer) for q in article.questions],
        bare_turns=[hf.answer_turn(tokenizer, [], q.text, q.answer) for q in article.questions],
        seconds=seconds,
        self_study_seconds=studied,
    )


def self_study_turn(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    history: list[dict[str, str]],
    context_ids: torch.Tensor,
) -> hf.Turn:
    """The self-study tasks as user turns after `history`, each answered by the model (greedy,
    from the article alone, as the server does)."""
    messages = []
    for task in self_study.TASKS:
        ask = [{"role": "user", "content": task}]
        prompt = hf.generation_prompt(tokenizer, history, ask)
        ids = torch.cat([context_ids, torch.tensor(prompt)])[None]
        with hf.attention_implementation(model, "sdpa"):
            out = model.generate(ids, max_new_tokens=self_study.ANSWER_TOKENS, do_sample=False)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        messages += [*ask, {"role": "assistant", "content": answer}]
    return hf.appended_turn(tokenizer, history, messages)


def cached_reading(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    index: int,
    args: argparse.Namespace,
    study: bool = False,
    repeat: bool = True,
) -> Reading:
    """`read_article` (with the self-study turn when `study`, the repeat turns when `repeat`),
    kept in --readings DIR when given (tuning reruns skip the forward)."""
    read = (model, tokenizer, index, args.max_tokens, args.questions, study, repeat)
    if args.readings is None:
        return read_article(*read)
    name = f"{args.model}-a{index}-{args.max_tokens}-{args.questions}"
    name += f"{'-study' * study}{'-norepeat' * (not repeat)}.pt"
    path = Path(args.readings) / name
    if path.is_file():
        return torch.load(path, weights_only=False)  # our own cache: trusted pickles
    reading = read_article(*read)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reading, path)
    return reading


def answer_nll(
    model: PreTrainedModel,
    prefix: Sequence[hf.PrefixLayer] | None,
    context_len: int,
    turns: Sequence[hf.Turn],
) -> tuple[float, list[float]]:
    """Mean NLL per answer token over all turns, and each turn's own mean."""
    total, count, per_turn = 0.0, 0, []
    for turn in turns:
        logprobs = hf.score_with_compacted(model, prefix, context_len, turn.ids)
        target = -logprobs[turn.target[1:]]
        total, count = total + float(target.sum()), count + target.numel()
        per_turn.append(float(target.mean()))
    return total / count, per_turn


def compact(
    model: PreTrainedModel, reading: Reading, variant: Variant, ratio: float
) -> tuple[list[Compacted], float]:
    """Every layer compacted by `variant` at `ratio`, and the seconds it took."""

    def fit_layer(index: int, on_policy: hf.Queries | None) -> Compacted:
        layer = reading.layers[index]
        sets = {**layer.queries, **({"repeat": on_policy} if on_policy else {})}
        queries = hf.Queries.cat([sets[s] for s in variant.sources])
        return compact_cache(
            [layer.keys],
            [layer.values],
            [queries.vectors],
            ratio=ratio,
            query_positions=[queries.positions],
            outside_lse=[queries.outside] if variant.outside else None,
            keep_first=KEEP_FIRST,
            protected=reading.context.protected_spans(),
            method=variant.method,
            **variant.options,
        )[0]

    start = time.perf_counter()
    if variant.on_policy:
        t = len(reading.context)
        compacted = hf.compact_on_policy(model, t, reading.repeat_ids, fit_layer)
    else:
        compacted = [fit_layer(i, None) for i in range(len(reading.layers))]
    return compacted, time.perf_counter() - start


def run_article(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    index: int,
    variants: Sequence[Variant],
    ratios: Sequence[float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """NLLs of every condition on one article (JSON-ready)."""
    study = any("self-study" in v.sources for v in variants)
    repeat = any("repeat" in v.sources for v in variants)  # on_policy implies it
    reading = cached_reading(model, tokenizer, index, args, study, repeat)
    t = len(reading.context)
    logger.info("article %d %r: T=%d, read in %.1fs", index, reading.title, t, reading.seconds)
    if reading.self_study_seconds is not None:
        logger.info("  self-study answers written and read in %.1fs", reading.self_study_seconds)
    none, none_each = answer_nll(model, None, 0, reading.bare_turns)
    full_prefix = [layer.full_prefix() for layer in reading.layers]
    full, full_each = answer_nll(model, full_prefix, t, reading.turns)
    logger.info("  none %.3f  full %.3f", none, full)
    conditions = []
    for ratio in ratios:
        for variant in variants:
            compacted, seconds = compact(model, reading, variant, ratio)
            nll, each = answer_nll(model, compacted, t, reading.turns)
            logger.info("  %-12s %4gx  nll %.3f  (%.1fs)", variant.name, ratio, nll, seconds)
            conditions.append(
                {
                    "variant": variant.name,
                    "ratio": ratio,
                    "nll": nll,
                    "per_question": each,
                    "kept_rows": int(compacted[0].lengths.max()),
                    # Rows per layer and KV head: what a served handle's blocks follow
                    # (with pooled head budgets they differ between heads).
                    "head_rows": [c.lengths.tolist() for c in compacted],
                    "compact_seconds": seconds,
                }
            )
    return {
        "index": index,
        "title": reading.title,
        "context_tokens": t,
        "verbatim_tokens": int(reading.context.protected.sum()),
        "questions": len(reading.turns),
        "read_seconds": reading.seconds,
        "self_study_seconds": reading.self_study_seconds,
        "none": {"nll": none, "per_question": none_each},
        "full": {"nll": full, "per_question": full_each},
        "conditions": conditions,
    }


def retained(none: float, full: float, nll: float) -> float:
    """(NLL_none - NLL) / (NLL_none - NLL_full): the share of the context's value kept."""
    return (none - nll) / (none - full)


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Article-averaged NLLs and retained value per variant and ratio."""

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    none = mean([r["none"]["nll"] for r in runs])
    full = mean([r["full"]["nll"] for r in runs])
    nll: dict[str, dict[str, float]] = {}
    for condition in runs[0]["conditions"]:
        name, ratio = condition["variant"], condition["ratio"]
        values = [
            c["nll"]
            for r in runs
            for c in r["conditions"]
            if (c["variant"], c["ratio"]) == (name, ratio)
        ]
        nll.setdefault(name, {})[f"{ratio:g}"] = mean(values)
    kept = {
        name: {ratio: retained(none, full, value) for ratio, value in by_ratio.items()}
        for name, by_ratio in nll.items()
    }
    return {"nll_none": none, "nll_full": full, "nll": nll, "retained": kept}


def summary_table(summary: dict[str, Any]) -> str:
    ratios = list(next(iter(summary["retained"].values())))
    rows = [
        [name, *(by_ratio[r] for r in ratios), *(summary["nll"][name][r] for r in ratios)]
        for name, by_ratio in summary["retained"].items()
    ]
    header = ["method", *(f"retained {r}x" for r in ratios), *(f"NLL {r}x" for r in ratios)]
    return markdown_table(header, rows)


def plot(summary: dict[str, Any], model: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_ratio in summary["retained"].items():
        ratios = [float(r) for r in by_ratio]
        style = "-" if name.startswith("am-") else "--"  # fitted methods solid, eviction dashed
        ax.plot(ratios, list(by_ratio.values()), style, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{r:g}x" for r in ratios])
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("compaction ratio T / kept rows")
    ax.set_ylabel("retained (NLL_none - NLL) / (NLL_none - NLL_full)")
    ax.set_title(f"{model} on SQuAD: answer likelihood kept")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def against_baselines(
    summary: dict[str, Any], runs: Sequence[dict[str, Any]], variants: Sequence[Variant]
) -> str:
    """The headline method against the best eviction baseline at each ratio, averaged and per
    article (markdown); empty when the run lacks either."""
    baselines = [v.name for v in variants if not v.method.startswith("am-")]
    if HEADLINE not in summary["retained"] or not baselines:
        return ""
    ratios = list(summary["retained"][HEADLINE])
    means = []
    for ratio in ratios:
        ours = summary["retained"][HEADLINE][ratio]
        best = max(baselines, key=lambda name: summary["retained"][name][ratio])
        theirs = summary["retained"][best][ratio]
        means.append(f"{ratio}x {ours:.3f} vs {best} {theirs:.3f} ({ours / theirs:.2f}x)")
    rows = []
    for run in runs:
        by_condition = {(c["variant"], f"{c['ratio']:g}"): c["nll"] for c in run["conditions"]}
        none, full = run["none"]["nll"], run["full"]["nll"]
        cells = []
        for ratio in ratios:
            ours = retained(none, full, by_condition[HEADLINE, ratio])
            best = max(retained(none, full, by_condition[name, ratio]) for name in baselines)
            cells.append(f"{ours:.3f} / {best:.3f}")
        rows.append([run["index"], *cells])
    table = markdown_table(["article", *(f"{r}x" for r in ratios)], rows)
    return f"""{HEADLINE} against the best baseline at each ratio: {"; ".join(means)}.

Per article, retained of {HEADLINE} / of that article's best baseline:

{table}
"""


def fidelity_doc(
    args: argparse.Namespace, summary: dict[str, Any], runs: Sequence[dict[str, Any]], table: str
) -> str:
    tokens = [r["context_tokens"] for r in runs]
    articles = ", ".join(f"{r['index']} ({r['title']})" for r in runs)
    return f"""## Fidelity: {args.model} on SQuAD, {len(runs)} articles (`bench/fidelity.py`)

Articles {articles}: {len(runs)} articles, {min(tokens)}-{max(tokens)} context tokens,
up to {args.questions} questions each; fp32 transformers on CPU.
Teacher-forced mean NLL per answer token, averaged over articles:
no context {summary["nll_none"]:.3f}, full cache {summary["nll_full"]:.3f}.
Retained = (NLL_none - NLL) / (NLL_none - NLL_full).
Ratio = T / kept rows; the first {KEEP_FIRST} and the chat-template tokens are kept verbatim
inside that budget.
Reference queries of the method rows: {" + ".join(args.sources)}
(context queries are causal); variants list their own in the JSON.
Figure: `bench/results/{args.tag}.png`; data: `bench/results/{args.tag}.json`.

{table}

{against_baselines(summary, runs, args.variants)}"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--articles", default="0-9", help="SQuAD article indices, e.g. 0-9")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--quick", action="store_true", help="articles 0-1 at 10x and 20x")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--sources",
        nargs="+",
        default=list(SOURCES),
        choices=list(QUERY_SOURCES),
        help="reference queries of the --methods runs",
    )
    parser.add_argument(
        "--max-queries", type=int, help="reference queries per head (core default if unset)"
    )
    parser.add_argument(
        "--variant",
        type=Variant.parse,
        action="append",
        default=[],
        help="extra 'name=method[:{json options}]'; json may set \"sources\"",
    )
    parser.add_argument("--model", default=MODEL, help="a name known to vllm_compaction.models")
    parser.add_argument("--max-tokens", type=int, default=3000)
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument(
        "--tag", default="fidelity", help="name of the result files and doc section"
    )
    parser.add_argument("--no-doc", action="store_true", help="do not update the docs table")
    parser.add_argument(
        "--readings", help="folder to keep each article's captured reading in and reuse it from"
    )
    parser.add_argument("--resume", action="store_true", help=RESUME_HELP)
    args = parser.parse_args(argv)
    if args.quick:
        args.articles, args.ratios = QUICK_ARTICLES, list(QUICK_RATIOS)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.manual_seed(0)
    options = {} if args.max_queries is None else {"max_queries": args.max_queries}
    sources = tuple(args.sources)
    variants = [Variant(m, m, sources, options=options) for m in args.methods] + args.variant
    args.variants = variants
    model, tokenizer = hf.load_model(pull(args.model))
    config = {
        "model": args.model,
        "articles": args.articles,
        "ratios": args.ratios,
        "max_tokens": args.max_tokens,
        "questions": args.questions,
        "variants": [asdict(v) for v in variants],
        "threads": torch.get_num_threads(),
    }
    same = ("model", "ratios", "max_tokens", "questions", "variants")
    done = saved_runs(args.tag, config, same, "articles", "index") if args.resume else {}
    runs = []
    for index in parse_indices(args.articles):
        if index in done:
            logger.info("article %d: kept from bench/results/%s.json", index, args.tag)
            runs.append(done[index])
            continue
        runs.append(run_article(model, tokenizer, index, variants, args.ratios, args))
        # Saved after every article: a long run keeps what it did.
        write_json(args.tag, {"config": config, "summary": summarise(runs), "articles": runs})
    summary = summarise(runs)
    table = summary_table(summary)
    print(table)
    plot(summary, args.model, str(RESULTS / f"{args.tag}.png"))
    if not args.no_doc:
        update_doc(args.tag, fidelity_doc(args, summary, runs, table))


if __name__ == "__main__":
    # Run as the module bench.fidelity, so the readings kept in --readings unpickle as
    # bench.fidelity.Reading in the other scripts that share them (bench/summary.py).
    from bench import fidelity

    fidelity.main()
