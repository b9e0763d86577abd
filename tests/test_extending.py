"""Extending a handle: `POST /v1/compact` with `previous` compacts only the new input, in the
presence of the previous handle's rows, into a new handle (issue #8)."""

from __future__ import annotations

import functools
import json
import math

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.compare import assert_same_greedy
from tests.handles import GENERATED, greedy, reference_logprobs, stored, token_ids
from tests.server import TINY as MODEL
from tests.server import served_tiny
from vllm_compaction import documents, hf

pytestmark = pytest.mark.slow
KEYS = {"key-alice": "alice", "key-bob": "bob"}
FOLLOW_UP = [{"role": "user", "content": "Who is it about?"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("extending")


@pytest.fixture(scope="module")
def server(tiny_llama_dir, folder):
    keys = folder / "keys.json"
    keys.write_text(json.dumps(KEYS))
    # Small prefill chunks: the extension's capture spans several engine steps.
    flags = ["--api-keys-file", str(keys), "--max-num-batched-tokens", "128"]
    with served_tiny(tiny_llama_dir, folder, *flags) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="key-alice")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def parts(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """An earlier context, the tool output that follows it, and a question (token ids)."""
    text = " ".join(p["context"] for p in documents.squad()["data"][2]["paragraphs"][:4])
    ids = tokenizer(text)["input_ids"]
    return ids[:250], ids[250:400], tokenizer(" Who is it about?")["input_ids"]


def _compact(client, **body) -> dict:
    return client.post("/compact", body={"model": MODEL, **body}, cast_to=object)


def _chat(client, messages, handle_id=None):
    """Greedy tokens and top logprobs of a short chat reply."""
    out = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=GENERATED,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"compaction": handle_id} if handle_id else {},
    )
    content = out.choices[0].logprobs.content
    return [t.token for t in content], [
        {x.token: x.logprob for x in t.top_logprobs} for t in content
    ]


def _conversation(tokenizer, parts):
    """A document read in one turn, then a tool call and its output."""
    old, new, _ = parts
    history = [{"role": "user", "content": f"Read this:\n{tokenizer.decode(old)}"}]
    turns = [
        {"role": "assistant", "content": "Calling the search tool."},
        {"role": "user", "content": f"Tool output:\n{tokenizer.decode(new)}"},
    ]
    return history, turns


def _listed(client) -> list[str]:
    return [h["id"] for h in client.get("/compactions?limit=100", cast_to=object)["data"]]


def _reference(model, rows, prompt, served, hidden_rows: int = 0) -> torch.Tensor:
    """Transformers' logprobs of the served greedy tokens after a handle's stored rows and
    `prompt`; `hidden_rows` masks the first rows out (a negative control)."""
    prefix = []
    for k, b, v in zip(rows["keys"], rows["bias"], rows["values"], strict=True):
        b = b.clone()
        b[:, :hidden_rows] = -math.inf
        prefix.append(hf.Prefix(k.float(), b, v.float()))
    return reference_logprobs(model, prefix, rows["keys"][0].shape[1], prompt, served)


def _same_greedy(a, b, atol=1e-4) -> None:
    assert_same_greedy(a.tokens, a.top_logprobs, b.tokens, b.top_logprobs, atol=atol)


def test_extending_at_ratio_one_continues_like_the_whole_prompt(client, parts):
    old, new, question = parts
    first = _compact(client, prompt=old, ratio=1, queries="context")
    extended = _compact(client, prompt=new, previous=first["id"], ratio=1, queries="context")
    assert extended["id"] != first["id"] and extended["previous"] == first["id"]
    assert extended["original_tokens"] == extended["compacted_tokens"] == len(old) + len(new)
    assert extended["usage"]["prompt_tokens"] == len(new)
    # 250 rows in 256 slots, then 400 rows in 416: every row moved by 416 - 256 - 150 = +10.
    _same_greedy(greedy(client, question, extended["id"]), greedy(client, old + new + question))


