"""Online compaction: `context_management` on a completion or chat request compacts the
request's own context whenever its cache reaches a threshold, and generation goes on (#8)."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.compare import assert_same_greedy
from tests.server import TINY as MODEL
from tests.server import metrics, served, served_tiny
from vllm_compaction import documents

pytestmark = pytest.mark.slow
BLOCK = 32  # served_tiny's KV block size
SETTINGS = {"compact_threshold": 320, "keep_fraction": 0.25, "keep_last": 16}
GENERATED = 700


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    with served_tiny(tiny_llama_dir, tmp_path_factory.mktemp("online")) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    text = " ".join(p["context"] for p in documents.squad()["data"][6]["paragraphs"][:3])
    return tokenizer(text)["input_ids"][:200]


def _online(client, prompt, settings=SETTINGS, max_tokens=GENERATED, model=MODEL, **extra):
    return client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={
            "context_management": settings,
            "return_token_ids": True,
            "ignore_eos": True,
            **extra,
        },
    )


def _segment(client, prompt, tokens, handle_id=None) -> list[int]:
    extra = {"return_token_ids": True, "ignore_eos": True}
    if handle_id:
        extra["compaction"] = handle_id
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=tokens, temperature=0, extra_body=extra
    )
    return out.choices[0].token_ids


def _chain(client, prompt, settings=SETTINGS, max_tokens=GENERATED) -> tuple[list[int], int]:
    """The documented algorithm done by hand through the public API: generate up to the
    threshold, fold everything but the last keep_last tokens into a handle with
    /v1/compact (`previous` + `recompact`), go on from the handle."""
    limit, keep, fraction = (
        settings[k] for k in ("compact_threshold", "keep_last", "keep_fraction")
    )
    tail, generated, handle, compactions = list(prompt), [], None, 0
    while len(generated) < max_tokens:
        slots = handle["compacted_tokens"] if handle else 0
        slots = math.ceil(slots / BLOCK) * BLOCK
        if slots + len(tail) >= limit:
            region, tail = tail[: len(tail) - keep], tail[len(tail) - keep :]
            rows = (handle["compacted_tokens"] if handle else 0) + len(region)
            body = {
                "prompt": region,
                "queries": "context",
                "target_tokens": max(5, math.ceil(fraction * rows)),
            }
            if handle:
                body |= {"previous": handle["id"], "recompact": True}
            handle = client.post("/compact", body={"model": MODEL, **body}, cast_to=object)
            compactions += 1
            continue
        out = _segment(
            client,
            tail,
            min(limit - slots - len(tail), max_tokens - len(generated)),
            handle and handle["id"],
        )
        generated += out
        tail += out
    return generated, compactions


def test_online_compaction_is_the_chain_of_recompactions(client, prompt):
    online = _online(client, prompt)
    generated, compactions = _chain(client, prompt)
    assert compactions >= 3
    assert online.usage.compactions == compactions
    assert online.usage.prompt_tokens == len(prompt)
    assert online.usage.completion_tokens == GENERATED == len(online.choices[0].token_ids)
    assert online.choices[0].token_ids == generated
    assert online.choices[0].finish_reason == "length"
    # Without compaction the same request cannot run: 200 + 700 tokens fit the model's 2048
    # positions, so compare with the plain run to see compaction changed the context.
    plain = _segment(client, prompt, GENERATED)
    assert plain[:120] == generated[:120]  # the first segment is a plain generation
    assert plain != generated


def test_online_compaction_in_a_chat(client, tokenizer):
    messages = [{"role": "user", "content": "Tell me a long story about the Normans."}]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=400,
        temperature=0,
        extra_body={"context_management": SETTINGS, "return_token_ids": True, "ignore_eos": True},
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    same = _online(client, ids, max_tokens=400)
    assert reply.usage.compactions == same.usage.compactions >= 1
    assert reply.choices[0].token_ids == same.choices[0].token_ids
    assert reply.choices[0].message.content == same.choices[0].text


def test_other_requests_are_unaffected(client, prompt):
    def plain():
        out = client.completions.create(
            model=MODEL, prompt="The Normans were", max_tokens=24, temperature=0, logprobs=5
        )
        return out.choices[0].logprobs

    alone = plain()
    with ThreadPoolExecutor(4) as pool:
        online = pool.submit(_online, client, prompt)
        beside = [pool.submit(plain) for _ in range(3)]
        others = [f.result() for f in beside]
        again = online.result()
    for other in others:
        assert_same_greedy(
            other.tokens, other.top_logprobs, alone.tokens, alone.top_logprobs, atol=1e-5
        )
    assert again.choices[0].token_ids == _online(client, prompt).choices[0].token_ids


def test_client_gone_stops_the_generation(server, client, prompt):
    """A client that disconnects stops its online generation (no more compactions for it), as
    vLLM stops a plain request; the server goes on serving."""

    def compactions() -> float:
        return metrics(server)[("vllm_compaction:online_compactions_total", ())]

    before = compactions()
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 100_000,
        "ignore_eos": True,
        "context_management": SETTINGS,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, timeout=8)
    time.sleep(3)  # the abort reaches the engine
    gone = compactions()
    assert gone > before  # it was compacting when the client left
    time.sleep(8)
    assert compactions() == gone
    assert _online(client, prompt, max_tokens=150).usage.compactions == 1


def test_bad_settings_are_refused(server, client, prompt):
    def post(settings, **body):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, **body}
        body["context_management"] = settings
        return httpx.post(f"{server}/v1/completions", json=body, timeout=120)

    refusals = {
        "above the model": post({"compact_threshold": 4096}),
        "fraction": post({"compact_threshold": 320, "keep_fraction": 1.5}),
        "no room": post({"compact_threshold": 320, "keep_last": 300}),
        "blocks": post({"compact_threshold": 64, "keep_last": 40}),
        "unknown field": post({"compact_threshold": 320, "keep": 3}),
        "stream": post(SETTINGS, stream=True),
        "n": post(SETTINGS, n=2),
        "logprobs": post(SETTINGS, logprobs=1),
    }
    for name, response in refusals.items():
        assert response.status_code == 400, (name, response.text)
        assert response.json()["error"]["param"] == "context_management", name
    unknown = post(SETTINGS, compaction="cmp_" + "x" * 32)
    assert unknown.status_code == 404, unknown.text
    assert post(SETTINGS).status_code == 200  # the server still serves


@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("online-smollm2")
    args = [str(smollm2_dir), "--served-model-name", "smollm2", "--dtype", "float32"]
    args += ["--block-size", "32", "--max-model-len", "2048"]
    with served(
        args, folder / "server.log", env={"VLLM_COMPACTION_HANDLES_DIR": str(folder)}
    ) as base:
        yield base


def _prompt_nll(server, ids, **extra) -> tuple[list[float | None], dict]:
    """Teacher-forced -logprob of every prompt token (None for the first), via prompt_logprobs,
    and the usage."""
    body = {"model": "smollm2", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0, **extra}
    response = httpx.post(f"{server}/v1/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    nll = [
        None if entry is None else -entry[str(t)]["logprob"]
        for t, entry in zip(ids, choice["prompt_logprobs"], strict=True)
    ]
    return nll, response.json()["usage"]


def _article_then_answers(tokenizer, read: int, count: int) -> list[int]:
    """`read` tokens of a SQuAD article, then `count` tokens of questions and answers about
    its paragraphs that ended before the last 64 of them (a continuation that draws on the
    text read before)."""
    ids, qa = [], []
    for paragraph in documents.squad()["data"][1]["paragraphs"]:
        ids += tokenizer(" " + paragraph["context"], add_special_tokens=False)["input_ids"]
        if len(ids) <= read - 64:
            qa += [
                f"Q: {q['question']}\nA: {q['answers'][0]['text']}\n"
                for q in paragraph["qas"]
                if q["answers"]
            ]
    text = "\n\nQuestions about the text, answered:\n" + "".join(qa)
    return ids[:read] + tokenizer(text, add_special_tokens=False)["input_ids"][:count]


def test_stop_string_across_segments(smollm2_server, smollm2_dir):
    """A stop string that begins in one segment and ends in the next stops the generation as
    it would stop a plain one: text cut before it (or after it, when included) and tokens up
    to the one completing it."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    article = documents.squad()["data"][6]["paragraphs"][:3]
    prompt = tokenizer(" ".join(p["context"] for p in article))["input_ids"][:300]
    smollm2 = openai.OpenAI(base_url=f"{smollm2_server}/v1", api_key="unused")
    settings = {"compact_threshold": 448, "keep_fraction": 0.25, "keep_last": 32}
    length = 200
    whole = _online(smollm2, prompt, settings, length, model="smollm2").choices[0]
    # The first segment is the plain generation of 148 tokens (448 - 300 prompt tokens).
    first = smollm2.completions.create(
        model="smollm2",
        prompt=prompt,
        max_tokens=148,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    boundary = len(first.choices[0].text)
    assert whole.text.startswith(first.choices[0].text)
    # The shortest string across the boundary (4 characters after it) seen nowhere before.
    start = next(
        i for i in range(boundary - 4, 0, -1) if whole.text.find(whole.text[i : boundary + 4]) == i
    )
    stop = whole.text[start : boundary + 4]
    completing = next(
        k for k in range(149, length) if stop in tokenizer.decode(whole.token_ids[:k])
    )
    for included in (False, True):
        out = _online(
            smollm2,
            prompt,
            settings,
            length,
            model="smollm2",
            stop=[stop],
            include_stop_str_in_output=included,
        ).choices[0]
        assert out.finish_reason == "stop"
        assert out.stop_reason == stop
        assert out.text == whole.text[: boundary + 4 if included else start]
        assert out.token_ids == whole.token_ids[:completing]


def test_text_read_through_three_compactions_keeps_its_likelihood(smollm2_server, smollm2_dir):
    ids = _article_then_answers(AutoTokenizer.from_pretrained(smollm2_dir), 1216, 300)
    settings = {"compact_threshold": 512, "keep_fraction": 0.2, "keep_last": 64}
    # Stretches of 512, 352, 352 and 300 tokens: 448 tokens become 90 rows (96 slots), then
    # 96 slots + 64 tokens take 352 more before the next compaction, twice.
    online, usage = _prompt_nll(smollm2_server, ids, context_management=settings)
    full, _ = _prompt_nll(smollm2_server, ids)
    assert usage["compactions"] == 3 and usage["prompt_tokens"] == len(ids)
    assert online[0] is None and None not in online[1:]
    # Before the first compaction the two runs read the same context.
    assert max(abs(a - b) for a, b in zip(online[1:512], full[1:512], strict=True)) < 1e-3
    # The continuation, read after three compactions, against the full context and against
    # dropping the compacted tokens (keeping the first 4 tokens and the last 64 as well).
    # Measured: 2.70 nats/token after compactions, 2.47 with the full context, 2.73 dropped.
    # (On the answers' tokens alone: 3.10, 2.16 and 3.11; see docs/limitations.md.)
    dropped, _ = _prompt_nll(smollm2_server, ids[:4] + ids[1216 - 64 :])

    def mean(values):
        return sum(values) / len(values)

    compacted, reference, window = mean(online[1216:]), mean(full[1216:]), mean(dropped[-300:])
    assert compacted - reference < 0.5, (compacted, reference, window)
    assert compacted < window, (compacted, reference, window)
