"""Engine-free Attention Matching: compact a layer's KV cache to keys, biases and values.

Torch only; nothing here imports vLLM or transformers. On CPU the statistics pass runs in
the native kernel of csrc/ when this install can build it (imported on first use, torch
otherwise; problem.py).

Layout (one concern per module):
    compact.py     compact_layer, the entry point (validate, subsample queries, run a method)
    cache.py       compact_cache: every layer, sinks and protected spans kept verbatim
    methods/       selection methods (registry in METHODS); base.py holds the shared flow
    fit.py         the fit shared by Attention Matching methods: beta (NNLS), values (ridge LS)
    problem.py     one layer's inputs and the attention statistics methods read
    attention.py   reference attention, logits with causal masks, safe exponentials
    linalg.py      batched ridge solves that never return NaN
    metrics.py     held-out errors of a compact cache (output and log-mass)
    validation.py  input checks; indexing.py: per-head gathers; compacted.py: the result type

Defaults of the fit (``AttentionMatching`` in methods/base.py), tuned on synthetic layers and
on captured Qwen2.5-Coder-0.5B / SmolLM2-135M layers (held-out queries, with later tokens)
and, for the value ridge, answer likelihood on SQuAD (docs/benchmarks-core.md):
mass-fit rows weighted by Y^-0.5 (Y a query's attention mass, between absolute and relative
mass error; with ``outside_lse`` Y also counts the mass outside the compacted rows and value-fit
rows are weighted by the compacted rows' share), beta in [-3, 3] (am-omp: [-12, 7], so keys
below -7 can be replaced), mass ridge 1e-6, 20 projected-gradient steps, value ridge 1
toward the original values, at most 16384 reference queries per head (seeded subsampling).
"""

from .attention import attention, log_mass
from .cache import compact_cache
from .compact import compact_layer
from .compacted import Compacted
from .methods import METHODS
from .metrics import Errors, compaction_errors

__all__ = [
    "METHODS",
    "Compacted",
    "Errors",
    "attention",
    "compact_cache",
    "compact_layer",
    "compaction_errors",
    "log_mass",
]
