"""`serve`: the OpenAI HTTP API over one base and its adapters, on FastAPI and uvicorn.

FastAPI + uvicorn rather than LitServe: continuous batching needs one thread owning the model that requests join
and leave between decode steps (engine.py); LitServe's batching hands whole requests to a predict call. FastAPI
gives the routes and server-sent events, uvicorn the HTTP server and a graceful SIGTERM.

    GET  /v1/models             the base (by its checkpoint folder's name) and every adapter, by name
    POST /v1/completions        the prompt as given; `model` picks the base or an adapter
    POST /v1/chat/completions   messages in the adapter's own format (its chat template and system prompt)
    GET  /health, /metrics      liveness and load; metrics in Prometheus' text format

Requests are checked before they queue, and refused with the status and a one-line OpenAI-style error: 400 for
what is wrong with the request (JSON, a value, a prompt or max_tokens past the context), 401 for a missing or
wrong key, 404 for an unknown model, 429 (Retry-After) when the queue is full.
"""
from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lit_lora.errors import UserError
from lit_lora.serve.adapters import AdapterSource, UnknownModel
from lit_lora.serve.engine import Engine, Event, Request

MAX_STOP = 4  # stop sequences per request, as OpenAI allows
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the server's --max_tokens


class RequestError(UserError):
    """What is wrong with a request, and the HTTP status that says so."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class Limits:
    context: int  # tokens of prompt plus answer
    max_tokens: int  # for chat answers that do not say (a request may ask up to the context)
    max_n: int
    api_key: str | None


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kinds = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "server_error"}
    return {"error": {"message": message, "type": kinds.get(status, "invalid_request_error"), "param": param,
                      "code": None}}


# ---------------------------------------------------------------------------------------------- request fields
def number(body: dict, name: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {json.dumps(value)}", param=name)
    if value < low or value > high or (open_low and value == low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise RequestError(f"{name} must be in {bound}, got {value}", param=name)
    return float(value)


def integer(body: dict, name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {json.dumps(value)}", param=name)
    return value


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP}", param="stop")
    return tuple(stops)


def messages_of(body: dict) -> tuple[list[dict[str, str]], str | None]:
    """(turns, system prompt) of a chat request; content as a string or as OpenAI's list of text parts."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content}", param="messages")
    system, turns = None, []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise RequestError(f"messages[{i}] needs a role (system, user or assistant) and text content",
                               param="messages")
        if role == "system":
            if turns or system is not None:
                raise RequestError("only one system message, and first", param="messages")
            system = content
        else:
            turns.append({"role": role, "content": content})
    if not turns or turns[-1]["role"] != "user":
        raise RequestError("the last message must be the user's", param="messages")
    return turns, system


# ---------------------------------------------------------------------------------------------- the service
class Service:
    """What the routes need: the engine, the adapters, the prompt formats and the limits."""

    def __init__(self, engine: Engine, source: AdapterSource, tokenizer, base_name: str,
                 formats: Callable[[str | None, bool], Any], limits: Limits) -> None:
        self.engine, self.source, self.tokenizer, self.base_name = engine, source, tokenizer, base_name
        self.formats, self.limits = formats, limits
        self.started = int(time.time())
        self.responses: dict[int, int] = {}  # status -> count, for /metrics

    def count(self, status: int) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1

    def models(self) -> list[str]:
        return [self.base_name, *self.source.found()]

    def adapter(self, body: dict) -> str | None:
        """The adapter the request's `model` names (None: the base), checked against the base (any thread)."""
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise RequestError("model is required: the base's name or an adapter's (GET /v1/models)", param="model")
        if name == self.base_name:
            return None
        try:
            self.source.check(name)
        except UnknownModel as e:
            raise RequestError(str(e), 404, "model") from None
        except UserError as e:
            raise RequestError(str(e), 400, "model") from None
        return name

    def sampling(self, body: dict, prompt_tokens: int, default_max: int):
        from lit_lora.generate import Sampling

        room = self.limits.context - prompt_tokens
        if room < 1:
            raise RequestError(f"the prompt is {prompt_tokens} tokens and the context {self.limits.context}; "
                               f"shorten the prompt", param="messages" if "messages" in body else "prompt")
        asked = integer(body, "max_completion_tokens", None)
        max_tokens = integer(body, "max_tokens", asked if asked is not None else min(default_max, room))
        if max_tokens < 1 or max_tokens > room:
            raise RequestError(f"max_tokens must be between 1 and {room} (the context of {self.limits.context} "
                               f"less the prompt's {prompt_tokens} tokens), got {max_tokens}", param="max_tokens")
        temperature = number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = number(body, "top_p", 1.0, 0.0, 1.0, open_low=True)
        return Sampling(max_new_tokens=max_tokens, temperature=temperature, top_k=None, top_p=top_p)

    def requests(self, body: dict, chat: bool, adapter: str | None) -> tuple[list[Request], asyncio.Queue, int]:
        """The engine requests one API request for `adapter` becomes (one per choice), their shared event queue
        and the prompt's length."""
        for unsupported in ("logprobs", "echo", "tools", "functions", "logit_bias", "suffix"):
            if body.get(unsupported) not in (None, False):
                raise RequestError(f"{unsupported} is not supported by this server", param=unsupported)
        try:
            if chat:  # a single question is asked exactly as generate asks it; a conversation in the chat form
                turns, system = messages_of(body)
                form = self.formats(adapter, len(turns) > 1 or system is not None)
                prompt, stops = form.conversation_ids(self.tokenizer, turns, system), form.stop_strings
            else:
                text = body.get("prompt")
                text = text[0] if isinstance(text, list) and len(text) == 1 else text
                if not isinstance(text, str):
                    raise RequestError("prompt must be a string (or a list of one)", param="prompt")
                prompt, stops = self.tokenizer.encode(text), ()
        except UserError as e:  # the adapter's template refused the conversation
            raise RequestError(str(e), param="messages") from None
        sampling = self.sampling(body, len(prompt), self.limits.max_tokens if chat else COMPLETION_MAX_TOKENS)
        n = integer(body, "n", 1)
        if not 1 <= n <= self.limits.max_n:
            raise RequestError(f"n must be between 1 and {self.limits.max_n}, got {n}", param="n")
        seed = integer(body, "seed", None)
        stops = tuple(dict.fromkeys(stops + stop_strings(body)))
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit_for(index: int) -> Callable[[Event], None]:
            return lambda event: loop.call_soon_threadsafe(queue.put_nowait, (index, event))

        made = [Request(prompt, sampling, stops, adapter, emit_for(i), None if seed is None else seed + i)
                for i in range(n)]
        return made, queue, len(prompt)

    def submit(self, requests: list[Request]) -> None:
        try:
            for r in requests:
                self.engine.submit(r)
        except UserError as e:
            for r in requests:
                r.cancelled = True
            raise RequestError(str(e), 429) from None


