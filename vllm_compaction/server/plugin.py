"""`vllm.endpoint_plugins` entry point: the compaction routes on vLLM's OpenAI server.

/v1/completions and /v1/chat/completions are replaced by routes that hand every request
without a `compaction` field to vLLM's own handlers untouched.
"""

from __future__ import annotations

import asyncio
import json
from argparse import Namespace
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from vllm.entrypoints.openai.chat_completion.api_router import create_chat_completion
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.api_router import create_completion
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.utils.api_utils import with_cancellation

from vllm_compaction import portable, store
from vllm_compaction.engine.params import PARAMS_KEY
from vllm_compaction.server import metrics, online
from vllm_compaction.server.errors import CompactionError
from vllm_compaction.server.protocol import (
    Compaction,
    CompactionDeleted,
    CompactionList,
    CompactionProgress,
    CompactRequest,
    ContextManagement,
)
from vllm_compaction.server.registry import HandleRegistry, Limits
from vllm_compaction.server.service import CompactionService
from vllm_compaction.server.tenants import TenantMiddleware

router = APIRouter()

# What the OpenAPI schema says about each route's answers (docs only: handlers return their own
# responses). Every error has OpenAI's shape; "default" covers the statuses not listed (and keeps
# FastAPI from announcing a 422: validation errors are 400s here, as in vLLM).
_OTHER_ERRORS = {
    "model": ErrorResponse,
    "description": "Any other error, in the same shape: 401 when the server has "
    "`--api-keys-file` and the key is missing or unknown, 500 on a server fault.",
}
_NO_HANDLE = {
    "model": ErrorResponse,
    "description": "No such handle for this caller. Another tenant's handle answers exactly "
    "as an id that never existed.",
}
_GONE = {
    "model": ErrorResponse,
    "description": "The caller's handle expired, was evicted by the disk budget, or its files "
    "were lost (altered, or made with other weights); the message says which.",
}
_BINARY = {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}
_BAD_HANDLE_USE = {
    "model": ErrorResponse,
    "description": "Invalid body; or, with `compaction`: a field that re-reads the prompt "
    "(`prompt_logprobs`, `echo`, `truncate_prompt_tokens`, `use_beam_search`), a handle made "
    "for the other route, handle + request longer than the model's context, or "
    "`kv_transfer_params.compaction` set by the caller (reserved).",
}
_HANDLE_REQUEST_ANSWERS = {
    200: {
        "description": "vLLM's own answer (JSON, or server-sent events with `stream`). Without "
        "`stream`, an answer on a handle carries `kv_transfer_params.compaction.blocks`: the KV "
        "blocks the request held.",
        "content": {"text/event-stream": {}},
    },
    400: _BAD_HANDLE_USE,
    404: {"model": ErrorResponse, "description": "Unknown model, or no such handle."},
    410: _GONE,
    "default": _OTHER_ERRORS,
}


def _continues_from_handle(kind: str, route: str) -> dict:
    """openapi_extra that adds our fields to vLLM's request body schema."""
    field = {
        "type": "string",
        "description": f"A handle id from `POST /v1/compact` made from {kind}. The model "
        f"continues from the compacted context followed by this request's {route}. Many "
        "requests can use one handle at once; its KV blocks exist once.",
    }
    management = {
        **ContextManagement.model_json_schema(),
        "description": "`{compact_threshold, keep_fraction = 0.2, keep_last = 64}`: compact "
        "this request's own context whenever its cache (compacted slots in whole KV blocks + "
        "tokens after them) reaches `compact_threshold` tokens, then go on generating: "
        "everything but the last `keep_last` tokens (earlier compacted rows included) becomes "
        "`keep_fraction` as many rows, fitted with those tokens' own queries. "
        "`usage.compactions` counts them. A prompt longer than the threshold (or the model's "
        "context) is read the same way, a stretch at a time; `prompt_logprobs` scores each "
        "stretch as it is read. Settings under which a compaction could not make room are "
        "refused (400). Not with `stream`, `n` > 1, logprobs, `echo`, beam search or tools. "
        "Stop strings and `min_tokens` count over the whole generation, across compactions; "
        "a client that disconnects stops it.",
    }
    schema = {"properties": {"compaction": field, online.PARAM: management}}
    return {"requestBody": {"content": {"application/json": {"schema": schema}}}}


