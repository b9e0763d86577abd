"""/v1/compact and handles over real HTTP, through the `openai` client, on a served engine."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.compare import assert_same_greedy
from tests.handles import greedy
from tests.server import TINY as MODEL
from tests.server import metrics, served_tiny
from vllm_compaction import documents, self_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    # Small prefill chunks: captures and handle requests span several engine steps.
    with served_tiny(tiny_llama_dir, folder, "--max-num-batched-tokens", "128") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


@pytest.fixture(scope="module")
def context(tiny_llama_dir) -> str:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = " ".join(p["context"] for p in documents.squad()["data"][2]["paragraphs"][:4])
    return tokenizer.decode(tokenizer(text)["input_ids"][:400])


def _compact(client, **body):
    return client.post("/compact", body={"model": MODEL, **body}, cast_to=object)


def _assert_same_greedy(a, b) -> None:
    """Completions logprobs (tokens + top_logprobs) of two greedy runs agree to 1e-4."""
    assert_same_greedy(a.tokens, a.top_logprobs, b.tokens, b.top_logprobs, atol=1e-4)


def _chat_steps(choice) -> tuple[list[str], list[dict[str, float]]]:
    content = choice.logprobs.content
    return [t.token for t in content], [
        {x.token: x.logprob for x in t.top_logprobs} for t in content
    ]


def test_ratio_one_handle_continues_like_the_full_prompt(client, context, tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tokenizer(context)["input_ids"]
    handle = _compact(client, prompt=ids, ratio=1, queries="context")
    assert handle["id"].startswith("cmp_") and handle["object"] == "compaction"
    assert handle["original_tokens"] == handle["compacted_tokens"] == len(ids)
    assert handle["queries"] == "context"

    question = tokenizer(" Who is it about?")["input_ids"]
    sampling = dict(model=MODEL, max_tokens=8, temperature=0, logprobs=5)
    used = client.completions.create(
        prompt=question, extra_body={"compaction": handle["id"]}, **sampling
    )
    full = client.completions.create(prompt=ids + question, **sampling)
    _assert_same_greedy(used.choices[0].logprobs, full.choices[0].logprobs)


def test_handle_lifecycle_and_streaming(client, context):
    handle = _compact(client, prompt=context, ratio=10)
    assert handle["queries"] == "repeat"
    assert handle["compacted_tokens"] == -(-handle["original_tokens"] // 10)
    assert client.get(f"/compactions/{handle['id']}", cast_to=object) == handle

    extra = {"compaction": handle["id"]}
    once = client.completions.create(
        model=MODEL, prompt=" In short,", max_tokens=6, temperature=0, extra_body=extra
    )
    stream = client.completions.create(
        model=MODEL,
        prompt=" In short,",
        max_tokens=6,
        temperature=0,
        extra_body=extra,
        stream=True,
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == once.choices[0].text

    deleted = client.delete(f"/compactions/{handle['id']}", cast_to=object)
    assert deleted == {"id": handle["id"], "object": "compaction.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.get(f"/compactions/{handle['id']}", cast_to=object)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body=extra)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"prompt": "some text", "ratio": 0.5}, 400),
        ({"prompt": "some text here", "target_tokens": 1000}, 400),
        ({"prompt": ""}, 400),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400),
        ({"prompt": "some text", "method": "nope"}, 400),
        ({"prompt": "word " * 3000}, 400),
        ({"prompt": "some text", "model": "no-such-model"}, 404),
        ({"messages": [{"role": "user", "content": "some words " * 20}], "target_tokens": 3}, 400),
        ({"messages": [{"role": "user"}], "ratio": 2}, 400),
        ({"prompt": [10**9, 5, 6, 7, 8, 9]}, 400),
        ({"prompt": [-1, 5, 6, 7, 8, 9]}, 400),
        ({"prompt": "some text", "ratio": "abc"}, 400),
        ({"prompt": "some text", "keep_first": -1}, 400),
        ({"prompt": "some text", "max_queries": 0}, 400),
        ({"prompt": "some text", "target_tokens": 0}, 400),
        ({"prompt": "some text", "queries": "telepathy"}, 400),
        ({"prompt": "some text", "surprise": 1}, 400),
        ({"messages": [{"role": "wizard", "content": "hi there you"}]}, 400),
    ],
)
def test_bad_compact_requests_are_refused(server, client, body, status):
    response = httpx.post(f"{server}/v1/compact", json={"model": MODEL, **body}, timeout=60)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) >= {"message", "type", "code"}
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=1).choices


def test_max_queries_reaches_the_fit(client, context):
    few = _compact(client, prompt=context, ratio=8, queries="context", max_queries=2)
    default = _compact(client, prompt=context, ratio=8, queries="context")
    assert (few["max_queries"], default["max_queries"]) == (2, 16384)
    # Two reference queries fit other rows than every query of the context: other logprobs.
    a, b = (greedy(client, " The", handle["id"]) for handle in (few, default))
    assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs, strict=True)) > 1e-3


def test_bad_handle_uses_are_refused(server, client, context):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=1, extra_body={"compaction": "cmp_unknown"}
        )
    handle = _compact(client, prompt=context, ratio=10, queries="context")
    with pytest.raises(openai.BadRequestError, match="use it with /v1/completions"):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=1,
            extra_body={"compaction": handle["id"]},
        )
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(
            model=MODEL,
            prompt="x",
            max_tokens=1,
            echo=True,
            extra_body={"compaction": handle["id"]},
        )
    forged = {"compaction": {"handle": handle["id"], "slots": 64}}
    for route, body in (
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ):
        response = httpx.post(
            f"{server}{route}",
            json={"model": MODEL, "max_tokens": 1, "kv_transfer_params": forged, **body},
        )
        assert response.status_code == 400 and "reserved" in response.text
    # Routes we do not wrap pass kv_transfer_params through; the engine ignores unsigned ones.
    chat = [{"role": "user", "content": "x"}]
    messages = {"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": chat}
    plain = httpx.post(f"{server}/v1/messages", json=messages)
    forged["compaction"]["signature"] = "0" * 64
    sneaky = httpx.post(f"{server}/v1/messages", json={**messages, "kv_transfer_params": forged})
    assert plain.status_code == sneaky.status_code == 200
    assert sneaky.json()["content"] == plain.json()["content"]
    malformed = httpx.post(
        f"{server}/v1/compact", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code in (400, 422)


def test_deleting_a_handle_mid_stream_does_not_corrupt_the_stream(client, context):
    handle = _compact(client, prompt=context, ratio=10, queries="context")
    extra = {"compaction": handle["id"]}
    sampling = dict(model=MODEL, prompt=" Then", max_tokens=48, temperature=0, extra_body=extra)
    expected = client.completions.create(**sampling).choices[0].text

    stream = client.completions.create(stream=True, **sampling)
    chunks = [next(iter(stream)).choices[0].text]
    deleted = client.delete(f"/compactions/{handle['id']}", cast_to=object)
    assert deleted["deleted"] is True
    chunks += [chunk.choices[0].text for chunk in stream]
    assert "".join(chunks) == expected
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body=extra)


def test_concurrent_chat_sessions_on_one_handle_match_sequential_runs(client, context):
    history = [{"role": "user", "content": f"Read this:\n{context}"}]
    handle = _compact(client, messages=history, ratio=10)
    questions = [[{"role": "user", "content": f"Tell me fact number {i}."}] for i in range(16)]

    def run(messages: list[dict], use_handle: bool):
        extra = {"compaction": handle["id"]} if use_handle else {}
        out = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=12,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            extra_body=extra,
        )
        transfer = (out.model_extra or {}).get("kv_transfer_params") or {}
        return _chat_steps(out.choices[0]), transfer.get("compaction", {}).get("blocks", [])

    jobs = [(q, True) for q in questions] + [(q, False) for q in questions]
    sequential = [run(*job) for job in jobs]
    with ThreadPoolExecutor(max_workers=32) as pool:
        concurrent = list(pool.map(lambda job: run(*job), jobs))
    for (steps, _), (seq_steps, _) in zip(concurrent, sequential, strict=True):
        # Prefill chunking differs under load, and with it the rounding: ties may flip.
        assert_same_greedy(*steps, *seq_steps, atol=1e-3)
    # Every session read the handle from the same blocks: its KV exists once.
    slot_blocks = -(-handle["compacted_tokens"] // 32)
    shared = {tuple(blocks[:slot_blocks]) for _, blocks in concurrent[:16]}
    assert len(shared) == 1 and len(next(iter(shared))) == slot_blocks
    assert all(blocks == [] for _, blocks in concurrent[16:])


def test_chat_on_a_messages_handle_continues_the_conversation(client, context):
    history = [
        {"role": "system", "content": "You answer questions about a text."},
        {"role": "user", "content": f"Read this:\n{context}"},
        {"role": "assistant", "content": "I have read it."},
    ]
    follow_up = [{"role": "user", "content": "What is it about?"}]
    handle = _compact(client, messages=history, ratio=1, queries="context")
    assert handle["kind"] == "messages" and handle["ratio"] == 1

    sampling = dict(model=MODEL, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
    used = client.chat.completions.create(
        messages=follow_up, extra_body={"compaction": handle["id"]}, **sampling
    )
    full = client.chat.completions.create(messages=history + follow_up, **sampling)
    assert used.usage.completion_tokens == full.usage.completion_tokens == 8
    assert_same_greedy(*_chat_steps(used.choices[0]), *_chat_steps(full.choices[0]))

    compacted = _compact(client, messages=history, ratio=8)
    assert compacted["queries"] == "repeat"
    reply = client.chat.completions.create(
        messages=follow_up, extra_body={"compaction": compacted["id"]}, **sampling
    )
    assert reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="made from messages"):
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=1, extra_body={"compaction": compacted["id"]}
        )


def test_repeat_queries_past_the_context_fall_back_to_context_queries(client, tiny_llama_dir):
    # The served model has 2048 positions: repeating a 1,200-token context would need 2,400.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = " ".join(p["context"] for p in documents.squad()["data"][3]["paragraphs"])
    long_text = tokenizer.decode(tokenizer(text)["input_ids"][:1200])
    for body in (
        {"prompt": long_text},
        {"messages": [{"role": "user", "content": long_text}]},
    ):
        handle = _compact(client, ratio=10, **body)
        assert handle["queries"] == "context", body.keys()
        assert handle["original_tokens"] >= 1200


def test_metrics_count_compactions_handles_and_requests(server, client, context):
    before = metrics(server)
    handle = _compact(client, prompt=context, ratio=10, queries="context")
    client.completions.create(
        model=MODEL, prompt=" So", max_tokens=2, extra_body={"compaction": handle["id"]}
    )
    httpx.post(f"{server}/v1/compact", json={"model": MODEL, "prompt": "x", "method": "nope"})
    during = metrics(server)
    client.delete(f"/compactions/{handle['id']}", cast_to=object)
    after = metrics(server)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return during.get(key, 0.0) - before.get(key, 0.0)

    ok = {"method": "am-highest", "outcome": "ok"}
    assert delta("vllm_compaction:compactions_total", **ok) == 1
    refused = {"method": "unknown", "outcome": "refused"}
    assert delta("vllm_compaction:compactions_total", **refused) == 1
    assert delta("vllm_compaction:tokens_total", direction="in") == handle["original_tokens"]
    assert delta("vllm_compaction:tokens_total", direction="out") == handle["compacted_tokens"]
    assert delta("vllm_compaction:handle_requests_total", endpoint="completions") == 1
    assert delta("vllm_compaction:seconds_count", stage="total") == 1
    assert delta("vllm_compaction:handles") == 1
    # 4 layers x 2 KV heads x 64 slots x (64 + 64 fp32 dims + 1 bias) x 4 bytes
    assert delta("vllm_compaction:handle_bytes") == 4 * 2 * 64 * 129 * 4
    gone = ("vllm_compaction:handle_bytes", ())
    assert after[gone] == before.get(gone, 0.0)


def test_concurrent_compactions_each_get_their_own_context(client, context, tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tokenizer(context)["input_ids"]
    documents_ = [ids, list(reversed(ids))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        handles = list(
            pool.map(
                lambda doc: _compact(client, prompt=doc, ratio=1, queries="context"), documents_
            )
        )
    question = tokenizer(" And then?")["input_ids"]
    sampling = dict(model=MODEL, max_tokens=6, temperature=0, logprobs=5)
    for doc, handle in zip(documents_, handles, strict=True):
        used = client.completions.create(
            prompt=question, extra_body={"compaction": handle["id"]}, **sampling
        )
        full = client.completions.create(prompt=doc + question, **sampling)
        _assert_same_greedy(used.choices[0].logprobs, full.choices[0].logprobs)


def test_self_study_queries_come_from_the_models_answers_about_the_input(
    client, context, tiny_llama_dir
):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tokenizer(context)["input_ids"]
    studied = _compact(client, prompt=ids, ratio=10, queries="self-study")
    assert studied["queries"] == "self-study"
    # The tasks, each followed by the model's greedy answer to it after the document.
    expected = 0
    for task in self_study.TASKS:
        ask = tokenizer(f"\n\n{task}\n", add_special_tokens=False)["input_ids"]
        answer = client.completions.create(
            model=MODEL,
            prompt=ids + ask,
            max_tokens=self_study.ANSWER_TOKENS,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        expected += len(ask) + len(answer.choices[0].token_ids)
    assert studied["usage"]["query_tokens"] == expected
    assert studied["usage"]["total_tokens"] == len(ids) + expected

    # Other queries fit other rows: the two handles answer differently.
    plain = _compact(client, prompt=ids, ratio=10, queries="context")
    sampling = dict(model=MODEL, prompt=" In short,", max_tokens=6, temperature=0, logprobs=1)
    answers = [
        client.completions.create(**sampling, extra_body={"compaction": h["id"]})
        for h in (studied, plain)
    ]
    logprobs = [a.choices[0].logprobs.token_logprobs for a in answers]
    assert max(abs(a - b) for a, b in zip(*logprobs, strict=True)) > 1e-4

    talk = [{"role": "user", "content": context}]
    chat = _compact(client, messages=talk, ratio=10, queries="self-study")
    assert chat["queries"] == "self-study" and chat["usage"]["query_tokens"] > 0
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "And then?"}],
        max_tokens=4,
        extra_body={"compaction": chat["id"]},
    )
    assert reply.usage.completion_tokens == 4
    # Answers about an extension alone would miss the previous context: context queries.
    more = _compact(client, prompt=ids[:50], previous=plain["id"], queries="self-study")
    assert more["queries"] == "context"
