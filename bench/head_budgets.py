"""Memory per handle with pooled per-head budgets against uniform ones, at equal fidelity.

Reads a bench/fidelity.py result that holds uniform and pooled variants, e.g.

    python -m bench.fidelity --articles 2-4 --ratios 10 14 20 --methods am-highest \\
        --variant 'am-pooled=am-highest:{"pool_heads": true}' --tag pooled-heads --no-doc
    python -m bench.head_budgets --tag pooled-heads --uniform am-highest

A served handle holds whole KV blocks: with per-head budgets packed by page
(vllm_compaction/engine/pages.py) a layer needs ceil(sum_h ceil(n_h / B) / H) blocks of B
slots, the handle the most any layer needs; uniform budgets give every head ceil(t / B). The
uniform rows per head that keep the same answer likelihood as a pooled run are interpolated
along the uniform runs' ratios.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vllm_compaction.engine.pages import packed_blocks

from .fidelity import summarise
from .output import RESULTS, markdown_table, update_doc

BLOCK_SIZES = (16, 128)  # vLLM's GPU default and the CPU backend's


def handle_blocks(head_rows: list[list[int]], block_size: int) -> int:
    """Blocks a served handle holds, from the rows each layer's heads keep."""
    return max(packed_blocks(torch.tensor(rows), block_size) for rows in head_rows)


def mean_blocks(runs: Sequence[dict[str, Any]], variant: str, ratio: float, size: int) -> float:
    return float(
        np.mean(
            [
                handle_blocks(c["head_rows"], size)
                for run in runs
                for c in run["conditions"]
                if (c["variant"], c["ratio"]) == (variant, ratio)
            ]
        )
    )


def rows_per_head(runs: Sequence[dict[str, Any]], ratio: float) -> float:
    """Mean rows each head keeps at `ratio` (verbatim tokens included)."""
    return float(np.mean([round(run["context_tokens"] / ratio) for run in runs]))


def report(runs: Sequence[dict[str, Any]], uniform: str) -> str:
    retained = summarise(runs)["retained"]
    curve = sorted((value, rows_per_head(runs, float(r))) for r, value in retained[uniform].items())
    rows = []
    for name, by_ratio in retained.items():
        for ratio, value in by_ratio.items():
            kept = rows_per_head(runs, float(ratio))
            blocks = [mean_blocks(runs, name, float(ratio), size) for size in BLOCK_SIZES]
            row = [name, f"{ratio}x", value, f"{kept:.0f}", *(f"{b:.2f}" for b in blocks)]
            if name == uniform:
                rows.append([*row, "", ""])
                continue
            # Uniform rows per head with the same retained value (linear between ratios);
            # outside the uniform runs' range only a bound is known.
            values, counts = zip(*curve, strict=True)
            if value < values[0]:
                rows.append([*row, f"< {min(counts):.0f}", "fewer"])
            elif value > values[-1]:
                rows.append([*row, f"> {max(counts):.0f}", "more"])
            else:
                same = float(np.interp(value, values, counts))
                need = " / ".join(str(math.ceil(same / size)) for size in BLOCK_SIZES)
                rows.append([*row, f"{same:.0f}", need])
    header = [
        "variant",
        "ratio",
        "retained",
        "rows per head",
        *(f"blocks of {size}" for size in BLOCK_SIZES),
        "uniform rows, same retained",
        "their blocks (" + " / ".join(map(str, BLOCK_SIZES)) + ")",
    ]
    return markdown_table(header, rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="pooled-heads", help="the bench/fidelity.py result")
    parser.add_argument("--uniform", default="am-highest", help="its uniform-budget variant")
    parser.add_argument("--doc", action="store_true", help="write docs/benchmarks-core.md")
    args = parser.parse_args(argv)
    data = json.loads((RESULTS / f"{args.tag}.json").read_text())
    table = report(data["articles"], args.uniform)
    print(table)
    if args.doc:
        articles = ", ".join(str(run["index"]) for run in data["articles"])
        update_doc(
            "head-budgets",
            "## Per-head budgets: memory at equal fidelity (`bench/head_budgets.py`)\n\n"
            f"{data['config']['model']}, SQuAD articles {articles}, context queries; data: "
            f"`bench/results/{args.tag}.json`. Blocks: what a served handle holds (mean over "
            "articles).\n\n" + table,
        )


if __name__ == "__main__":
    main()
