"""The handle store's limits and portability on a served engine: LRU spill to disk and reload,
disk eviction, export and import (plain and sealed), and refusal of altered or foreign blobs."""

from __future__ import annotations

import copy

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.server import (
    ON_DISK,
    RESIDENT,
    TINY_HANDLE_BYTES,
    continuation,
    metrics,
    served_tiny,
)
from tests.server import TINY as MODEL
from vllm_compaction import documents, portable

pytestmark = pytest.mark.slow


def _counter(base: str, name: str, **labels) -> float:
    return metrics(base).get((f"vllm_compaction:{name}", tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def texts(tiny_llama_dir) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    out = []
    for article in (3, 4, 5):
        text = " ".join(p["context"] for p in documents.squad()["data"][article]["paragraphs"])
        out.append(tokenizer.decode(tokenizer(text)["input_ids"][:300]))
    return out


def _compact(client, text: str) -> dict:
    body = {"model": MODEL, "prompt": text, "target_tokens": 60, "queries": "context"}
    return client.post("/compact", body=body, cast_to=object)


def _import(base: str, blob: bytes) -> httpx.Response:
    return httpx.post(f"{base}/v1/compactions", content=blob, timeout=60)


@pytest.fixture(scope="module")
def spilling(tiny_llama_dir, tmp_path_factory):
    """A server whose memory budget holds one handle: every new one spills the last."""
    budget = {"VLLM_COMPACTION_MEMORY_BYTES": str(TINY_HANDLE_BYTES * 3 // 2)}
    with served_tiny(tiny_llama_dir, tmp_path_factory.mktemp("spill"), **budget) as base:
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused")


def test_memory_budget_spills_least_recently_used_and_reloads_identically(spilling, texts):
    base, client = spilling
    first = _compact(client, texts[0])
    before = continuation(client, first["id"])
    one = metrics(base)[RESIDENT]
    assert one == TINY_HANDLE_BYTES
    spilled = _counter(base, "store_evictions_total", budget="memory")
    for text in texts[1:]:
        _compact(client, text)
    assert _counter(base, "store_evictions_total", budget="memory") == spilled + 2
    assert metrics(base)[RESIDENT] == one  # only the newest stays with the workers

    loads = _counter(base, "store_hits_total", tier="disk")
    assert continuation(client, first["id"]) == before  # reloaded from disk, identical logprobs
    assert _counter(base, "store_hits_total", tier="disk") == loads + 1
    assert metrics(base)[RESIDENT] == one
    hits = _counter(base, "store_hits_total", tier="memory")
    continuation(client, first["id"])
    assert _counter(base, "store_hits_total", tier="memory") == hits + 1


@pytest.fixture(scope="module")
def exported(spilling, texts) -> tuple[dict, bytes, tuple]:
    base, client = spilling
    handle = _compact(client, texts[0])
    response = httpx.get(f"{base}/v1/compactions/{handle['id']}/content")
    assert response.status_code == 200
    return handle, response.content, continuation(client, handle["id"])


def test_an_exported_handle_imports_as_a_new_one_with_identical_logprobs(spilling, exported):
    base, client = spilling
    handle, blob, expected = exported
    assert blob[:8] != portable.SEALED[:8]  # this server has no seal key
    response = _import(base, blob)
    assert response.status_code == 200, response.text
    imported = response.json()
    assert imported["id"] != handle["id"] and imported["id"].startswith("cmp_")
    for field in ("original_tokens", "compacted_tokens", "expires_at", "method", "queries"):
        assert imported[field] == handle[field]
    assert continuation(client, imported["id"]) == expected
    listed = client.get("/compactions", options={"params": {"limit": 100}}, cast_to=object)
    assert imported["id"] in [h["id"] for h in listed["data"]]


def test_altered_foreign_and_garbage_blobs_are_refused_and_the_server_goes_on(spilling, exported):
    base, client = spilling
    handle, blob, expected = exported
    altered = bytearray(blob)
    altered[-3] ^= 0x40
    manifest, ranks = portable.unpack(blob, None)
    foreign = portable.pack({**manifest, "fingerprint": "another model"}, ranks, None)
    one_layer = {part: tensors[:1] for part, tensors in ranks[0].items()}
    reshaped = portable.pack(manifest, [{**ranks[0], "keys": ranks[0]["keys"][:-1]}], None)
    for bad, message in (
        (bytes(altered), "checksum"),
        (foreign, "other model weights"),
        (reshaped, "layer counts"),
        (b"{}", "not a compaction export"),
        (portable.pack(manifest, [one_layer, copy.deepcopy(one_layer)], None), "2 workers' KV"),
    ):
        response = _import(base, bad)
        assert response.status_code == 400, (message, response.text)
        assert message in response.json()["error"]["message"]
    assert httpx.get(f"{base}/v1/compactions/cmp_nope/content").status_code == 404
    too_large = _import(base, bytes(2 * TINY_HANDLE_BYTES))  # past this server's memory budget
    assert too_large.status_code == 413 and "larger than the handle budgets" in too_large.text
    assert continuation(client, handle["id"]) == expected


def test_disk_budget_evicts_the_oldest_and_sealed_blobs_round_trip(
    tiny_llama_dir, tmp_path, texts, spilling, exported
):
    key = tmp_path / "seal.key"
    key.write_text("a secret of more than sixteen bytes")
    budget = int(_handle_size(spilling, texts) * 2.5)  # room for two of the three
    env = {"VLLM_COMPACTION_DISK_BYTES": str(budget), "VLLM_COMPACTION_SEAL_KEY_FILE": str(key)}
    with served_tiny(tiny_llama_dir, tmp_path, **env) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        made = [_compact(client, text) for text in texts]
        assert _counter(base, "store_evictions_total", budget="disk") == 1
        assert metrics(base)[ON_DISK] <= budget
        gone = httpx.get(f"{base}/v1/compactions/{made[0]['id']}")
        assert gone.status_code == 410 and "evicted" in gone.json()["error"]["message"]
        assert not list((tmp_path / "handles" / made[0]["id"]).glob("*.safetensors"))
        newest = continuation(client, made[2]["id"])

        sealed = httpx.get(f"{base}/v1/compactions/{made[2]['id']}/content").content
        assert sealed.startswith(portable.SEALED)
        response = _import(base, sealed)
        assert response.status_code == 200, response.text
        assert continuation(client, response.json()["id"]) == newest
        tampered = bytearray(sealed)
        tampered[len(sealed) // 2] ^= 1
        for bad, message in ((bytes(tampered), "altered"), (exported[1], "only blobs sealed")):
            response = _import(base, bad)
            assert response.status_code == 400 and message in response.text


def _handle_size(spilling, texts) -> int:
    """Bytes one handle of these texts takes on disk, measured on the spilling server."""
    base, client = spilling
    before = metrics(base)[ON_DISK]
    handle = _compact(client, texts[1])
    size = metrics(base)[ON_DISK] - before
    client.delete(f"/compactions/{handle['id']}", cast_to=object)
    return int(size)
