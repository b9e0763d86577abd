"""Move post-RoPE keys to other positions with the model's own rotary definition."""

from __future__ import annotations

import torch
from torch import Tensor


def shift_positions(keys: Tensor, delta: int, rotary_emb) -> Tensor:
    """Rotate keys [..., D] as if they sat `delta` positions later (delta may be negative).

    Rotations compose, so a key rotated at p becomes one rotated at p + delta. Uses the
    module's own frequencies (scaling included) in fp32, without magnitude scaling (YaRN's
    mscale), only on its first `rotary_dim` dims, neox or interleaved pairing.
    """
    if delta == 0:
        return keys
    table = rotary_emb._compute_cos_sin_cache()
    if abs(delta) >= table.shape[0]:
        raise ValueError(f"cannot shift keys by {delta}: beyond the model's rotary table")
    cos, sin = (table[abs(delta)].float() / getattr(rotary_emb, "mscale", 1.0)).chunk(2)
    if delta < 0:
        sin = -sin
    dim = rotary_emb.rotary_dim
    x = keys.float()
    turned, rest = x[..., :dim], x[..., dim:]
    if rotary_emb.is_neox_style:
        first, second = turned.chunk(2, dim=-1)
    else:
        first, second = turned[..., 0::2], turned[..., 1::2]
    a = first * cos - second * sin
    b = second * cos + first * sin
    turned = (
        torch.cat([a, b], dim=-1)
        if rotary_emb.is_neox_style
        else torch.stack([a, b], dim=-1).flatten(-2)
    )
    return torch.cat([turned, rest], dim=-1).to(keys.dtype)
