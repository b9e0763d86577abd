"""Property-based fuzz of the compaction routes over real HTTP: no 5xx, OpenAI-shaped 4xx.

Schemathesis draws requests, valid and invalid, from the /openapi.json the served engine
publishes, narrowed to our routes and to short requests so that a CI run stays well under
three minutes. Generated requests name live handles as well as ids that name nothing.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.server import TINY as MODEL
from tests.server import served_tiny
from vllm_compaction.core import METHODS

pytestmark = pytest.mark.slow
MAX_TOKENS = 4
# Test order: DELETE comes last so that the live handles serve the other routes first.
OPERATIONS = [
    ("POST", "/v1/compact"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/compactions"),
    ("GET", "/v1/compactions/{handle_id}"),
    ("GET", "/v1/compactions/{handle_id}/content"),
    ("DELETE", "/v1/compactions/{handle_id}"),
]
HANDLE_ROUTES = ("/v1/completions", "/v1/chat/completions")  # take a `compaction` field
# Ids that name nothing, or try to name files beside the handles.
GARBAGE_IDS = ["cmp_unknown", "cmp_..", "cmp_" + "x" * 300]
# vLLM's fields kept as published: worth mixing with a handle. The rest (tools, structured
# outputs, multimodal) exercise vLLM alone and cost time.
PUBLISHED_FIELDS = {
    "temperature",
    "stop",
    "stream",
    "logprobs",
    "echo",
    "suffix",
    "add_special_tokens",
    "add_generation_prompt",
    "return_token_ids",
}
EXAMPLES = 200  # per route and method: ~30 s of requests beside a ~40 s server start


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("server")
    with served_tiny(tiny_llama_dir, folder, "--max-num-batched-tokens", "128") as base:
        yield base


@pytest.fixture(scope="module")
def handles(server: str) -> list[str]:
    """A live prompt-made handle and a live messages-made one, for generated requests to name."""
    bodies = [
        {"prompt": "The quick brown fox jumps over the lazy dog. " * 4, "ratio": 4},
        {"messages": [{"role": "user", "content": "Remember these words: red, blue."}], "ratio": 2},
    ]
    ids = []
    for body in bodies:
        response = httpx.post(f"{server}/v1/compact", json={"model": MODEL, **body}, timeout=120)
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    return ids


@pytest.fixture(scope="module")
def api(server: str, handles: list[str], tiny_llama_dir: Path) -> schemathesis.BaseSchema:
    published = httpx.get(f"{server}/openapi.json", timeout=30).json()
    vocab = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    spec = _narrowed(published, handles, vocab)
    # An explicit config (no schemathesis.toml found on the machine changes the run), and
    # failure reports show requests whole: sanitising would hide fields named like "*token*".
    output = {"sanitization": {"enabled": False}, "truncation": {"enabled": False}}
    config = schemathesis.Config.from_dict({"output": output})
    return schemathesis.openapi.from_dict(spec, config=config)


def _narrowed(published: dict[str, Any], handles: list[str], vocab: int) -> dict[str, Any]:
    """Our routes of the published schema, bounded to short requests on the served model.

    Valid values are narrowed to ones that reach deep (the served model, known methods, token
    ids in the vocabulary, live handles); negative generation still sends everything else.
    """
    spec = copy.deepcopy(published)
    spec["paths"] = {path: spec["paths"][path] for _, path in OPERATIONS}
    schemas = spec["components"]["schemas"]
    model = {"enum": [MODEL]}
    handle_id = {"enum": [*handles, *GARBAGE_IDS]}
    text = {"type": "string", "minLength": 1, "maxLength": 48}
    token = {"type": "integer", "minimum": 0, "maximum": vocab - 1}
    token_ids = {"type": "array", "items": token, "minItems": 1, "maxItems": 12}
    message = {
        "type": "object",
        "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": text},
        "required": ["role", "content"],
    }
    messages = {"type": "array", "items": message, "minItems": 1, "maxItems": 3}
    small = {"type": "integer", "minimum": 0, "maximum": 8}

    # The published schema cannot say "exactly one of prompt and messages, at most one of ratio
    # and target_tokens": one variant per choice.
    fields = schemas["CompactRequest"]["properties"]
    fields.update(
        model=model,
        method={"enum": list(METHODS)},
        ratio={"type": "number", "minimum": 1, "maximum": 16},
        target_tokens={**small, "minimum": 1},
        keep_first={"type": "integer", "minimum": 0, "maximum": 4},
        previous={"anyOf": [handle_id, {"type": "null"}]},  # extensions of live handles too
    )
    # Long enough inputs that a budget can hold the tokens kept verbatim.
    document = {"type": "string", "minLength": 16, "maxLength": 160}
    inputs = {
        "prompt": {"anyOf": [document, {**token_ids, "minItems": 8, "maxItems": 64}]},
        "messages": messages,
    }
    variants = []
    for source, size in itertools.product(inputs, ("ratio", "target_tokens")):
        dropped = {"prompt", "messages", "ratio", "target_tokens"} - {source, size}
        properties = {k: v for k, v in fields.items() if k not in dropped}
        properties[source] = inputs[source]
        variants.append(
            {
                "type": "object",
                "properties": properties,
                "required": ["model", source],
                "additionalProperties": False,
            }
        )
    schemas["CompactRequest"] = {"anyOf": variants}

    bounded = {
        "model": model,
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS},
        "cache_salt": {"type": "string", "pattern": "^[a-z0-9]{1,16}$"},
        "truncate_prompt_tokens": {
            "anyOf": [{"type": "integer", "minimum": -1, "maximum": 16}, {"type": "null"}]
        },
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**31},
        "allowed_token_ids": token_ids,
        "logit_bias": {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]{1,3}$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        },
        "compaction": handle_id,
        # Our reserved key, forged, beside free-form parameters.
        "kv_transfer_params": {
            "anyOf": [
                {"type": "object", "properties": {"compaction": {}}, "required": ["compaction"]},
                {"type": "object"},
                {"type": "null"},
            ]
        },
    }
    prompts = {
        "anyOf": [text, token_ids, {"type": "array", "items": text, "minItems": 1, "maxItems": 2}]
    }
    for name, inputs, logprobs in (
        ("CompletionRequest", {"prompt": prompts}, {"logprobs": small}),
        ("ChatCompletionRequest", {"messages": messages}, {"top_logprobs": small}),
    ):
        published_fields = schemas[name]["properties"]
        fields = {k: v for k, v in published_fields.items() if k in PUBLISHED_FIELDS}
        fields.update(bounded, **logprobs, **inputs)
        # Generation seldom adds optional fields: those that change how a handle's prompt is
        # placed or answered are always there (possibly null).
        required = ["model", *inputs, "stream", "truncate_prompt_tokens"]
        schemas[name] = {"type": "object", "properties": fields, "required": required}

    for path in ("/v1/compactions/{handle_id}", "/v1/compactions/{handle_id}/content"):
        for operation in spec["paths"][path].values():
            operation["parameters"][0]["schema"] = handle_id
    for parameter in spec["paths"]["/v1/compactions"]["get"]["parameters"]:
        if parameter["name"] == "after":
            parameter["schema"] = handle_id
    return spec


# Schemathesis' own pytest wiring (`from_fixture`) fails on pytest 9 (it sets the removed
# `Node._nodeid`): its strategies drive a plain Hypothesis test instead.
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_route_answers_without_server_errors(
    api: schemathesis.BaseSchema, server: str, handles: list[str], method: str, path: str
) -> None:
    operation = api[path][method]
    cases = st.one_of(operation.as_strategy(mode) for mode in GenerationMode)
    # Generation seldom adds an optional field: a third of the requests name a live handle here,
    # a third an id that names nothing.
    names = st.one_of(st.none(), st.sampled_from(handles), st.sampled_from(GARBAGE_IDS))

    # No shrinking: the server keeps state (handles made and deleted), so a shrunk replay is not
    # the sequence that failed; the first failing request is reported as it was sent.
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(cases, names)
    def fuzz(case: schemathesis.Case, handle: str | None) -> None:
        if path in HANDLE_ROUTES and isinstance(case.body, dict) and handle is not None:
            case.body.setdefault("compaction", handle)
        _check(case, server)

    fuzz()


def _check(case: schemathesis.Case, server: str) -> None:
    """No 5xx, OpenAI's error shape on every 4xx, and no server error inside a stream."""
    if case.path != "/v1/compact" and isinstance(case.body, dict):
        _cap_tokens(case.body)
    response = case.call(base_url=server, timeout=120)
    assert response.status_code < 500, _shown(case, response)
    # vLLM's own routes answer a body that is not JSON as stock FastAPI does ({"detail"}).
    ours = case.path.startswith("/v1/compact") or isinstance(case.body, dict)
    if response.status_code >= 400 and ours:
        error = _error_of(response)
        assert isinstance(error, dict), _shown(case, response)
        assert set(error) >= {"message", "type", "param", "code"}, _shown(case, response)
    for event in _stream_events(response):
        code = event.get("error", {}).get("code") if isinstance(event, dict) else None
        assert not (isinstance(code, int) and code >= 500), _shown(case, response)


