"""Tenants: keys map to tenants; another tenant's handle is invisible on every route."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.server import TINY as MODEL
from tests.server import served_tiny

pytestmark = pytest.mark.slow
KEYS = {"key-alice": "alice", "key-bob": "bob"}
TEXT = "The Normans were the people who gave their name to Normandy in France. " * 8


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenants")
    keys = folder / "keys.json"
    keys.write_text(json.dumps(KEYS))
    flags = ["--api-keys-file", str(keys), "--enable-prompt-tokens-details"]
    with served_tiny(tiny_llama_dir, folder, *flags) as base:
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
        ("GET", "/v1/compactions/{id}/content", None),
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


def test_each_tenant_lists_only_its_own_handles_a_page_at_a_time(server):
    made = [_compact(server, "key-bob")["id"] for _ in range(3)]
    listed, after = [], None
    while True:
        query = f"?limit=2&after={after}" if after else "?limit=2"
        page = _call(server, "GET", f"/v1/compactions{query}", "key-bob").json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        listed += [item["id"] for item in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert listed == made  # oldest first, and nothing of Alice's
    alices = _call(server, "GET", "/v1/compactions?limit=100", "key-alice").json()["data"]
    assert not {item["id"] for item in alices} & set(made)
    assert _call(server, "GET", "/v1/compactions?limit=0", "key-bob").status_code == 400


def test_an_expired_handle_answers_410_naming_its_expiry(server):
    body = {"model": MODEL, "prompt": TEXT, "ratio": 4, "queries": "context", "ttl_seconds": 1}
    info = _call(server, "POST", "/v1/compact", "key-alice", body).json()
    assert info["expires_at"] == info["created_at"] + 1
    time.sleep(2.1)
    use = {"model": MODEL, "prompt": " so", "max_tokens": 2, "compaction": info["id"]}
    for method, path, payload in (
        ("POST", "/v1/completions", use),
        ("GET", f"/v1/compactions/{info['id']}", None),
    ):
        response = _call(server, method, path, "key-alice", payload)
        assert response.status_code == 410
        assert "expired at" in response.json()["error"]["message"]
    listed = _call(server, "GET", "/v1/compactions?limit=100", "key-alice").json()["data"]
    assert info["id"] not in {item["id"] for item in listed}
