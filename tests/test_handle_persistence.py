"""Handles survive a restart: stored atomically, reloaded on first use, lost (410) if altered."""

from __future__ import annotations

import openai
import pytest

from tests.server import served

pytestmark = pytest.mark.slow
MODEL = "tiny"


def _serve(tiny_llama_dir, handles, log):
    args = [str(tiny_llama_dir), "--served-model-name", MODEL, "--dtype", "float32"]
    args += ["--block-size", "32", "--max-model-len", "2048"]
    return served(args, log, env={"VLLM_COMPACTION_HANDLES_DIR": str(handles)})


def _continue(client, handle_id: str):
    out = client.completions.create(
        model=MODEL,
        prompt=" The end:",
        max_tokens=8,
        temperature=0,
        logprobs=1,
        extra_body={"compaction": handle_id},
    )
    return out.choices[0].text, out.choices[0].logprobs.token_logprobs


def test_handles_reload_after_restart_and_altered_ones_are_lost(tiny_llama_dir, tmp_path):
    handles = tmp_path / "handles"
    text = "The Normans were the people who gave their name to Normandy in France. " * 12
    with _serve(tiny_llama_dir, handles, tmp_path / "first.log") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        body = {"model": MODEL, "prompt": text, "ratio": 5, "queries": "context"}
        kept = client.post("/compact", body=body, cast_to=object)
        altered = client.post("/compact", body=body, cast_to=object)
        before = _continue(client, kept["id"])
    assert sorted(p.name for p in (handles / kept["id"]).iterdir()) == [
        "manifest.json",
        "rank0.safetensors",
    ]
    tensors = handles / altered["id"] / "rank0.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF
    tensors.write_bytes(bytes(data))
    interrupted = handles / "cmp_interrupted"  # a compaction killed before its manifest
    interrupted.mkdir()
    (interrupted / "rank0.safetensors").write_bytes(b"partial")

    with _serve(tiny_llama_dir, handles, tmp_path / "second.log") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        assert client.get(f"/compactions/{kept['id']}", cast_to=object) == kept
        assert _continue(client, kept["id"]) == before  # identical text and logprobs

        with pytest.raises(openai.APIStatusError, match="is lost") as lost:
            _continue(client, altered["id"])
        assert lost.value.status_code == 410
        with pytest.raises(openai.NotFoundError):
            _continue(client, "cmp_interrupted")

        client.delete(f"/compactions/{kept['id']}", cast_to=object)
        assert not (handles / kept["id"]).exists()
        with pytest.raises(openai.NotFoundError):
            client.get(f"/compactions/{kept['id']}", cast_to=object)