def test_extending_a_conversation_continues_like_the_whole_chat(client, parts, tokenizer):
    history, turns = _conversation(tokenizer, parts)
    first = _compact(client, messages=history, ratio=1, queries="context")
    extended = _compact(client, messages=turns, previous=first["id"], ratio=1, queries="context")
    assert extended["kind"] == "messages"
    chat = functools.partial(_chat, client)
    assert_same_greedy(*chat(FOLLOW_UP, extended["id"]), *chat(history + turns + FOLLOW_UP))

    # At 10x the new turns' template tokens are kept verbatim and repeat queries are used.
    tenth = _compact(client, messages=history, ratio=10)
    again = _compact(client, messages=turns, previous=tenth["id"], ratio=10)
    assert again["queries"] == "repeat"
    assert again["compacted_tokens"] - tenth["compacted_tokens"] == -(
        -again["usage"]["prompt_tokens"] // 10
    )
    assert chat(FOLLOW_UP, again["id"])[0]


def test_extending_a_tenth_serves_what_transformers_computes(client, parts, folder, tiny_llama_dir):
    old, new, question = parts
    first = _compact(client, prompt=old, ratio=10)
    before = greedy(client, question, first["id"])
    extended = _compact(client, prompt=new, previous=first["id"], ratio=10)
    assert extended["queries"] == "repeat"
    kept = first["compacted_tokens"]
    assert extended["compacted_tokens"] == kept + math.ceil(len(new) / 10)
    assert extended["original_tokens"] == len(old) + len(new)

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    earlier, rows = stored(folder, first["id"]), stored(folder, extended["id"])
    slots = rows["keys"][0].shape[1]
    assert slots == math.ceil(extended["compacted_tokens"] / 32) * 32
    # The previous rows are kept as they were, moved to the new slots' positions.
    delta = torch.tensor([[slots - earlier["keys"][0].shape[1] - len(new)]])
    for layer, keys in enumerate(rows["keys"]):
        assert torch.equal(rows["values"][layer][:, :kept], earlier["values"][layer][:, :kept])
        assert torch.equal(rows["bias"][layer][:, :kept], earlier["bias"][layer][:, :kept])
        cos, sin = model.model.rotary_emb(keys, delta)
        _, moved = apply_rotary_pos_emb(keys, earlier["keys"][layer][:, :kept], cos, sin)
        torch.testing.assert_close(keys[:, :kept], moved[0], atol=1e-5, rtol=0)
    new_bias = torch.stack([b[:, kept : extended["compacted_tokens"]] for b in rows["bias"]])
    assert new_bias.abs().max() > 0.01  # the new part really carries a fitted beta

    served = greedy(client, question, extended["id"])
    got = torch.tensor(served.token_logprobs)
    torch.testing.assert_close(got, _reference(model, rows, question, served), atol=1e-4, rtol=0)
    # Negative control: the same comparison without the previous rows must fail.
    without = _reference(model, rows, question, served, hidden_rows=kept)
    assert (got - without).abs().max() > 1e-3

    # Both handles stand on their own: the old one answers as before, also once the other
    # exists, and the new one keeps answering once the old one is deleted.
    _same_greedy(greedy(client, question, first["id"]), before, atol=1e-5)
    client.delete(f"/compactions/{first['id']}", cast_to=object)
    _same_greedy(greedy(client, question, extended["id"]), served, atol=1e-5)


