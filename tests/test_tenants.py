"""Tenants: keys map to tenants; another tenant's handle is invisible on every route."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server import served

pytestmark = pytest.mark.slow
MODEL = "tiny"
KEYS = {"key-alice": "alice", "key-bob": "bob"}
TEXT = "The Normans were the people who gave their name to Normandy in France. " * 8


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenants")
    keys = folder / "keys.json"
    keys.write_text(json.dumps(KEYS))
    args = [str(tiny_llama_dir), "--served-model-name", MODEL, "--dtype", "float32"]
    args += ["--block-size", "32", "--api-keys-file", str(keys), "--enable-prompt-tokens-details"]
    env = {"VLLM_COMPACTION_HANDLES_DIR": str(folder / "handles")}
    with served(args, folder / "server.log", env=env) as base:
        yield base


def _call(server: str, method: str, path: str, key: str | None, body: dict | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{server}{path}", json=body, headers=headers, timeout=120)


def _compact(server: str, key: str) -> dict:
    body = {"model": MODEL, "prompt": TEXT, "ratio": 4, "queries": "context"}
    response = _call(server, "POST", "/v1/compact", key, body)
    assert response.status_code == 200, response.text
    return response.json()


def test_requests_without_a_valid_key_get_401(server):
    completion = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    for key in (None, "key-mallory"):
        assert _call(server, "POST", "/v1/completions", key, completion).status_code == 401
        compact = _call(server, "POST", "/v1/compact", key, {"model": MODEL, "prompt": TEXT})
        assert compact.status_code == 401
        assert compact.json()["error"]["code"] == 401
    assert httpx.get(f"{server}/health").status_code == 200
    assert _call(server, "POST", "/v1/completions", "key-bob", completion).status_code == 200


def test_another_tenants_handle_is_answered_as_unknown(server):
    handle = _compact(server, "key-alice")["id"]
    never = "cmp_" + "x" * (len(handle) - 4)
    use = {"model": MODEL, "prompt": " so", "max_tokens": 2}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    routes = [
        ("GET", "/v1/compactions/{id}", None),
        ("DELETE", "/v1/compactions/{id}", None),
        ("POST", "/v1/completions", use),
        ("POST", "/v1/chat/completions", chat),
    ]
    for method, path, body in routes:
        answers = []
        for handle_id in (handle, never):
            payload = {**body, "compaction": handle_id} if body else None
            response = _call(server, method, path.format(id=handle_id), "key-bob", payload)
            assert response.status_code == 404, (method, path, response.text)
            answers.append(response.json()["error"]["message"].replace(handle_id, "ID"))
        assert answers[0] == answers[1]

    # Alice still has it: Bob's delete did nothing.
    mine = _call(server, "GET", f"/v1/compactions/{handle}", "key-alice")
    assert mine.status_code == 200
    assert _call(server, "POST", "/v1/completions", "key-alice", {**use, "compaction": handle})


def test_a_tenant_cannot_reach_another_tenants_blocks_by_salt(server):
    info = _compact(server, "key-alice")
    use = {"model": MODEL, "prompt": " so", "max_tokens": 2, "compaction": info["id"]}
    first = _call(server, "POST", "/v1/completions", "key-alice", use).json()
    blocks = first["kv_transfer_params"]["compaction"]["blocks"]
    slots = 32 * -(-info["compacted_tokens"] // 32)
    # Bob replays the placeholders under the salt Alice's blocks are cached with.
    attack = {
        "model": MODEL,
        "prompt": [0] * slots + [5, 6, 7],
        "max_tokens": 1,
        "cache_salt": f"compaction:alice:{info['id']}",
    }
    stolen = _call(server, "POST", "/v1/completions", "key-bob", attack).json()
    assert stolen["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # The same replay by Alice herself does not hit them either: salts given by callers are
    # kept apart from handle salts.
    again = _call(server, "POST", "/v1/completions", "key-alice", attack).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert len(blocks) >= slots // 32
    # Positive control: the blocks are in the prefix cache for Alice's handle requests.
    hit = _call(server, "POST", "/v1/completions", "key-alice", use).json()
    assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] >= slots