def _error_body(message: str, status: int = 400, param: str | None = None) -> dict[str, Any]:
    kind = {400: "BadRequestError", 404: "NotFoundError", 410: "GoneError"}.get(
        status, HTTPStatus(status).phrase.replace(" ", "") + "Error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _error(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    return JSONResponse(_error_body(message, status, param), status_code=status)


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


@router.post(
    "/v1/compact",
    responses={
        200: {
            "model": Compaction,
            "description": "The new handle. With `stream`: server-sent events, each a JSON "
            "`data:` line: `compaction.progress` events (one before the first chunk, one per "
            "chunk), then the handle (or an `error`), then `[DONE]`.",
            "content": {"text/event-stream": {}},
        },
        400: {
            "model": ErrorResponse,
            "description": "Invalid body, unknown method, an input longer than the model's "
            "context without `chunk_tokens` (with `previous`: after its slots), a chunk that "
            "does not fit after the compacted chunks before it, a budget smaller than the "
            "tokens kept verbatim or than the chunks, or a `previous` handle made from the "
            "other kind of input. A streaming call answers these before its stream begins.",
        },
        404: {
            "model": ErrorResponse,
            "description": "Unknown model, or no such `previous` handle for this caller.",
        },
        410: _GONE,
        "default": _OTHER_ERRORS,
    },
)
async def compact(request: CompactRequest, raw: Request):
    """Read a document or a conversation once, compact its KV cache on the engine's workers and
    store the result as a handle. The handle is on disk before the answer is sent. With
    `previous`, the input continues that handle's context: only the input is read and compacted,
    in the presence of the handle's rows, and the answer is a new handle holding both. An input
    longer than `chunk_tokens` is compacted chunk by chunk the same way."""
    model_error = await raw.app.state.openai_serving_completion._check_model(request)
    if model_error is not None:
        return JSONResponse(model_error.model_dump(), status_code=model_error.error.code)
    service, tenant = _service(raw), raw.state.tenant
    if not request.stream:
        try:
            return await service.compact(request, tenant)
        except CompactionError as error:
            return _refused(error)
    events: asyncio.Queue[CompactionProgress | None] = asyncio.Queue()
    task = asyncio.create_task(service.compact(request, tenant, events.put))
    task.add_done_callback(lambda _: events.put_nowait(None))
    # The first event comes once the input is checked and split: refusals before it keep their
    # status code.
    try:
        first = await events.get()
    except asyncio.CancelledError:  # the client left before the stream began
        task.cancel()
        raise
    if first is None:
        try:
            return task.result()
        except CompactionError as error:
            return _refused(error)
    return StreamingResponse(_compact_events(first, events, task), media_type="text/event-stream")


async def _compact_events(
    first: CompactionProgress,
    events: asyncio.Queue[CompactionProgress | None],
    task: asyncio.Task[Compaction],
) -> AsyncIterator[str]:
    """Server-sent events of a streaming compaction: progress, then the handle or an error."""
    try:
        event: CompactionProgress | None = first
        while event is not None:
            yield f"data: {event.model_dump_json()}\n\n"
            event = await events.get()
        try:
            answer = task.result().model_dump()
        except CompactionError as error:
            answer = _error_body(str(error), error.status, error.param)
        except Exception as error:  # the status line is sent: the failure goes in the stream
            answer = _error_body(f"compaction failed: {error}", 500)
        yield f"data: {json.dumps(answer)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        task.cancel()  # a client gone mid-stream stops the compaction; its rows are dropped


@router.get(
    "/v1/compactions",
    responses={
        200: {"model": CompactionList, "description": "A page of the caller's live handles."},
        404: {"model": ErrorResponse, "description": "`after` names no live handle of the caller."},
        "default": _OTHER_ERRORS,
    },
)
async def list_compactions(
    raw: Request,
    limit: int = Query(default=20, ge=1, le=100, description="Handles per page."),
    after: str | None = Query(default=None, description="Start after this handle id."),
):
    """The caller's live handles, oldest first."""
    try:
        return _service(raw).registry.list(raw.state.tenant, limit, after)
    except CompactionError as error:
        return _refused(error)


@router.get(
    "/v1/compactions/{handle_id}",
    responses={
        200: {"model": Compaction, "description": "The handle, as `/v1/compact` answered it."},
        404: _NO_HANDLE,
        410: _GONE,
        "default": _OTHER_ERRORS,
    },
)
async def get_compaction(handle_id: str, raw: Request):
    """A handle's metadata (its KV stays where it is)."""
    try:
        return _service(raw).registry.owned(handle_id, raw.state.tenant).info
    except CompactionError as error:
        return _refused(error)


@router.delete(
    "/v1/compactions/{handle_id}",
    responses={
        200: {"model": CompactionDeleted, "description": "The handle is deleted."},
        404: _NO_HANDLE,
        410: _GONE,
        "default": _OTHER_ERRORS,
    },
)
async def delete_compaction(handle_id: str, raw: Request):
    """Delete a handle: its files at once, its KV after the last request running on it."""
    try:
        await _service(raw).registry.delete(handle_id, raw.state.tenant)
    except CompactionError as error:
        return _refused(error)
    return CompactionDeleted(id=handle_id)


@router.get(
    "/v1/compactions/{handle_id}/content",
    response_class=Response,
    responses={
        200: {
            "description": "The handle as one safetensors file: every worker's tensors, with the "
            "manifest and a checksum as metadata; sealed (AES-256-GCM) when the server has "
            "`--seal-key-file`.",
            "content": {"application/octet-stream": _BINARY},
        },
        404: _NO_HANDLE,
        410: _GONE,
        "default": _OTHER_ERRORS,
    },
)
async def export_compaction(handle_id: str, raw: Request):
    """Export a handle, for `POST /v1/compactions` on a server with the same model weights and
    worker count."""
    try:
        blob = await _service(raw).registry.export(handle_id, raw.state.tenant)
    except CompactionError as error:
        return _refused(error)
    disposition = f'attachment; filename="{handle_id}.safetensors"'
    return Response(
        blob, media_type="application/octet-stream", headers={"content-disposition": disposition}
    )


@router.post(
    "/v1/compactions",
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/octet-stream": _BINARY}}
    },
    responses={
        200: {
            "model": Compaction,
            "description": "The new handle: a new id, owned by the caller, the same expiry.",
        },
        400: {
            "model": ErrorResponse,
            "description": "Not an export, altered, made with other weights or another worker "
            "count, tensors that do not fit the model, already expired, sealed with another "
            "key (or while this server has none), or not sealed while this server seals.",
        },
        413: {
            "model": ErrorResponse,
            "description": "Larger than the memory or disk budget (refused before it is read "
            "whole).",
        },
        "default": _OTHER_ERRORS,
    },
)
async def import_compaction(raw: Request):
    """Import a blob from `GET /v1/compactions/{id}/content` as a new handle of the caller. The
    body is the blob itself."""
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


