"""Routes, server-sent events, auth and errors of the OpenAI-compatible server.

A thin skin over Engine + Scheduler: requests become token ids and SamplingParams, the worker thread
generates, and events cross back to the event loop through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from ..errors import MoeOffloadError
from ..generate import Completion, TokenEvent
from ..sampling import SamplingParams
from ..scheduler import Job, QueueFull, Scheduler
from .page import install_page
from .protocol import ChatCompletionRequest, CompletionRequest

DEFAULT_MAX_TOKENS = 512


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_queue: int = 64) -> FastAPI:
    scheduler = Scheduler(engine, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        scheduler.close()

    app = FastAPI(title="moe-offload", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.code, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param or 'body'}: {first['msg']}", "invalid_request_error", param=param),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), api_key.encode()):  # constant time
                return JSONResponse(error_body("missing or wrong API key", "authentication_error", "invalid_api_key"),
                                    status_code=401)
        return await call_next(request)

    install_page(app, engine, scheduler, api_key_required=bool(api_key))  # GET /, /static, /v1/experts

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        m = scheduler.metrics
        stats = engine.cache_stats.summary() if engine.cache_stats is not None else {}
        return {"requests": m.requests, "completed": m.completed, "cancelled": m.cancelled,
                "queue_depth": scheduler.depth, "prompt_tokens": m.prompt_tokens,
                "completion_tokens": m.completion_tokens, "last_decode_tok_s": m.last_decode_tok_s,
                "last_prefill_tok_s": m.last_prefill_tok_s, "cache_hit_rate": stats.get("hit_rate", 1.0),
                "prefetch_recall": stats.get("prefetch_recall", 0.0), "uptime_s": time.time() - m.started}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "moe-offload"}]}

    def prepare(req, prompt_ids: list[int]) -> SamplingParams:
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                           code="model_not_found", param="model")
        limit = engine.max_context - len(prompt_ids)
        if limit < 1:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens but the context window is "
                                f"{engine.max_context}", code="context_length_exceeded", param="messages")
        max_tokens = req.max_tokens or min(DEFAULT_MAX_TOKENS, limit)
        if max_tokens > limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds the {limit} tokens left in the context window",
                           param="max_tokens")
        try:
            return SamplingParams(temperature=req.temperature, top_p=req.top_p, max_new_tokens=max_tokens,
                                  seed=req.seed, stop=req.stops())
        except MoeOffloadError as e:
            raise APIError(400, str(e)) from None

    async def run(prompt_ids: list[int], params: SamplingParams):
        """Submit; yield TokenEvents then the Completion (or raise what the worker raised)."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        job = Job(prompt_ids, params, lambda item: loop.call_soon_threadsafe(items.put_nowait, item))
        try:
            scheduler.submit(job)
        except QueueFull:
            raise APIError(429, "too many requests queued; retry later", "rate_limit_error") from None
        try:
            while True:
                item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Completion):
                    return
        finally:
            job.cancelled.set()  # a no-op once complete; frees the worker if the client left

    async def first_item(gen):
        """Start the generation eagerly so errors (429) surface before a streaming response begins."""
        try:
            return await gen.__anext__()
        except MoeOffloadError as e:
            raise APIError(400, str(e)) from None

    def usage(c: Completion) -> dict:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens}

    async def respond(kind: str, req, prompt_ids: list[int]):
        params = prepare(req, prompt_ids)
        rid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        gen = run(prompt_ids, params)
        first = await first_item(gen)

        async def items() -> AsyncIterator:
            yield first
            async for item in gen:
                yield item

        def choice(text: str | None, finish: str | None, stream: bool) -> dict:
            if kind == "chat":
                key = "delta" if stream else "message"
                body = {} if text is None else ({"content": text} if stream else {"role": "assistant", "content": text})
                return {"index": 0, key: body, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        if not req.stream:
            text, completion = "", None
            async for item in items():
                if isinstance(item, TokenEvent):
                    text += item.text
                else:
                    completion = item
            return {"id": rid, "object": obj, "created": created, "model": model_name,
                    "choices": [choice(text, completion.finish_reason, False)], "usage": usage(completion)}

        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        async def sse():
            def chunk(payload: dict) -> str:
                return f"data: {json.dumps({'id': rid, 'object': chunk_obj, 'created': created, 'model': model_name, **payload})}\n\n"

            if kind == "chat":
                yield chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]})
            try:
                async for item in items():
                    if isinstance(item, TokenEvent):
                        if item.text:
                            yield chunk({"choices": [choice(item.text, None, True)]})
                    else:
                        yield chunk({"choices": [choice(None if kind == "chat" else "", item.finish_reason, True)],
                                     "usage": usage(item)})
            except Exception as e:  # headers are sent: report in-band, as OpenAI does
                yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        try:
            ids = engine.tokenizer.apply_chat_template([m.model_dump() for m in req.messages])
        except MoeOffloadError as e:
            raise APIError(400, str(e), param="messages") from None
        return await respond("chat", req, ids)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if not req.prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        return await respond("completion", req, engine.encode(req.prompt))

    return app