# ---------------------------------------------------------------------------------------------- responses
def completion_chunk(kind: str, rid: str, model: str, created: int, index: int, text: str | None,
                     finish: str | None, first: bool = False) -> dict[str, Any]:
    if kind == "chat":
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage(prompt_tokens: int, requests: list[Request]) -> dict[str, int]:
    completion = sum(r.generated for r in requests)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def events(queue: asyncio.Queue, count: int, disconnected: Callable) -> AsyncIterator[tuple[int, Event]]:
    """The choices' events until each is done or failed; stops early when the client has gone."""
    open_choices = count
    while open_choices:
        try:
            index, event = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await disconnected():
                return
            continue
        if event.kind != "text":
            open_choices -= 1
        yield index, event


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="lit-lora", docs_url=None, redoc_url=None, openapi_url=None)

    def refuse(message: str, status: int, param: str | None = None, headers: dict | None = None) -> JSONResponse:
        service.count(status)
        return JSONResponse(error_body(message, status, param), status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, e: HTTPException) -> JSONResponse:
        return refuse(f"{request.method} {request.url.path}: {e.detail}", e.status_code)

    @app.middleware("http")
    async def check_key(request: HTTPRequest, call_next):
        key = service.limits.api_key
        if key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return refuse("missing or wrong API key: send the header Authorization: Bearer KEY", 401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **service.engine.load()}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        load, adapters = service.engine.load(), service.engine.adapters
        lines = [f"lit_lora_requests_running {load['running']}", f"lit_lora_requests_waiting {load['waiting']}",
                 f"lit_lora_generated_tokens_total {service.engine.generated_tokens}",
                 f"lit_lora_adapters_resident {len(adapters.resident())}",
                 f"lit_lora_adapter_loads_total {adapters.loads}",
                 *(f'lit_lora_responses_total{{status="{s}"}} {n}' for s, n in sorted(service.responses.items()))]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.get("/v1/models")
    async def models() -> dict:
        data = [{"id": name, "object": "model", "created": service.started, "owned_by": "lit-lora"}
                for name in service.models()]
        return {"object": "list", "data": data}

    async def answer(request: HTTPRequest, chat: bool):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return refuse(f"the request body is not valid JSON ({e})", 400)
        if not isinstance(body, dict):
            return refuse("the request body must be a JSON object", 400)
        try:
            adapter = await asyncio.to_thread(service.adapter, body)  # may read it from disk: off the event loop
            requests, queue, prompt_tokens = service.requests(body, chat, adapter)
            service.submit(requests)
        except RequestError as e:
            return refuse(str(e), e.status, e.param, {"Retry-After": "1"} if e.status == 429 else None)
        kind = "chat" if chat else "text"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created, model = int(time.time()), body["model"]
        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return StreamingResponse(stream(request, requests, queue, prompt_tokens, kind, rid, created, model,
                                            include_usage), media_type="text/event-stream")
        texts, finish = [""] * len(requests), [None] * len(requests)
        try:
            async for index, event in events(queue, len(requests), request.is_disconnected):
                if event.kind == "error":
                    return refuse(event.text, event.status)
                if event.kind == "text":
                    texts[index] += event.text
                else:
                    finish[index] = event.text
        finally:
            for r in requests:
                r.cancelled = True  # harmless when done; frees the rows of a client that went away
        service.count(200)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finish))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finish))]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model, "choices": choices, "usage": usage(prompt_tokens, requests)}

    async def stream(request, requests, queue, prompt_tokens, kind, rid, created, model,
                     include_usage: bool) -> AsyncIterator[str]:
        def sse(data: Any) -> str:
            return f"data: {json.dumps(data)}\n\n"

        try:
            started = set()
            async for index, event in events(queue, len(requests), request.is_disconnected):
                if event.kind == "error":
                    yield sse(error_body(event.text, event.status))
                    break
                first = index not in started
                started.add(index)
                text, finish = (event.text, None) if event.kind == "text" else (None, event.text)
                yield sse(completion_chunk(kind, rid, model, created, index, text, finish, first and kind == "chat"))
            else:
                if include_usage:  # as OpenAI does when stream_options.include_usage asks for it
                    yield sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                               "created": created, "model": model, "choices": [],
                               "usage": usage(prompt_tokens, requests)})
                yield "data: [DONE]\n\n"
            service.count(200)
        finally:
            for r in requests:
                r.cancelled = True

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await answer(request, chat=True)

    return app
