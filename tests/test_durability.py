"""Handles survive a crash: SIGKILL the whole server during compactions and after them, restart,
and every handle that was answered 200 still works with identical logprobs; interrupted writes
are never loaded."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.server import TINY as MODEL
from tests.server import continuation, served_tiny
from vllm_compaction import documents, store

pytestmark = pytest.mark.slow


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_handles_answered_200_survive_sigkill(tiny_llama_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    articles = documents.squad()["data"][6:16]
    texts = [
        tokenizer.decode(
            tokenizer(" ".join(p["context"] for p in a["paragraphs"]))["input_ids"][:900]
        )
        for a in articles
    ]
    handles = tmp_path / "handles"  # where served_tiny keeps them
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
                answered[handle_id] = continuation(_client(base), handle_id)
            except (httpx.TransportError, openai.APIConnectionError):
                return

    with served_tiny(tiny_llama_dir, tmp_path, log="first.log") as base:
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

    with served_tiny(tiny_llama_dir, tmp_path, log="second.log") as base:
        for handle_id, before in answered.items():
            after = continuation(_client(base), handle_id)
            if before is not None:
                assert after == before, handle_id
        # Every folder left is a complete handle: interrupted writes were removed at start-up.
        for folder in handles.iterdir():
            assert (folder / store.MANIFEST).exists(), folder.name
        # And after an idle crash too.
        base.kill()

    with served_tiny(tiny_llama_dir, tmp_path, log="third.log") as base:
        for handle_id, before in answered.items():
            if before is not None:
                assert continuation(_client(base), handle_id) == before
