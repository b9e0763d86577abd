"""Handles survive a restart: stored atomically, reloaded on first use, lost (410) if altered."""

from __future__ import annotations

import json

import openai
import pytest

from tests.server import TINY as MODEL
from tests.server import continuation, served_tiny

pytestmark = pytest.mark.slow


def test_handles_reload_after_restart_and_altered_ones_are_lost(tiny_llama_dir, tmp_path):
    handles = tmp_path / "handles"
    text = "The Normans were the people who gave their name to Normandy in France. " * 12
    with served_tiny(tiny_llama_dir, tmp_path, log="first.log") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        body = {"model": MODEL, "prompt": text, "ratio": 5, "queries": "context"}
        kept = client.post("/compact", body=body, cast_to=object)
        altered = client.post("/compact", body=body, cast_to=object)
        before = continuation(client, kept["id"])
    assert sorted(p.name for p in (handles / kept["id"]).iterdir()) == [
        "manifest.json",
        "rank0.safetensors",
    ]
    manifest = json.loads((handles / kept["id"] / "manifest.json").read_text())
    facts = {"layers": 4, "kv_heads": 2, "head_dim": 64, "dtype": "float32", "model": MODEL}
    assert facts.items() <= manifest["model_facts"].items()
    assert manifest["model_facts"]["rope"]["rope_theta"] == 10000.0
    assert manifest["rope_shift"] == manifest["slots"] - kept["original_tokens"]
    assert manifest["tenant"] and manifest["info"]["expires_at"] == kept["expires_at"]
    tensors = handles / altered["id"] / "rank0.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF
    tensors.write_bytes(bytes(data))
    interrupted = handles / "cmp_interrupted"  # a compaction killed before its manifest
    interrupted.mkdir()
    (interrupted / "rank0.safetensors").write_bytes(b"partial")

    with served_tiny(tiny_llama_dir, tmp_path, log="second.log") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        assert client.get(f"/compactions/{kept['id']}", cast_to=object) == kept
        assert continuation(client, kept["id"]) == before  # identical text and logprobs

        with pytest.raises(openai.APIStatusError, match="is lost") as lost:
            continuation(client, altered["id"])
        assert lost.value.status_code == 410
        with pytest.raises(openai.NotFoundError):
            continuation(client, "cmp_interrupted")

        client.delete(f"/compactions/{kept['id']}", cast_to=object)
        assert not (handles / kept["id"]).exists()
        with pytest.raises(openai.NotFoundError):
            client.get(f"/compactions/{kept['id']}", cast_to=object)