def test_recompacting_folds_the_previous_rows_into_a_handle_of_one_size(
    client, parts, folder, tiny_llama_dir
):
    old, new, question = parts
    first = _compact(client, prompt=old, ratio=5, queries="context")  # 50 rows in 64 slots
    folded = _compact(
        client, prompt=new, previous=first["id"], recompact=True, target_tokens=50,
        queries="context",
    )  # fmt: skip
    assert folded["compacted_tokens"] == 50 and folded["original_tokens"] == len(old) + len(new)
    assert folded["previous"] == first["id"] and folded["ratio"] == 8
    earlier, rows = stored(folder, first["id"]), stored(folder, folded["id"])
    assert rows["keys"][0].shape == earlier["keys"][0].shape  # 64 slots, as before

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    # Every key carries its slot's rotation; the context moved by -len(new) positions.
    delta = torch.tensor([[-len(new)]])
    for layer in range(len(rows["keys"])):
        cos, sin = model.model.rotary_emb(rows["keys"][layer], delta)
        _, moved = apply_rotary_pos_emb(rows["keys"][layer], earlier["keys"][layer], cos, sin)
        moved, keys = moved[0][:, :50], rows["keys"][layer][:, :50]
        # The first rows (the context's first tokens) stay verbatim with beta = 0.
        torch.testing.assert_close(keys[:, :4], moved[:, :4], atol=1e-5, rtol=0)
        assert not rows["bias"][layer][:, :4].any()
        # The rest is chosen among the previous rows and the new tokens alike.
        distance = torch.cdist(keys[:, 4:], moved[:, 4:]).amin(dim=-1)
        from_previous = (distance < 1e-4).sum().item()
        assert 0 < from_previous < distance.numel(), (layer, from_previous)

    served = greedy(client, question, folded["id"])
    got = torch.tensor(served.token_logprobs)
    torch.testing.assert_close(got, _reference(model, rows, question, served), atol=1e-4, rtol=0)

    with pytest.raises(openai.BadRequestError) as refused:  # more than one chunk
        _compact(client, prompt=new, previous=first["id"], recompact=True, chunk_tokens=64)
    assert refused.value.body["param"] == "recompact"


def test_bad_extensions_are_refused(server, client, parts):
    old, new, _ = parts
    document = _compact(client, prompt=old, ratio=10, queries="context")
    chat = _compact(client, messages=[{"role": "user", "content": "Hello there."}], ratio=1)

    def post(key="key-alice", **body):
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": MODEL, **body}
        return httpx.post(f"{server}/v1/compact", json=body, headers=headers, timeout=120)

    unknown = post(prompt=new, previous="cmp_" + "x" * 32)
    foreign = post("key-bob", prompt=new, previous=document["id"])
    assert unknown.status_code == foreign.status_code == 404, (unknown.text, foreign.text)
    assert foreign.json()["error"]["message"] == f"no compaction {document['id']!r}"
    refusals = [
        post(messages=[{"role": "user", "content": "more"}], previous=document["id"]),
        post(prompt=new, previous=chat["id"]),
        post(prompt="", previous=document["id"]),
        post(prompt=[], previous=document["id"]),
        post(messages=[], previous=chat["id"]),
        post(prompt=new, previous=document["id"], target_tokens=len(new)),
    ]
    for response in refusals:
        assert response.status_code == 400, response.text
        assert set(response.json()["error"]) >= {"message", "type", "code"}
    assert "was made from prompt" in refusals[0].text

    client.delete(f"/compactions/{document['id']}", cast_to=object)
    assert post(prompt=new, previous=document["id"]).status_code == 404
    # The server still serves, plain and on handles.
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=1).choices
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "And then?"}],
        max_tokens=2,
        extra_body={"compaction": chat["id"]},
    )
    assert reply.choices[0].message.content is not None


def test_a_conversation_longer_than_the_model_goes_on_through_extensions(client, tokenizer):
    # The served model has 2048 positions; two 1,100-token turns exceed them uncompacted.
    text = " ".join(p["context"] for p in documents.squad()["data"][3]["paragraphs"])
    ids = tokenizer(text)["input_ids"]
    first_turn, second_turn = tokenizer.decode(ids[:1100]), tokenizer.decode(ids[1100:2200])
    first = _compact(client, messages=[{"role": "user", "content": first_turn}], ratio=10)
    turns = [
        {"role": "assistant", "content": "Noted. Send the rest."},
        {"role": "user", "content": second_turn},
    ]
    extended = _compact(client, messages=turns, previous=first["id"], ratio=10)
    assert extended["original_tokens"] > 2048
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is it about?"}],
        max_tokens=4,
        extra_body={"compaction": extended["id"]},
    )
    assert reply.usage.completion_tokens == 4


