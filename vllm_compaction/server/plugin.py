"""`vllm.endpoint_plugins` entry point: the compaction routes on vLLM's OpenAI server.

/v1/completions and /v1/chat/completions are replaced by routes that hand every request
without a `compaction` field to vLLM's own handlers untouched.
"""

from __future__ import annotations

import json
from argparse import Namespace
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from vllm.entrypoints.openai.chat_completion.api_router import create_chat_completion
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.api_router import create_completion
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from vllm_compaction import portable, store
from vllm_compaction.engine.params import PARAMS_KEY
from vllm_compaction.server import metrics
from vllm_compaction.server.errors import CompactionError
from vllm_compaction.server.protocol import CompactionDeleted, CompactRequest
from vllm_compaction.server.registry import HandleRegistry, Limits
from vllm_compaction.server.service import CompactionService
from vllm_compaction.server.tenants import TenantMiddleware

router = APIRouter()


def _error(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError", 410: "GoneError"}.get(
        status, HTTPStatus(status).phrase.replace(" ", "") + "Error"
    )
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


async def _framework_error(raw: Request, error: HTTPException) -> Response:
    """Refusals raised before any handler runs (a body that does not parse, a path no route
    matches): OpenAI's shape on our routes, the framework's own answer everywhere else."""
    if raw.url.path.startswith("/v1/compact"):
        return _error(str(error.detail), error.status_code)
    return await http_exception_handler(raw, error)


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
        return _service(raw).registry.list(raw.state.tenant, limit, after)
    except CompactionError as error:
        return _refused(error)


@router.get("/v1/compactions/{handle_id}")
async def get_compaction(handle_id: str, raw: Request):
    try:
        return _service(raw).registry.owned(handle_id, raw.state.tenant).info
    except CompactionError as error:
        return _refused(error)


@router.delete("/v1/compactions/{handle_id}")
async def delete_compaction(handle_id: str, raw: Request):
    try:
        await _service(raw).registry.delete(handle_id, raw.state.tenant)
    except CompactionError as error:
        return _refused(error)
    return CompactionDeleted(id=handle_id)


@router.get("/v1/compactions/{handle_id}/content")
async def export_compaction(handle_id: str, raw: Request):
    try:
        blob = await _service(raw).registry.export(handle_id, raw.state.tenant)
    except CompactionError as error:
        return _refused(error)
    disposition = f'attachment; filename="{handle_id}.safetensors"'
    return Response(
        blob, media_type="application/octet-stream", headers={"content-disposition": disposition}
    )


@router.post("/v1/compactions")
async def import_compaction(raw: Request):
    """Body: a blob from GET /v1/compactions/{id}/content; answers the new handle."""
    registry = _service(raw).registry
    # A handle larger than either budget could never be held: refuse before buffering it.
    largest = min(registry.limits.memory_bytes, registry.limits.disk_bytes)
    blob = bytearray()
    async for chunk in raw.stream():
        blob += chunk
        if len(blob) > largest:
            return _error(f"the blob is larger than the handle budgets ({largest} bytes)", 413)
    try:
        return await registry.import_blob(bytes(blob), raw.state.tenant)
    except CompactionError as error:
        return _refused(error)


@router.post("/v1/completions")
async def completions(request: CompletionRequest, raw: Request):
    async def place(service: CompactionService, handle_id: str, tenant: str) -> None:
        ids, salt, params = await service.completion_prompt(handle_id, request.prompt, tenant)
        request.prompt, request.cache_salt, request.kv_transfer_params = ids, salt, params

    return await _serve(request, raw, "completions", create_completion, place)


@router.post("/v1/chat/completions")
async def chat_completions(request: ChatCompletionRequest, raw: Request):
    async def place(service: CompactionService, handle_id: str, tenant: str) -> None:
        ids, salt, params = await service.chat_prompt(handle_id, request, tenant)
        # vLLM feeds kv_transfer_params["prompt_token_ids"] to the engine instead of templating.
        request.kv_transfer_params = {**params, "prompt_token_ids": ids}
        request.cache_salt = salt

    return await _serve(request, raw, "chat", create_chat_completion, place)


