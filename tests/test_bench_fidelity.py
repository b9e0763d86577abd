"""The fidelity report's comparison against the best eviction baseline: retained value per
article and the baseline that wins at each ratio (the numbers the issue's target is read from)."""

from __future__ import annotations

from bench.fidelity import Variant, against_baselines, summarise


def run(index: int, nll: dict[tuple[str, float], float]) -> dict:
    conditions = [{"variant": v, "ratio": r, "nll": x} for (v, r), x in nll.items()]
    return {"index": index, "none": {"nll": 6.0}, "full": {"nll": 2.0}, "conditions": conditions}


def test_headline_against_the_best_baseline_per_ratio_and_article():
    variants = [Variant(name, name) for name in ("am-highest", "h2o", "kvzip")]
    runs = [
        # retained = (6 - nll) / 4: h2o wins at 10x, kvzip at 20x on article 0.
        run(0, {("am-highest", 10): 3.0, ("h2o", 10): 4.0, ("kvzip", 10): 5.0,
                ("am-highest", 20): 4.0, ("h2o", 20): 5.6, ("kvzip", 20): 5.2}),
        run(1, {("am-highest", 10): 2.0, ("h2o", 10): 5.0, ("kvzip", 10): 3.0,
                ("am-highest", 20): 5.0, ("h2o", 20): 5.8, ("kvzip", 20): 4.4}),
    ]  # fmt: skip
    text = against_baselines(summarise(runs), runs, variants)
    # Means over articles: am 0.875 / 0.375; h2o 0.375 / 0.075; kvzip 0.5 / 0.3.
    assert "10x 0.875 vs kvzip 0.500 (1.75x); 20x 0.375 vs kvzip 0.300 (1.25x)" in text
    assert "| 0 | 0.750 / 0.500 | 0.500 / 0.200 |" in text
    assert "| 1 | 1.000 / 0.750 | 0.250 / 0.400 |" in text


def test_no_comparison_without_a_baseline():
    runs = [run(0, {("am-highest", 10): 3.0})]
    assert against_baselines(summarise(runs), runs, [Variant("am-highest", "am-highest")]) == ""