@router.post(
    "/v1/completions",
    responses=_HANDLE_REQUEST_ANSWERS,
    openapi_extra=_continues_from_handle("a `prompt`", "`prompt`"),
)
async def completions(request: CompletionRequest, raw: Request):
    """vLLM's completions. With `compaction`, the prompt continues the handle's compacted
    document; without it, the request goes to vLLM's own handler unchanged."""

    async def place(service: CompactionService, handle_id: str, tenant: str) -> None:
        ids, salt, params = await service.completion_prompt(handle_id, request.prompt, tenant)
        request.prompt, request.cache_salt, request.kv_transfer_params = ids, salt, params

    return await _serve(request, raw, "completions", create_completion, place)


@router.post(
    "/v1/chat/completions",
    responses=_HANDLE_REQUEST_ANSWERS,
    openapi_extra=_continues_from_handle("`messages`", "`messages`"),
)
async def chat_completions(request: ChatCompletionRequest, raw: Request):
    """vLLM's chat completions. With `compaction`, `messages` are the turns that follow the
    handle's conversation: the chat template is rendered over both, and the compacted part must
    come out as a prefix. Without it, the request goes to vLLM's own handler unchanged."""

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
    if online.PARAM in (request.model_extra or {}):
        return await _serve_online(request, raw, endpoint)
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


@with_cancellation  # as vLLM's own handlers: a client gone stops the generation
async def _serve_online(request: Any, raw: Request, endpoint: str) -> Response:
    """A request with `context_management`: generated in segments, compacting in between."""
    try:
        settings = ContextManagement.model_validate(request.model_extra[online.PARAM])
    except ValidationError as error:
        return _error(f"invalid {online.PARAM}: {error}", param=online.PARAM)
    if refused := online.unavailable(request):
        names = ", ".join(f"'{name}'" for name in refused)
        return _error(f"{names} not available with '{online.PARAM}'", param=online.PARAM)
    state = raw.app.state
    model_error = await state.openai_serving_completion._check_model(request)
    if model_error is not None:
        return JSONResponse(model_error.model_dump(), status_code=model_error.error.code)
    chat = endpoint == "chat"
    serving = state.openai_serving_chat if chat else state.openai_serving_completion
    service, handle_id = _service(raw), None
    try:
        if "compaction" in request.model_extra:
            handle_id = _handle_field(request)
            service.registry.acquire(handle_id)
            metrics.HANDLE_REQUESTS.labels(endpoint).inc()
        answer = await online.generate(
            service, request, settings, raw.state.tenant, handle_id, serving.default_sampling_params
        )
    except CompactionError as error:
        return _refused(error)
    except ValueError as error:  # sampling parameters the engine refuses, as vLLM answers them
        return _error(str(error))
    finally:
        if handle_id is not None:
            await service.registry.release(handle_id)
    return JSONResponse(answer.model_dump(exclude_none=True))


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
            engine_client,
            state.openai_serving_chat,
            model_config.max_model_len,
            engine_client.vllm_config.cache_config.block_size,
            registry,
        )