async def _serve(request: Any, raw: Request, endpoint: str, stock: Callable, place: Callable):
    """Hand a request to vLLM's own handler, on its handle's compacted context if it names one."""
    # Only this plugin may address the engine's compaction machinery.
    if PARAMS_KEY in (request.kv_transfer_params or {}):
        return _error(f"kv_transfer_params.{PARAMS_KEY} is reserved", param="kv_transfer_params")
    if "compaction" not in (request.model_extra or {}):
        if request.cache_salt is not None:  # a caller's salt can never equal a handle's
            request.cache_salt = f"user:{raw.state.tenant}:{request.cache_salt}"
        return await stock(request, raw)
    # These re-read, cut or re-submit the prompt: they would reach the placeholder slots.
    unavailable = {
        "prompt_logprobs": request.prompt_logprobs is not None,
        "echo": getattr(request, "echo", False),
        "truncate_prompt_tokens": request.truncate_prompt_tokens is not None,
        "use_beam_search": request.use_beam_search,
    }
    if any(unavailable.values()):
        names = ", ".join(f"'{name}'" for name, used in unavailable.items() if used)
        return _error(f"{names} not available with 'compaction'", param="compaction")
    try:
        handle_id = _handle_field(request)
    except CompactionError as error:
        return _refused(error)
    service = _service(raw)
    # Held from before its KV is placed until the response ends: never spilled or freed between.
    service.registry.acquire(handle_id)
    try:
        await place(service, handle_id, raw.state.tenant)
    except BaseException as error:
        await service.registry.release(handle_id)
        if isinstance(error, CompactionError):
            return _refused(error)
        raise
    metrics.HANDLE_REQUESTS.labels(endpoint).inc()
    return await _holding(service.registry, handle_id, stock(request, raw))


async def _holding(registry: HandleRegistry, handle_id: str, call: Awaitable[Response]):
    """Run a stock handler on a held handle; release it when its response (or stream) ends."""
    try:
        response = await call
    except BaseException:
        await registry.release(handle_id)
        raise
    if not isinstance(response, StreamingResponse):
        await registry.release(handle_id)
        return response
    body = response.body_iterator

    async def held() -> AsyncIterator:
        try:
            async for chunk in body:
                yield chunk
        finally:
            await registry.release(handle_id)

    response.body_iterator = held()
    return response


def _handle_field(request: Any) -> str:
    """The `compaction` body field (vLLM keeps unknown fields in model_extra)."""
    value = request.model_extra["compaction"]
    if not isinstance(value, str):
        raise CompactionError("'compaction' must be a handle id string", param="compaction")
    return value


def _model_facts(model_config: Any) -> dict[str, Any]:
    """What a stored handle's tensors depend on, written into its manifest for people to read
    (loading checks the weights' fingerprint and the tensors themselves)."""
    text = model_config.hf_text_config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    return {
        "model": model_config.served_model_name,
        "layers": text.num_hidden_layers,
        "kv_heads": model_config.get_total_num_kv_heads(),
        "head_dim": model_config.get_head_size(),
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "rope": json.loads(json.dumps(rope, default=str)),
    }


class CompactionEndpoints:
    name = "compaction"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        app.add_middleware(TenantMiddleware)
        # vLLM shapes FastAPI's HTTPException; these are Starlette's own (its base class).
        app.add_exception_handler(HTTPException, _framework_error)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        if engine_client is None:
            return
        workers = await engine_client.collective_rpc("compaction_bind")
        model_config = engine_client.model_config
        registry = HandleRegistry(
            engine_client,
            store.handles_dir(),
            store.model_fingerprint(model_config.model),
            Limits.from_env(),
            workers=len(workers),
            seal_key=portable.seal_key(),
            model_facts=_model_facts(model_config),
        )
        state.compaction = CompactionService(
            engine_client, state.openai_serving_chat, model_config.max_model_len, registry
        )
