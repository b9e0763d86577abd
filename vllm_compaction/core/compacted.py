"""The result of compacting one layer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Compacted:
    """A compact cache for one layer, all KV heads batched.

    Attributes:
        keys: [H_kv, t, d] compact keys C1, in the input dtype.
        bias: [H_kv, t] float32 logit bias beta per compact key (-inf on padding rows).
        values: [H_kv, t, d_v] compact values C2, in the input dtype.
        indices: [H_kv, t] long source position of each kept key, ascending per head;
            -1 where a row is padding (or a synthetic key).
        lengths: [H_kv] long number of real rows per head; rows past it are padding.
    """

    keys: Tensor
    bias: Tensor
    values: Tensor
    indices: Tensor
    lengths: Tensor
