"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions, streaming as server-sent
events, models, health and Prometheus metrics. Every client mistake gets an OpenAI-style JSON
error with a 4xx status that says what to fix; the server keeps serving."""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dflash.decode.sampling import SamplingParams
from dflash.serve import protocol as P
from dflash.serve.scheduler import GenerationRequest, QueueFull, Scheduler


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def create_app(scheduler: Scheduler, model_name: str, *, api_key: str | None = None,
               aliases: tuple[str, ...] = ()) -> FastAPI:
    """The app around a running scheduler. `aliases` are other names the model answers to."""
    app = FastAPI(title="dflash", version="1")
    metrics = scheduler.metrics
    tokenizer = scheduler.tokenizer
    context = scheduler.engine.runtime.info.max_positions
    names = {model_name, *aliases}
    started = int(time.time())

    def fail(status: int, message: str, **kw: Any) -> JSONResponse:
        if metrics is not None:
            metrics.rejected.labels(status=str(status)).inc()
        return JSONResponse(P.error_body(message, **kw), status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return fail(exc.status, exc.message, kind=exc.kind, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            return fail(400, "the request body is not valid JSON: " + str(first.get("msg", "")), code="invalid_json")
        message = f"{where or 'body'}: {first.get('msg', 'invalid value')}"
        if first.get("type") == "missing":
            message = f"missing required field `{where}`"
        return fail(400, message, param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return fail(exc.status_code, str(exc.detail), kind="not_found_error" if exc.status_code == 404 else
                    "invalid_request_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return fail(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                            kind="authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queue_depth": scheduler.depth}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render() if metrics else b"", media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                             "owned_by": "dflash", "max_model_len": context}]}

    def prepare(body: P.SamplingFields, prompt_ids: list[int]) -> GenerationRequest:
        if body.model not in names:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found", kind="not_found_error")
        room = context - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; the model's context holds {context}: "
                           "shorten it", param="messages", code="context_length_exceeded")
        limit = body.token_limit
        if limit is not None and limit > room:
            raise APIError(400, f"max_tokens {limit} does not fit: the prompt has {len(prompt_ids)} tokens and the "
                           f"context holds {context}, so at most {room} can be generated", param="max_tokens",
                           code="context_length_exceeded")
        top_k = 0 if body.top_k == -1 else body.top_k
        return GenerationRequest(prompt_ids, limit or room, SamplingParams(body.temperature, body.top_p, top_k),
                                 body.stop_strings, body.seed)

    def submit(request: GenerationRequest):
        try:
            return scheduler.submit(request)
        except QueueFull as exc:
            raise APIError(503, str(exc), code="server_busy", kind="server_error") from None

    async def collect(handle: Any) -> tuple[str, str, Any]:
        parts, finish, stats = [], "length", None
        try:
            async for d in handle.deltas():
                parts.append(d.text)
                if d.finish is not None:
                    finish, stats = d.finish, d.stats
                    if d.error:
                        raise APIError(500, f"decoding failed: {d.error}", kind="server_error")
        finally:
            handle.cancel()  # a no-op when finished; frees the worker if the client left
        return "".join(parts), finish, stats

    def usage_of(stats: Any, prompt_tokens: int) -> dict[str, Any]:
        return P.usage(prompt_tokens, stats.num_new_tokens if stats else 0,
                       stats.tau if stats and stats.acceptance_lengths else None)

    async def sse(handle: Any, rid: str, chunk: Any, prompt_tokens: int, include_usage: bool,
                  first: dict[str, Any] | None) -> AsyncIterator[str]:
        try:
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            async for d in handle.deltas():
                if d.error:
                    yield f"data: {json.dumps(P.error_body(f'decoding failed: {d.error}', 'server_error'))}\n\n"
                    break
                if d.text:
                    yield f"data: {json.dumps(chunk(d.text, None))}\n\n"
                if d.finish is not None:
                    yield f"data: {json.dumps(chunk('', d.finish if d.finish != 'cancelled' else 'stop'))}\n\n"
                    if include_usage:
                        yield f"data: {json.dumps(chunk(None, None, usage_of(d.stats, prompt_tokens)))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()  # the client disconnected mid-stream: stop decoding for it

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatCompletionRequest) -> Any:
        from dflash.runtime.loader import chat_input_ids

        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        kwargs = body.chat_template_kwargs or {}
        try:
            ids = chat_input_ids(tokenizer, messages, enable_thinking=bool(kwargs.get("enable_thinking", False)))
        except Exception as exc:  # the template refused the conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages")
        request = prepare(body, ids)
        handle = submit(request)
        rid, model = P.new_id("chatcmpl"), body.model
        if body.stream:
            def chunk(text: str | None, finish: str | None, use: dict[str, Any] | None = None) -> dict[str, Any]:
                return P.chat_chunk(rid, model, {"content": text} if text else {}, finish, use)
            first = P.chat_chunk(rid, model, {"role": "assistant", "content": ""})
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(handle, rid, chunk, len(ids), include, first), media_type="text/event-stream")
        text, finish, stats = await collect(handle)
        return P.chat_response(rid, model, text, finish, usage_of(stats, len(ids)))

    @app.post("/v1/completions")
    async def complete(body: P.CompletionRequest) -> Any:
        ids = tokenizer(body.text)["input_ids"]
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        request = prepare(body, ids)
        handle = submit(request)
        rid, model = P.new_id("cmpl"), body.model
        prefix = body.text if body.echo else ""
        if body.stream:
            def chunk(text: str | None, finish: str | None, use: dict[str, Any] | None = None) -> dict[str, Any]:
                return P.completion_chunk(rid, model, text or "", finish, use)
            include = bool(body.stream_options and body.stream_options.include_usage)
            first = P.completion_chunk(rid, model, prefix) if prefix else None
            return StreamingResponse(sse(handle, rid, chunk, len(ids), include, first), media_type="text/event-stream")
        text, finish, stats = await collect(handle)
        return P.completion_response(rid, model, prefix + text, finish, usage_of(stats, len(ids)))

    return app
