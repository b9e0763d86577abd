"""The compaction parameters a request carries to the engine, signed by our API server.

Any route of vLLM's server (and any caller of the engine) can set a request's
kv_transfer_params, so the engine trusts only parameters signed with a per-deployment secret.
The plugin draws the secret in the first vLLM process to load it; engine and worker processes
inherit it through the environment. Unsigned or forged parameters make a plain request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from typing import Any

PARAMS_KEY = "compaction"
SECRET_ENV = "VLLM_COMPACTION_ENGINE_SECRET"
_SIGNATURE = "signature"


def ensure_secret() -> None:
    """Draw the secret unless this process inherited one (called by the plugin)."""
    os.environ.setdefault(SECRET_ENV, secrets.token_hex(32))


def _digest(params: dict[str, Any], secret: str) -> str:
    message = json.dumps(params, sort_keys=True, separators=(",", ":"), default=repr).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _secret() -> str:
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        raise RuntimeError("the vllm-compaction plugin is not loaded in this process")
    return secret


def private_salt(name: str) -> str:
    """A cache salt no caller can reproduce: callers choose their own salts on most routes."""
    return hmac.new(_secret().encode(), f"salt:{name}".encode(), hashlib.sha256).hexdigest()


def signed(params: dict[str, Any]) -> dict[str, Any]:
    """kv_transfer_params that make the engine treat a request as `params` say."""
    return {PARAMS_KEY: {**params, _SIGNATURE: _digest(params, _secret())}}


def request_params(sampling_params: Any) -> dict[str, Any] | None:
    """A request's verified compaction parameters, or None for a plain request."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    transfer = extra.get("kv_transfer_params")
    params = transfer.get(PARAMS_KEY) if isinstance(transfer, dict) else None
    secret = os.environ.get(SECRET_ENV)
    if not isinstance(params, dict) or not secret:
        return None
    claimed = params.get(_SIGNATURE)
    body = {k: v for k, v in params.items() if k != _SIGNATURE}
    if not isinstance(claimed, str) or not hmac.compare_digest(claimed, _digest(body, secret)):
        return None
    return body
