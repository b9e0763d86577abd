"""`vllm.endpoint_plugins` entry point: the compaction routes on vLLM's OpenAI server.

/v1/completions and /v1/chat/completions are replaced by routes that hand every request
without a `compaction` field to vLLM's own handlers untouched.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from vllm.entrypoints.openai.chat_completion.api_router import create_chat_completion
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.api_router import create_completion
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from vllm_compaction import store
from vllm_compaction.server import metrics
from vllm_compaction.server.protocol import CompactionDeleted, CompactRequest
from vllm_compaction.server.service import CompactionError, CompactionService
from vllm_compaction.server.tenants import TenantMiddleware

router = APIRouter()


def _error(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError", 410: "GoneError"}.get(
        status, "InternalServerError"
    )
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def _refused(error: CompactionError) -> JSONResponse:
    return _error(str(error), error.status, error.param)


def _service(raw: Request) -> CompactionService:
    return raw.app.state.compaction


@router.post("/v1/compact")
async def compact(request: CompactRequest, raw: Request):
    model_error = await raw.app.state.openai_serving_completion._check_model(request)
    if model_error is not None:
        return JSONResponse(model_error.model_dump(), status_code=model_error.error.code)
    try:
        return await _service(raw).compact(request, raw.state.tenant)
    except CompactionError as error:
        return _refused(error)


@router.get("/v1/compactions")
async def list_compactions(
    raw: Request, limit: int = Query(default=20, ge=1, le=100), after: str | None = None
):
    try:
        return _service(raw).list_handles(raw.state.tenant, limit, after)
    except CompactionError as error:
        return _refused(error)


@router.get("/v1/compactions/{handle_id}")
async def get_compaction(handle_id: str, raw: Request):
    try:
        return (await _service(raw).get(handle_id, raw.state.tenant)).info
    except CompactionError as error:
        return _refused(error)


@router.delete("/v1/compactions/{handle_id}")
async def delete_compaction(handle_id: str, raw: Request):
    try:
        await _service(raw).delete(handle_id, raw.state.tenant)
    except CompactionError as error:
        return _refused(error)
    return CompactionDeleted(id=handle_id)


@router.post("/v1/completions")
async def completions(request: CompletionRequest, raw: Request):
    if "compaction" not in (request.model_extra or {}):
        _own_salt(request, raw)
        return await create_completion(request, raw)
    # Prompt logprobs make vLLM skip cached and injected KV: they would read placeholders.
    if request.prompt_logprobs is not None or request.echo:
        return _error("'prompt_logprobs' and 'echo' are not available with 'compaction'")
    try:
        handle_id = _handle_field(request)
        ids, salt, params = await _service(raw).completion_prompt(
            handle_id, request.prompt, raw.state.tenant
        )
    except CompactionError as error:
        return _refused(error)
    request.prompt = ids
    request.cache_salt = salt
    request.kv_transfer_params = params
    metrics.HANDLE_REQUESTS.labels("completions").inc()
    return await _holding(_service(raw), handle_id, create_completion(request, raw))


@router.post("/v1/chat/completions")
async def chat_completions(request: ChatCompletionRequest, raw: Request):
    if "compaction" not in (request.model_extra or {}):
        _own_salt(request, raw)
        return await create_chat_completion(request, raw)
    if request.prompt_logprobs is not None or request.echo:
        return _error("'prompt_logprobs' and 'echo' are not available with 'compaction'")
    try:
        handle_id = _handle_field(request)
        ids, salt, params = await _service(raw).chat_prompt(handle_id, request, raw.state.tenant)
    except CompactionError as error:
        return _refused(error)
    # vLLM feeds kv_transfer_params["prompt_token_ids"] to the engine instead of re-templating.
    request.kv_transfer_params = {**params, "prompt_token_ids": ids}
    request.cache_salt = salt
    metrics.HANDLE_REQUESTS.labels("chat").inc()
    return await _holding(_service(raw), handle_id, create_chat_completion(request, raw))


async def _holding(service: CompactionService, handle_id: str, call: Awaitable[Response]):
    """Run a stock handler while the handle is held, until its response (or stream) ends."""
    service.acquire(handle_id)
    try:
        response = await call
    except BaseException:
        await service.release(handle_id)
        raise
    if not isinstance(response, StreamingResponse):
        await service.release(handle_id)
        return response
    body = response.body_iterator

    async def held() -> AsyncIterator:
        try:
            async for chunk in body:
                yield chunk
        finally:
            await service.release(handle_id)

    response.body_iterator = held()
    return response


def _own_salt(request: Any, raw: Request) -> None:
    """Namespace a caller's cache_salt by tenant: it can never equal a handle's salt."""
    if request.cache_salt is not None:
        request.cache_salt = f"user:{raw.state.tenant}:{request.cache_salt}"


def _handle_field(request: Any) -> str:
    """The `compaction` body field (vLLM keeps unknown fields in model_extra)."""
    value = request.model_extra["compaction"]
    if not isinstance(value, str):
        raise CompactionError("'compaction' must be a handle id string", param="compaction")
    return value


class CompactionEndpoints:
    name = "compaction"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        app.add_middleware(TenantMiddleware)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        if engine_client is None:
            return
        await engine_client.collective_rpc("compaction_bind")
        model_config = engine_client.model_config
        state.compaction = CompactionService(
            engine_client,
            state.openai_serving_chat,
            model_config.max_model_len,
            store_root=store.handles_dir(),
            fingerprint=store.model_fingerprint(model_config.model),
        )
