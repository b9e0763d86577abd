"""Pooled per-head budgets served by the real engine (issue #8): each KV head keeps its own
number of rows, packed by page into the handle's blocks (engine/pages.py)."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.handles import greedy, reference_logprobs, stored
from tests.server import TINY as MODEL
from tests.server import served_tiny
from vllm_compaction import documents, hf, portable
from vllm_compaction.engine import pages

pytestmark = pytest.mark.slow
BLOCK = 32  # served_tiny's block size


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("head-budgets")


@pytest.fixture(scope="module")
def server(tiny_llama_dir, folder):
    with served_tiny(tiny_llama_dir, folder) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


@pytest.fixture(scope="module")
def text(tiny_llama_dir) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    article = " ".join(p["context"] for p in documents.squad()["data"][3]["paragraphs"][:4])
    return tokenizer(article)["input_ids"][:600]


def _compact(client, **body) -> dict:
    return client.post("/compact", body={"model": MODEL, **body}, cast_to=object)


def test_pooled_heads_keep_their_own_rows_and_serve_what_transformers_computes(
    client, folder, text, tiny_llama_dir
):
    question = text[-12:]
    pooled = _compact(client, prompt=text, ratio=8, queries="context", head_budgets="pooled")
    uniform = _compact(client, prompt=text, ratio=8, queries="context")
    assert pooled["head_budgets"] == "pooled" and uniform["head_budgets"] == "uniform"
    assert pooled["compacted_tokens"] == uniform["compacted_tokens"] == math.ceil(len(text) / 8)
    assert uniform["slots"] == math.ceil(uniform["compacted_tokens"] / BLOCK) * BLOCK

    rows = stored(folder, pooled["id"])
    per_head, needed = [], []
    for keys, bias, table in zip(rows["keys"], rows["bias"], rows["pages"], strict=True):
        live = torch.isfinite(bias).sum(dim=1)  # each head's rows over its pages
        assert int(live.sum()) == 2 * pooled["compacted_tokens"]  # 2 KV heads share them
        per_head.append(live.tolist())
        needed.append(pages.packed_blocks(live, BLOCK))
        assert keys.shape[1] == pooled["slots"] and bias.shape[1] == table.shape[1] * BLOCK
    assert pooled["slots"] == max(needed) * BLOCK
    assert any(a != b for a, b in per_head), "pooling gave every head the same rows"

    served = greedy(client, question, pooled["id"])
    got = torch.tensor(served.token_logprobs)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    prefix = [
        hf.Prefix(pages.unpack(k, t, BLOCK).float(), b, pages.unpack(v, t, BLOCK).float())
        for k, b, v, t in zip(
            rows["keys"], rows["bias"], rows["values"], rows["pages"], strict=True
        )
    ]
    expected = reference_logprobs(model, prefix, pooled["slots"], question, served)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # Negative control: the region read column by column, as an unpacked handle would be.
    by_column = [
        hf.Prefix(k.float(), torch.zeros(k.shape[:2]), v.float())
        for k, v in zip(rows["keys"], rows["values"], strict=True)
    ]
    wrong = reference_logprobs(model, by_column, pooled["slots"], question, served)
    assert (got - wrong).abs().max() > 1e-3


def test_a_pooled_handle_survives_export_and_import(server, client, text):
    handle = _compact(client, prompt=text[:300], ratio=6, queries="context", head_budgets="pooled")
    before = greedy(client, text[-8:], handle["id"])
    blob = httpx.get(f"{server}/v1/compactions/{handle['id']}/content", timeout=60)
    assert blob.status_code == 200
    imported = httpx.post(f"{server}/v1/compactions", content=blob.content, timeout=60)
    assert imported.status_code == 200, imported.text
    copy = imported.json()
    assert copy["head_budgets"] == "pooled" and copy["slots"] == handle["slots"]
    after = greedy(client, text[-8:], copy["id"])
    assert after.tokens == before.tokens
    torch.testing.assert_close(
        torch.tensor(after.token_logprobs), torch.tensor(before.token_logprobs), atol=1e-5, rtol=0
    )
    # A page table that points past the handle's blocks is refused, not read.
    manifest, ranks = portable.unpack(blob.content, None)
    ranks[0]["pages"][0][0, 0] = handle["slots"]  # pages count blocks x heads, not slots
    forged = portable.pack(manifest, ranks, None)
    refused = httpx.post(f"{server}/v1/compactions", content=forged, timeout=60)
    assert refused.status_code == 400 and "page tables" in refused.json()["error"]["message"]
    assert greedy(client, text[-8:], copy["id"]).tokens == before.tokens


@pytest.mark.parametrize(
    "body,param",
    [
        ({"method": "am-omp"}, None),
        ({"method": "strided"}, None),
        ({"chunk_tokens": 200}, "head_budgets"),
    ],
)
def test_settings_pooling_cannot_serve_are_refused(client, text, body, param):
    with pytest.raises(openai.BadRequestError) as refused:
        _compact(client, prompt=text, head_budgets="pooled", queries="context", **body)
    if param is not None:
        assert refused.value.body["param"] == param


def test_pooled_handles_are_not_extended(client, text):
    handle = _compact(client, prompt=text[:300], ratio=6, queries="context", head_budgets="pooled")
    with pytest.raises(openai.BadRequestError) as refused:
        _compact(client, prompt=text[300:400], previous=handle["id"], queries="context")
    assert refused.value.body["param"] == "previous"
    assert "pooled" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        _compact(client, prompt=text[300:400], previous=handle["id"], head_budgets="pooled")
    assert greedy(client, text[-8:], handle["id"]).tokens  # still serves
