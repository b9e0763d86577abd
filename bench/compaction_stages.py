"""am-highest compaction time by stage, for the core of this checkout or of another one.

SmolLM2-135M K/V/Q of one context (Paul Graham essays, T tokens, causal context queries pooled
per KV head, as `bench/compaction_speed.py` captures them). Each layer's non-verbatim rows (as
`compact_cache` passes them to `compact_layer`) go through the stages of `compact_layer`, timed
apart and summed over all layers:

1. statistics: `Problem` construction and the statistics the fits and the score read
   (row max, mass, targets, RMS softmax weights);
2. selection: duplicates, masking and `top_budget` (`AMHighest.score` + `ScoreMethod.select`);
3. beta fit: `fit_beta` (after the speed-up also `problem.logits(indices)`, shared by the fits);
4. value fit: `fit_values` and the output assembly.

Plus the total of `compact_layer` on the same inputs. Min of --repeats runs, --threads torch
(and OpenMP) threads.

    python -m bench.compaction_stages                                     # this core: "after"
    python -m bench.compaction_stages --core-from /tmp/core-before --label before
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger("bench.compaction_stages")

MODEL = "smollm2-135m"
STAGES = ("statistics", "selection", "beta fit", "value fit")
Layer = tuple[Tensor, Tensor, Tensor, Tensor, int]  # keys, values, queries, positions, budget


def load_core() -> SimpleNamespace:
    """The core modules, imported after --core-from has been put on sys.path."""
    names = ("attention", "cache", "compact", "fit", "indexing", "methods", "problem")
    modules = {n: importlib.import_module(f"vllm_compaction.core.{n}") for n in names}
    modules["base"] = importlib.import_module("vllm_compaction.core.methods.base")
    return SimpleNamespace(**modules)


def capture_layers(length: int, ratio: float, core: SimpleNamespace) -> list[Layer]:
    """Per layer the inputs `compact_cache` gives `compact_layer` (verbatim rows left out)."""
    from vllm_compaction import hf
    from vllm_compaction.models import pull

    from .compaction_speed import essay_context

    model, tokenizer = hf.load_model(pull(MODEL))
    context, _ = essay_context(tokenizer, length)
    t = len(context)
    layers = hf.capture(model, context.ids, t, {"context": (0, t)})
    verbatim = core.cache._verbatim_positions(t, 4, context.protected_spans(), torch.device("cpu"))
    is_rest = torch.ones(t, dtype=torch.bool)
    is_rest[verbatim] = False
    rest = is_rest.nonzero().squeeze(1)
    budget = min(core.cache._total_budget(t, None, ratio) - verbatim.numel(), rest.numel())
    out = []
    for layer in layers:
        q = layer.queries["context"]
        positions = torch.searchsorted(rest, q.positions.contiguous(), right=True) - 1
        out.append((layer.keys[:, rest], layer.values[:, rest], q.vectors, positions, budget))
    return out


def staged(core: SimpleNamespace, layer: Layer) -> tuple[list[float], Any]:
    """One layer through the stages of `compact_layer` (am-highest, default options)."""
    keys, values, queries, positions, budget = layer
    shares_logits = "selected" in inspect.signature(core.fit.fit_beta).parameters  # after
    times = [time.perf_counter()]

    # 1. statistics: as compact_layer builds the Problem, then what select and the fits read.
    budgets = core.compact.check_inputs(keys, values, queries, budget, None, positions)
    method = core.methods.make_method("am-highest")
    limit, seed = method.max_queries, method.seed
    if "outside" in inspect.signature(core.compact._subsample).parameters:  # after 856b51f
        queries, positions, _ = core.compact._subsample(queries, positions, None, limit, seed)
    else:
        queries, positions = core.compact._subsample(queries, positions, limit, seed)
    problem = core.problem.Problem(
        keys=keys,
        values=values,
        queries=queries,
        bias=torch.zeros(keys.shape[:2]),
        query_positions=positions.long(),
        budgets=budgets,
        scale=core.attention.default_scale(keys.shape[-1], None),
    )
    _ = problem.mass, problem.targets
    rms = problem.rms_attention()
    times.append(time.perf_counter())

    # 2. selection: AMHighest.score and ScoreMethod.select on the RMS above.
    scores = rms.masked_fill(problem.duplicates, -math.inf)
    scores = scores.masked_fill(problem.bias == -math.inf, -math.inf)
    indices = core.indexing.top_budget(scores, problem.budgets)
    times.append(time.perf_counter())

    # 3. beta fit (AttentionMatching.build); the two cores differ here: an adapter each.
    options = {
        "weighting": method.mass_weighting,
        "beta_min": method.beta_min,
        "beta_max": method.beta_max,
        "ridge": method.mass_ridge,
        "steps": method.mass_steps,
    }
    selected = problem.logits(indices) if shares_logits else None
    extra = (selected,) if shares_logits else ()
    beta = core.fit.fit_beta(problem, indices, *extra, **options)
    times.append(time.perf_counter())

    # 4. value fit and output assembly.
    value_options = {"ridge": method.value_ridge}
    if hasattr(method, "share_weighting"):  # after 856b51f
        value_options["share_weighting"] = method.share_weighting
    fitted = core.fit.fit_values(problem, indices, *extra, beta, **value_options)
    out = core.base._compacted(problem, indices, beta, fitted)
    times.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(times)], out


def whole(core: SimpleNamespace, layer: Layer) -> Any:
    keys, values, queries, positions, budget = layer
    return core.compact.compact_layer(keys, values, queries, budget, query_positions=positions)


def check_same(core: SimpleNamespace, layer: Layer) -> None:
    """The staged path must give what compact_layer gives."""
    a, b = staged(core, layer)[1], whole(core, layer)
    assert torch.equal(a.indices, b.indices), "staged selection differs from compact_layer"
    assert torch.allclose(a.values, b.values) and torch.allclose(a.bias, b.bias)


def measure(core: SimpleNamespace, layers: list[Layer], repeats: int) -> dict[str, Any]:
    """Per run the stage times and compact_layer total, summed over layers; min over runs."""
    check_same(core, layers[0])  # also the warm-up
    runs = []
    for _ in range(repeats):
        stages = [0.0] * len(STAGES)
        for layer in layers:
            stages = [s + t for s, t in zip(stages, staged(core, layer)[0], strict=True)]
        start = time.perf_counter()
        for layer in layers:
            whole(core, layer)
        total = time.perf_counter() - start
        runs.append({**dict(zip(STAGES, stages, strict=True)), "total": total})
        logger.info("%s", runs[-1])
    best = {key: min(r[key] for r in runs) for key in runs[0]}
    return {"best": best, "runs": runs}


def _commit(folder: Path) -> str:
    """The short commit of the checkout holding ``folder`` ("+" if the folder has changes)."""
    git = ["git", "-C", str(folder)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "."], capture_output=True, text=True)
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "") or "?"


def table(before: dict[str, float], after: dict[str, float]) -> str:
    from .output import markdown_table

    rows = [[k, before[k], after[k], f"{before[k] / after[k]:.1f}x"] for k in (*STAGES, "total")]
    rows[-1][0] = "compact_layer total"
    return markdown_table(["stage (30 layers)", "before s", "after s", "speed-up"], rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--core-from", type=Path, help="checkout whose vllm_compaction to time")
    parser.add_argument("--label", choices=("before", "after"), default="after")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--ratio", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1: the least noisy timing")
    parser.add_argument("--no-doc", action="store_true", help="do not update the docs table")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.core_from is not None:
        sys.path.insert(0, str(args.core_from.resolve()))
    torch.set_num_threads(args.threads)
    core = load_core()
    logger.info("core: %s", Path(core.compact.__file__).parent)
    layers = capture_layers(args.length, args.ratio, core)
    result = measure(core, layers, args.repeats)
    config = {
        "model": MODEL,
        "tokens": args.length,
        "ratio": args.ratio,
        "method": "am-highest",
        "layers": len(layers),
        "budget": layers[0][4],
        "threads": torch.get_num_threads(),
        "core": str(Path(core.compact.__file__).parent),
        "commit": _commit(Path(core.compact.__file__).parent),
    }
    from .output import RESULTS, update_doc, write_json

    write_json(f"compaction_stages-{args.label}", {"config": config, **result})
    paths = {label: RESULTS / f"compaction_stages-{label}.json" for label in ("before", "after")}
    if not all(p.is_file() for p in paths.values()):
        print(json.dumps(result["best"], indent=1))
        return
    runs = {label: json.loads(p.read_text()) for label, p in paths.items()}
    best = {label: run["best"] for label, run in runs.items()}
    commits = {label: run["config"].get("commit", "?") for label, run in runs.items()}
    if runs["before"]["config"]["threads"] != args.threads:
        raise SystemExit("time 'before' with the same --threads first")
    text = table(best["before"], best["after"])
    print(text)
    if not args.no_doc:
        update_doc(
            "compaction_stages",
            f"""## Compaction time by stage (`bench/compaction_stages.py`)

am-highest at {args.ratio:g}x, default options, on SmolLM2-135M's captured K/V/Q of one context
(Paul Graham essays, T = {args.length}, causal context queries pooled per KV head), each
stage summed over the 30 layers; min of {args.repeats} runs with {args.threads} torch (and
OpenMP) thread(s). "before" is the core at {commits["before"]}, "after" at {commits["after"]}.
Statistics: `Problem` plus row max, mass, targets and RMS weights; selection: duplicates and
top-budget; the beta fit includes the kept keys' logits, formed once and shared by both fits;
value fit includes the output assembly.
Data: `bench/results/compaction_stages-before.json`, `compaction_stages-after.json`.

{text}
""",
        )


if __name__ == "__main__":
    main()
