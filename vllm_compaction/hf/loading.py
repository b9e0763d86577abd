"""Load a Hugging Face folder for the reference path."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from .attention import ATTN_IMPLEMENTATION


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, Tokenizer]:
    """Model (eval mode, this package's attention set) and tokenizer of a Hugging Face folder.

    fp32 by default: the reference path is compared against at ~1e-5.
    """
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION
    )
    return model.eval(), AutoTokenizer.from_pretrained(path)
