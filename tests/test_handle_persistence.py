"""Handles survive a restart: stored atomically, reloaded on first use, lost (410) if altered;
tombstones survive it too until they are a week old."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.server import TINY as MODEL
from tests.server import continuation, served_tiny
from vllm_compaction.server.registry import TOMBSTONE_SECONDS

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
        short = {**body, "ttl_seconds": 1}
        expired = [client.post("/compact", body=short, cast_to=object) for _ in range(2)]
        time.sleep(1.1)
        for handle in expired:  # buried: each folder keeps a tombstone that says why
            with pytest.raises(openai.APIStatusError, match="expired") as gone:
                client.get(f"/compactions/{handle['id']}", cast_to=object)
            assert gone.value.status_code == 410
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
    recent, aged = (handles / handle["id"] / "manifest.json" for handle in expired)
    tombstone = json.loads(aged.read_text())
    assert set(tombstone) == {"tenant", "gone", "buried_at"}  # the tensors are freed
    aged.write_text(json.dumps({**tombstone, "buried_at": time.time() - TOMBSTONE_SECONDS - 60}))

    with served_tiny(tiny_llama_dir, tmp_path, log="second.log") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        assert client.get(f"/compactions/{kept['id']}", cast_to=object) == kept
        assert continuation(client, kept["id"]) == before  # identical text and logprobs

        with pytest.raises(openai.APIStatusError, match="is lost") as lost:
            continuation(client, altered["id"])
        assert lost.value.status_code == 410
        with pytest.raises(openai.NotFoundError):
            continuation(client, "cmp_interrupted")
        with pytest.raises(openai.APIStatusError, match="expired") as gone:
            client.get(f"/compactions/{expired[0]['id']}", cast_to=object)
        assert gone.value.status_code == 410 and recent.is_file()
        with pytest.raises(openai.NotFoundError):  # its tombstone was a week old: forgotten
            client.get(f"/compactions/{expired[1]['id']}", cast_to=object)
        assert not aged.parent.exists()

        client.delete(f"/compactions/{kept['id']}", cast_to=object)
        assert not (handles / kept["id"]).exists()
        with pytest.raises(openai.NotFoundError):
            client.get(f"/compactions/{kept['id']}", cast_to=object)
