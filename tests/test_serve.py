"""The CLI serves a real model through vLLM's OpenAI server, with our plugin loaded."""

from __future__ import annotations

import openai
import pytest

from tests.server import served
from vllm_compaction.machine import slow_bf16

pytestmark = pytest.mark.slow


def test_serve_default_model_answers_completion_and_chat(smollm2_dir, tmp_path):
    log = tmp_path / "server.log"
    with served([], log, env={"VLLM_COMPACTION_HANDLES_DIR": str(tmp_path / "handles")}) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["smollm2-135m"]

        completion = client.completions.create(
            model="smollm2-135m", prompt="The capital of France is", max_tokens=8, temperature=0
        )
        assert completion.choices[0].text.strip()
        assert completion.usage.completion_tokens == 8

        chat = client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "Name one colour of the rainbow."}],
            max_tokens=16,
            temperature=0,
        )
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content.strip()

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    text = log.read_text()
    assert "vllm-compaction plugin loaded" in text
    # bf16 (the model's own) only where the CPU has bf16 instructions; float32 elsewhere.
    assert f"dtype=torch.{'float32' if slow_bf16() else 'bfloat16'}," in text


def test_tensor_parallel_workers_get_their_own_cpus_on_one_numa_node():
    from vllm_compaction.cli import thread_binding

    assert thread_binding(1, [0, 1], 1) == "auto"
    assert thread_binding(2, [0, 1, 2, 3], 2) == "auto"  # a node each: vLLM's own binding
    assert thread_binding(2, [0, 1], 1) == "0|1"
    assert thread_binding(2, [0, 2, 4, 6, 7], 1) == "0,2|4,6"
    with pytest.raises(ValueError, match="need 4 CPUs"):
        thread_binding(4, [0, 1], 1)
