"""Registry of compaction methods: name -> small class sharing one flow."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from .base import AttentionMatching, Method, ScoreMethod
from .eviction import H2O, KVzip, Random, Recent, SnapKV, Strided
from .highest import AMHighest
from .omp import AMOmp

METHODS: dict[str, type[Method]] = {
    "am-highest": AMHighest,
    "am-omp": AMOmp,
    "recent": Recent,
    "strided": Strided,
    "h2o": H2O,
    "snapkv": SnapKV,
    "kvzip": KVzip,
    "random": Random,
}


def make_method(name: str, **options: Any) -> Method:
    """Instantiate the method registered as ``name`` (ValueError on unknown names/options)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    cls = METHODS[name]
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {name!r}; valid: {', '.join(sorted(allowed))}"
        )
    return cls(**options)


__all__ = [
    "H2O",
    "METHODS",
    "AMHighest",
    "AMOmp",
    "AttentionMatching",
    "KVzip",
    "Method",
    "Random",
    "Recent",
    "ScoreMethod",
    "SnapKV",
    "Strided",
    "make_method",
]
