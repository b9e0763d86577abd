"""Handles survive a crash: SIGKILL the whole server during compactions and after them, restart,
and every handle that was answered 200 still works with identical logprobs; interrupted writes
are never loaded."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from transformers import AutoTokenizer

from tests.server import served
from vllm_compaction import documents, store

pytestmark = pytest.mark.slow
MODEL = "tiny"


def _serve(tiny_llama_dir, handles, log):
    args = [str(tiny_llama_dir), "--served-model-name", MODEL, "--dtype", "float32"]
    args += ["--block-size", "32", "--max-model-len", "2048"]
    return served(args, log, env={"VLLM_COMPACTION_HANDLES_DIR": str(handles)})


def _continue(base: str, handle_id: str) -> httpx.Response:
    body = {
        "model": MODEL,
        "prompt": " In short,",
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": 1,
        "compaction": handle_id,
    }
    return httpx.post(f"{base}/v1/completions", json=body, timeout=120)


def _answer(response: httpx.Response) -> tuple[str, list[float]]:
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def test_handles_answered_200_survive_sigkill(tiny_llama_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    articles = documents.squad()["data"][6:16]
    texts = [
        tokenizer.decode(
            tokenizer(" ".join(p["context"] for p in a["paragraphs"]))["input_ids"][:900]
        )
        for a in articles
    ]
    handles = tmp_path / "handles"
    answered: dict[str, tuple[str, list[float]] | None] = {}  # id -> answer before the crash
    in_flight = threading.Event()

    def compact_forever(base: str) -> None:
        """Compact, then continue, until the server dies; records what was answered."""
        for i in range(10_000):
            body = {"model": MODEL, "prompt": texts[i % len(texts)], "ratio": 8}
            try:
                in_flight.set()
                made = httpx.post(f"{base}/v1/compact", json=body, timeout=120)
                in_flight.clear()
                assert made.status_code == 200, made.text
                handle_id = made.json()["id"]
                answered[handle_id] = None
                answered[handle_id] = _answer(_continue(base, handle_id))
            except httpx.TransportError:
                return

    with _serve(tiny_llama_dir, handles, tmp_path / "first.log") as base:
        client = threading.Thread(target=compact_forever, args=(base,))
        client.start()
        deadline = time.monotonic() + 120
        while len(answered) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Kill while a compaction is under way (its request sent, no answer yet).
        while not in_flight.is_set():
            time.sleep(0.01)
        time.sleep(0.3)
        base.kill()
        client.join()
    assert len(answered) >= 3

    with _serve(tiny_llama_dir, handles, tmp_path / "second.log") as base:
        for handle_id, before in answered.items():
            after = _answer(_continue(base, handle_id))
            if before is not None:
                assert after == before, handle_id
        # Every folder left is a complete handle: interrupted writes were removed at start-up.
        for folder in handles.iterdir():
            assert (folder / store.MANIFEST).exists(), folder.name
        # And after an idle crash too.
        base.kill()

    with _serve(tiny_llama_dir, handles, tmp_path / "third.log") as base:
        for handle_id, before in answered.items():
            if before is not None:
                assert _answer(_continue(base, handle_id)) == before