def _shown(case: schemathesis.Case, response: schemathesis.Response) -> str:
    """The request as sent (curl, and the exact bytes of a body that is not JSON), the answer."""
    raw = f"\n  raw body: {case.body!r}" if isinstance(case.body, bytes) else ""
    return f"{case.as_curl_command()}{raw}\n-> {response.status_code} {response.text}"


def _error_of(response: schemathesis.Response) -> Any:
    try:
        return json.loads(response.content).get("error")
    except (ValueError, AttributeError):
        return None


def _cap_tokens(body: dict[str, Any]) -> None:
    """A missing or large max_tokens would generate up to the whole context: keep runs short."""
    value = body.get("max_tokens")
    if value is None or (isinstance(value, int | float) and value > MAX_TOKENS):
        body["max_tokens"] = MAX_TOKENS


def _stream_events(response: schemathesis.Response) -> list[Any]:
    """The JSON events of a streamed answer: vLLM reports failures mid-stream as error events."""
    if "text/event-stream" not in "".join(response.headers.get("content-type", [])):
        return []
    lines = response.content.decode(errors="replace").splitlines()
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return [json.loads(item) for item in data if item != "[DONE]"]


def test_server_still_serves_after_the_fuzz(server: str) -> None:
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    response = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"


# Bugs the fuzz found, as plain cases. They run last: the truncation one stops the engine
# until it is fixed.


