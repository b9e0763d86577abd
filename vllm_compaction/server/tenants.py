"""Tenants: API keys map to tenant names; every handle belongs to the tenant that made it.

`vllm-compaction serve --api-keys-file keys.json` ({"<key>": "<tenant>", ...}) turns on
per-tenant keys; the server process reads the file named by VLLM_COMPACTION_API_KEYS_FILE.
Without it there is one tenant, "default" (vLLM's own --api-key still guards the server).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

KEYS_FILE_ENV = "VLLM_COMPACTION_API_KEYS_FILE"
DEFAULT_TENANT = "default"
GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")  # as vLLM's own key check


def read_keys(path: Path) -> dict[str, str]:
    """The key -> tenant map of a keys file; ValueError with a clear message if malformed."""
    try:
        keys = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read API keys file {path}: {error}") from error
    valid = isinstance(keys, dict) and all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in keys.items()
    )
    if not valid or not keys:
        raise ValueError(f"{path} must be a non-empty JSON object of API key -> tenant name")
    return keys


class TenantMiddleware:
    """Answers 401 without a known key and records the caller's tenant in the request state."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        path = os.environ.get(KEYS_FILE_ENV)
        keys = read_keys(Path(path)) if path else {}
        # Compare digests in constant time, as vLLM does for its key.
        self.tenants = {hashlib.sha256(k.encode()).digest(): t for k, t in keys.items()}

    def tenant(self, headers: Headers) -> str | None:
        if not self.tenants:
            return DEFAULT_TENANT
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, name in self.tenants.items():
            if secrets.compare_digest(digest, known):
                found = name
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        tenant = self.tenant(Headers(scope=scope))
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if tenant is None and path.startswith(GUARDED_PREFIX):
            error = {
                "message": "a valid API key is required",
                "type": "AuthenticationError",
                "param": None,
                "code": 401,
            }
            return await JSONResponse({"error": error}, status_code=401)(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = tenant or DEFAULT_TENANT
        return await self.app(scope, receive, send)