def test_chunked_compaction_is_the_chain_of_its_extensions(client, parts, folder):
    old, new, question = parts
    whole = old + new  # 400 tokens: two chunks of 200
    before = _listed(client)
    chunked = _compact(client, prompt=whole, ratio=10, queries="context", chunk_tokens=200)
    assert _listed(client) == [*before, chunked["id"]]  # one handle; the steps are not kept
    first = _compact(client, prompt=whole[:200], ratio=10, queries="context")
    chain = _compact(client, prompt=whole[200:], previous=first["id"], ratio=10, queries="context")
    assert chunked["chunks"] == 2 and chain["chunks"] == 1
    assert chunked["original_tokens"] == 400 and chunked["queries"] == "context"
    assert chunked["compacted_tokens"] == chain["compacted_tokens"] == 40
    assert chunked["usage"] == {"prompt_tokens": 400, "query_tokens": 0, "total_tokens": 400}
    made, expected = stored(folder, chunked["id"]), stored(folder, chain["id"])
    for part, layers in expected.items():
        for got, want in zip(made[part], layers, strict=True):
            torch.testing.assert_close(got, want)
    _same_greedy(greedy(client, question, chunked["id"]), greedy(client, question, chain["id"]))


def test_chunks_at_ratio_one_continue_like_the_whole_input(client, parts, tokenizer):
    old, new, question = parts
    # 400 tokens in chunks of 133, 133 and 134, each prefilled after the slots before it.
    chunked = _compact(client, prompt=old + new, ratio=1, queries="context", chunk_tokens=150)
    assert chunked["chunks"] == 3 and chunked["compacted_tokens"] == 400
    _same_greedy(greedy(client, question, chunked["id"]), greedy(client, old + new + question))

    history, turns = _conversation(tokenizer, parts)
    talk = _compact(client, messages=history + turns, ratio=1, chunk_tokens=150)
    assert talk["chunks"] == 3 and talk["queries"] == "context"
    chat = functools.partial(_chat, client)
    assert_same_greedy(*chat(FOLLOW_UP, talk["id"]), *chat(history + turns + FOLLOW_UP))


def test_an_input_longer_than_the_model_is_compacted_in_chunks_with_progress(
    server, client, tokenizer
):
    articles = documents.squad()["data"][3:5]
    text = " ".join(p["context"] for article in articles for p in article["paragraphs"])
    ids = tokenizer(text)["input_ids"][:3000]  # the served model has 2048 positions
    headers = {"Authorization": "Bearer key-alice"}

    def post(**body):
        body = {"model": MODEL, "prompt": ids, **body}
        return httpx.post(f"{server}/v1/compact", json=body, headers=headers, timeout=300)

    whole = post(ratio=10)
    assert whole.status_code == 400 and "chunk_tokens" in whole.json()["error"]["message"]
    body = {"model": MODEL, "prompt": ids, "ratio": 10, "chunk_tokens": 1000, "stream": True}
    with httpx.stream(
        "POST", f"{server}/v1/compact", json=body, headers=headers, timeout=300
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    progress, handle = [json.loads(e) for e in events[:-2]], json.loads(events[-2])
    assert [(p["object"], p["chunk"], p["chunks"]) for p in progress] == [
        ("compaction.progress", i, 3) for i in range(4)
    ]
    assert [p["tokens_done"] for p in progress] == [0, 1000, 2000, 3000]
    assert {p["total_tokens"] for p in progress} == {3000}
    assert handle["object"] == "compaction" and handle["chunks"] == 3
    assert (handle["original_tokens"], handle["compacted_tokens"]) == (3000, 300)
    assert client.get(f"/compactions/{handle['id']}", cast_to=object) == handle
    assert len(token_ids(greedy(client, " In short,", handle["id"]))) == GENERATED

    refusals = {
        "grows past the context": post(ratio=1.5, chunk_tokens=1000),
        "too small a budget": post(target_tokens=2, chunk_tokens=1000),
        "too small a chunk": post(chunk_tokens=16),
        "streamed, bad method": post(chunk_tokens=1000, method="nope", stream=True),
    }
    for why, response in refusals.items():
        assert response.status_code == 400, (why, response.text)
        assert response.headers["content-type"] == "application/json", why
    assert refusals["grows past the context"].json()["error"]["param"] == "chunk_tokens"
    assert "shared by 3 chunks" in refusals["too small a budget"].text
