"""Shared fixtures: real and tiny models, cached across sessions under the project's home."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_compaction import models

TINY_MODEL_VERSION = "tiny-llama-v1"  # bump when tests/tiny_model.py changes what it builds


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (pulled once per machine)."""
    return models.pull("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """A tiny random-weight Llama with an offline-trained tokenizer, built once per machine."""
    from tests.tiny_model import build_tiny_llama

    out = models.home() / "test-models" / TINY_MODEL_VERSION
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_llama(out)
    return out


@pytest.fixture(scope="session")
def texts(tiny_llama_dir) -> tuple[list[int], list[int]]:
    """A 300-token SQuAD context and a question suffix, as the tiny model's token ids."""
    from transformers import AutoTokenizer

    from vllm_compaction import documents

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    paragraphs = documents.squad()["data"][1]["paragraphs"]
    context = tokenizer(" ".join(p["context"] for p in paragraphs[:6]))["input_ids"]
    suffix = tokenizer(" Question: who is named in the text? Answer:")["input_ids"]
    return context[:300], suffix
