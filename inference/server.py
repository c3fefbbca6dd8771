"""An OpenAI-compatible HTTP server over the serving engine (inference/engine.py): ``make_app``
builds a Starlette (ASGI) app with /v1/completions, /v1/chat/completions (the tokenizer's chat
template), /v1/models, /health and /metrics (Prometheus). Run it with uvicorn (``python -m eval
serve``, cli/serve.py); the app starts the engine's thread when uvicorn starts it and stops it last.

Each choice of a request (``n``, and each prompt of a list) is one engine request; its events come
from the engine's thread into the event loop (``call_soon_threadsafe``) and are decoded there
(inference/text_stream.py), with stop strings matched on the text: the request is cancelled when
one completes. Responses stream as server-sent events when asked. Requests in the engine are bounded
by ``max_batch + max_queue``: past that a request gets 429 at once. A client that disconnects has
its requests cancelled, so their KV blocks are freed at the engine's next step. Every failure is an
OpenAI error object with a status code (inference/openai_api.py); none ends the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from core.errors import first_line
from data.tokenizer import Tokenizer
from inference import openai_api as api
from inference.engine import Engine
from inference.openai_api import ApiError, GenerationParams, TokenLogprob
from inference.requests import Event, Handle, Request
from inference.server_metrics import CountResponses, ServerMetrics
from inference.text_stream import TextStream

MAX_BODY_BYTES = 16 << 20
LOG = logging.getLogger(__name__)


def text_prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids generation continues from a text: BOS (if the tokenizer adds one) and the text, as in
    training (what ``eval generate`` feeds the model)."""
    return ([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + tokenizer.encode(text)


@dataclasses.dataclass
class _Choice:
    """One engine request of an HTTP request and what it has produced."""

    index: int
    prompt_tokens: int
    text: TextStream
    handle: Handle | None = None
    tokens: int = 0
    timed: bool = False  # its time to first token is recorded
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    new_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # not yet streamed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class _Job:
    """One HTTP request's choices and the queue their engine events arrive on."""

    kind: str  # "text_completion" or "chat.completion"
    params: GenerationParams
    choices: list[_Choice]
    events: asyncio.Queue
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def usage(self) -> dict[str, Any]:
        prompt = sum(c.prompt_tokens for c in self.choices[::self.params.n])  # once per prompt
        done = sum(c.tokens for c in self.choices)
        cached = sum(c.handle.cached_tokens for c in self.choices[::self.params.n] if c.handle)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
                "prompt_tokens_details": {"cached_tokens": cached}}


class _ClientLeftError(Exception):
    """The client left before its response was ready."""


class OpenAIServer:
    """The endpoints over one engine and tokenizer; ``app`` is the ASGI application."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, max_queue: int):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.capacity = engine.max_batch + max_queue
        self.in_flight = 0  # engine requests submitted and not yet finished (event loop only)
        self.metrics = ServerMetrics(engine, lambda: self.in_flight)
        self.started = int(time.time())
        routes = [Route("/v1/completions", self._guarded(self.completions), methods=["POST"]),
                  Route("/v1/chat/completions", self._guarded(self.chat), methods=["POST"]),
                  Route("/v1/models", self._guarded(self.models), methods=["GET"]),
                  Route("/health", self._guarded(self.health), methods=["GET"]),
                  Route("/metrics", self._guarded(self.prometheus), methods=["GET"])]
        self.app = CountResponses(
            Starlette(routes=routes, lifespan=self._lifespan,
                      exception_handlers={HTTPException: self._http_error}), self.metrics)

    # ------------------------------------------------------------------------------- endpoints

    async def completions(self, request: HttpRequest) -> Response:
        body = await _json_body(request)
        api.check_model(body, self.model_name)
        params = api.generation_params(body, chat=False, max_logprobs=self.engine.top_n)
        texts = api.prompts(body)
        ids = await run_in_threadpool(lambda: [p if isinstance(p, list) else
                                               text_prompt_ids(self.tokenizer, p) for p in texts])
        job = self._submit("text_completion", ids, params, "prompt")
        return await self._respond(request, job)

    async def chat(self, request: HttpRequest) -> Response:
        body = await _json_body(request)
        api.check_model(body, self.model_name)
        params = api.generation_params(body, chat=True, max_logprobs=self.engine.top_n)
        messages = api.messages(body)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ApiError(400, f"the model's {self.tokenizer.kind!r} tokenizer has no chat template",
                           "messages")
        try:  # a template renders in a bounded sandbox (data/chat.py), off the event loop
            ids = await run_in_threadpool(self.tokenizer.encode_chat, messages, True)
        except ValueError as e:
            raise ApiError(400, first_line(e), "messages") from None
        job = self._submit("chat.completion", [ids], params, "messages")
        return await self._respond(request, job)

    async def models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "meshlm",
             "max_model_len": self.engine.max_seq_len}]})

    async def health(self, request: HttpRequest) -> Response:
        if self.engine.error is not None:
            raise ApiError(503, f"the engine has stopped after an error: {self.engine.error}")
        return JSONResponse({"status": "ok"})

    async def prometheus(self, request: HttpRequest) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ submitting and events

    def _submit(self, kind: str, prompts: list[list[int]], params: GenerationParams,
                param: str) -> _Job:
        """One engine request per prompt and choice; 400 for a prompt the engine refuses or when
        prompt + ``max_tokens`` exceeds the window (OpenAI's rule, instead of a silent cap; without
        ``max_tokens`` a choice may run to the window's end, its last token needing no cache slot),
        429 when the engine holds ``capacity`` requests already."""
        wanted = len(prompts) * params.n
        if wanted > self.capacity:
            raise ApiError(400, f"the request asks for {wanted} completions, more than this server "
                           f"runs and queues at once ({self.capacity})", "n")
        for ids in prompts:
            if len(ids) > self.engine.max_seq_len:
                raise ApiError(400, f"the prompt holds {len(ids)} tokens, more than the context "
                               f"window of {self.engine.max_seq_len}", param, "context_length_exceeded")
            if params.max_tokens is not None and len(ids) + params.max_tokens > self.engine.max_seq_len:
                name = params.length_name
                raise ApiError(400, f"the prompt ({len(ids)} tokens) plus {name} "
                               f"({params.max_tokens}) is {len(ids) + params.max_tokens}, more "
                               f"than the context window of {self.engine.max_seq_len}; shorten the "
                               f"prompt or lower {name}", name, "context_length_exceeded")
        if self.in_flight + wanted > self.capacity:
            raise ApiError(429, f"the server is busy: {self.in_flight} requests running or queued "
                           f"(at most {self.capacity}); try again later", None, "rate_limit_exceeded",
                           "rate_limit_error")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = _Job(kind, params, [], events)
        try:
            for ids in prompts:
                for j in range(params.n):
                    choice = _Choice(len(job.choices), len(ids), TextStream(self.tokenizer, params.stop))
                    seed = None if params.seed is None else params.seed + j
                    on_event = functools.partial(loop.call_soon_threadsafe, self._on_event, job, choice)
                    request = Request(ids, params.max_tokens or self.engine.max_seq_len,
                                      self.tokenizer.stop_ids, params.sampling, seed, params.logprobs,
                                      on_event)
                    choice.handle = self.engine.submit(request)
                    self.in_flight += 1
                    job.choices.append(choice)
        except ValueError as e:  # a prompt the engine refuses: nothing of this request runs
            self._abandon(job)
            raise ApiError(400, first_line(e), param) from None
        except RuntimeError as e:  # the engine has failed
            self._abandon(job)
            raise ApiError(503, first_line(e)) from None
        return job

    def _on_event(self, job: _Job, choice: _Choice, event: Event) -> None:
        """In the event loop, for every engine event: the server's counters, then the job's queue."""
        if event.token is not None:
            self.metrics.rate.add()
            if not choice.timed:  # the engine's thread set first_token_at before this event
                choice.timed = True
                handle = choice.handle
                self.metrics.time_to_first_token.observe(handle.first_token_at - handle.submitted_at)
        if event.finish_reason is not None:
            self.in_flight -= 1
            self.metrics.finished.labels(event.finish_reason).inc()
        job.events.put_nowait((choice, event))

    def _abandon(self, job: _Job, disconnected: bool = False) -> None:
        """Cancels the job's unfinished engine requests (their blocks are freed at the next step)."""
        left = [c for c in job.choices if not c.finished and c.handle is not None]
        for choice in left:
            choice.handle.cancel()
        if disconnected and left:
            self.metrics.disconnects.inc()

    async def _events(self, job: _Job) -> AsyncIterator[_Choice]:
        """Each choice as its events change it, until every choice has finished."""
        while not all(c.finished for c in job.choices):
            choice, event = await job.events.get()
            if not choice.finished:
                self._feed(choice, event)
                yield choice

    def _feed(self, choice: _Choice, event: Event) -> None:
        if event.token is not None:
            offset = len(choice.text.text)
            choice.text.add(event.token)
            choice.tokens += 1
            if event.logprob is not None:
                entry = TokenLogprob(*self._token(event.token), api.finite(event.logprob), offset,
                                     tuple((*self._token(t), api.finite(lp)) for t, lp in event.top_logprobs))
                choice.logprobs.append(entry)
                choice.new_logprobs.append(entry)
        if event.finish_reason == "error":
            raise ApiError(500, f"the engine failed: {self.engine.error}")
        if event.finish_reason is not None:
            choice.text.finish()
        if choice.text.stopped:  # a stop string: end the engine request too
            choice.finish_reason = "stop"
            choice.handle.cancel()
        elif event.finish_reason is not None:
            choice.finish_reason = event.finish_reason

    def _token(self, token: int) -> tuple[str, bytes]:
        """A token's text and bytes for the logprobs objects."""
        text = self.tokenizer.decode([token])
        data = getattr(self.tokenizer, "token_bytes", None)
        return text, data(token) if data is not None else text.encode()

    # -------------------------------------------------------------------------------- responses

    async def _respond(self, request: HttpRequest, job: _Job) -> Response:
        if job.params.stream:
            return StreamingResponse(self._sse(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        drain = asyncio.ensure_future(self._drain(job))
        left = asyncio.ensure_future(_client_left(request))
        try:
            await asyncio.wait({drain, left}, return_when=asyncio.FIRST_COMPLETED)
            if not drain.done():
                self._abandon(job, disconnected=True)
                raise _ClientLeftError
            drain.result()  # raises the engine's failure, if any
        finally:  # also when this handler is cancelled
            for task in (drain, left):
                task.cancel()
            self._abandon(job)
        return JSONResponse(self._body(job))

    async def _drain(self, job: _Job) -> None:
        async for _ in self._events(job):
            pass

    def _body(self, job: _Job) -> dict[str, Any]:
        chat = job.kind == "chat.completion"
        choices = []
        for c in job.choices:
            logprobs = None if job.params.logprobs is None else \
                (api.chat_logprobs if chat else api.completion_logprobs)(c.logprobs)
            content = {"message": {"role": "assistant", "content": c.text.text}} if chat \
                else {"text": c.text.text}
            choices.append({"index": c.index, **content, "logprobs": logprobs,
                            "finish_reason": _reason(c.finish_reason)})
        return {"id": _id(job), "object": job.kind, "created": job.created, "model": self.model_name,
                "choices": choices, "usage": job.usage()}

    async def _sse(self, job: _Job) -> AsyncIterator[str]:
        """The events of a streamed response: one chunk per piece of final text (or finish), the
        usage when asked, then ``[DONE]``; an error after the headers went out is an error event."""
        chat = job.kind == "chat.completion"
        try:
            if chat:
                for c in job.choices:
                    yield _event(self._chunk(job, c, {"role": "assistant", "content": ""}, None))
            async for choice in self._events(job):
                text, entries = choice.text.take(), choice.new_logprobs
                if not (text or choice.finished):
                    continue  # held back: an incomplete character or a possible stop string
                choice.new_logprobs = []
                logprobs = None if job.params.logprobs is None else \
                    (api.chat_logprobs if chat else api.completion_logprobs)(entries)
                content = {"content": text} if text or not choice.finished else {}
                yield _event(self._chunk(job, choice, content if chat else text, logprobs))
            if job.params.include_usage:
                yield _event({**self._chunk(job, None, None, None), "choices": [],
                              "usage": job.usage()})
        except ApiError as e:
            yield _event(e.body())
        except Exception as e:  # a bug must end this response only, never the server
            LOG.exception("streaming a response failed")
            yield _event(ApiError(500, f"internal error: {first_line(e)}").body())
        except (asyncio.CancelledError, GeneratorExit):  # the client left: Starlette cancels us
            self._abandon(job, disconnected=True)
            raise
        finally:
            self._abandon(job)
        yield "data: [DONE]\n\n"

    def _chunk(self, job: _Job, choice: _Choice | None, delta: Any, logprobs: Any) -> dict[str, Any]:
        chat = job.kind == "chat.completion"
        out = {"id": _id(job), "object": "chat.completion.chunk" if chat else "text_completion",
               "created": job.created, "model": self.model_name}
        if choice is not None:
            finish = _reason(choice.finish_reason) if choice.finished else None
            out["choices"] = [{"index": choice.index, "delta" if chat else "text": delta,
                               "logprobs": logprobs, "finish_reason": finish}]
        return out

    # ---------------------------------------------------------------------------- plumbing

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """The engine's thread runs while the app does; uvicorn ends the app after the requests
        in flight have finished (a graceful shutdown), so nothing is cut short."""
        self.engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(self.engine.stop)

    def _guarded(self, endpoint: Callable[[HttpRequest], Awaitable[Response]]) -> Callable:
        """``endpoint`` answering every failure with an OpenAI error object, and a bug with a 500
        (logged with its traceback): no request can end the server."""

        @functools.wraps(endpoint)
        async def guarded(request: HttpRequest) -> Response:
            try:
                return await endpoint(request)
            except ApiError as e:
                return JSONResponse(e.body(), status_code=e.status)
            except _ClientLeftError:
                return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
            except Exception as e:
                LOG.exception("request to %s failed", request.url.path)
                error = ApiError(500, f"internal error: {first_line(e)}")
                return JSONResponse(error.body(), status_code=500)

        return guarded

    async def _http_error(self, request: HttpRequest, exc: Exception) -> Response:
        """Starlette's own errors (unknown path, wrong method) in the same JSON shape."""
        status = getattr(exc, "status_code", 500)
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(
            status, getattr(exc, "detail", "error"))
        return JSONResponse(ApiError(status, message).body(), status_code=status)


def make_app(engine: Engine, tokenizer: Tokenizer, model_name: str, *, max_queue: int = 64) -> ASGIApp:
    """The ASGI app serving ``engine`` under ``model_name``; beyond ``engine.max_batch`` running
    and ``max_queue`` waiting engine requests a request gets 429."""
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    return OpenAIServer(engine, tokenizer, model_name, max_queue).app


async def _json_body(request: HttpRequest) -> dict[str, Any]:
    """The request's JSON object; 413 past MAX_BODY_BYTES, 400 for anything but a JSON object."""
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    except ClientDisconnect:
        raise _ClientLeftError from None
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {first_line(e)}") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(value).__name__}")
    return value


async def _client_left(request: HttpRequest) -> None:
    """Returns when the client disconnects (the body has been read: the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _id(job: _Job) -> str:
    return ("chatcmpl-" if job.kind == "chat.completion" else "cmpl-") + job.id


def _reason(engine_reason: str | None) -> str | None:
    """OpenAI's finish reasons: a stop id or string is ``stop``, the length limit ``length``."""
    return "stop" if engine_reason in ("stop", "cancelled") else engine_reason