@pytest.mark.parametrize(
    ("method", "path", "content"),
    [
        ("POST", "/v1/compact", b"\xff"),
        ("POST", "/v1/compactions", b"\xff"),
        ("GET", "/v1/compactions/cmp_a%2Fb", None),
    ],
)
def test_refusals_before_our_handlers_have_openai_shape(
    server: str, method: str, path: str, content: bytes | None
) -> None:
    """Starlette itself refuses a body that is not UTF-8 (found by the fuzz) and an id with an
    encoded slash (found beside it): on our routes in OpenAI's shape too."""
    headers = {"content-type": "application/json"}
    response = httpx.request(method, f"{server}{path}", content=content, headers=headers)
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json().get("error") or {}) >= {"message", "type", "param", "code"}, (
        response.text
    )


def test_fields_that_reach_a_handles_slots_are_refused(server: str) -> None:
    """Found by the fuzz: truncate_prompt_tokens cut the handle's placeholder slots off the
    prompt and vLLM's scheduler failed `assert num_computed_tokens <= request.num_tokens`,
    killing the engine. Beam search re-submits prompts without the handle."""
    document = {"model": MODEL, "prompt": "The quick brown fox jumps over the lazy dog. " * 2}
    made = httpx.post(f"{server}/v1/compact", json={**document, "ratio": 4}, timeout=120)
    assert made.status_code == 200, made.text
    body = {"model": MODEL, "prompt": "Then", "max_tokens": 1, "compaction": made.json()["id"]}
    for field in ({"truncate_prompt_tokens": 2}, {"use_beam_search": True, "n": 1}):
        response = httpx.post(f"{server}/v1/completions", json={**body, **field}, timeout=60)
        assert response.status_code == 400, response.text
        assert f"'{next(iter(field))}' not available" in response.json()["error"]["message"]
    assert httpx.post(f"{server}/v1/completions", json=body, timeout=60).status_code == 200
