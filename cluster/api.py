"""The OpenAI-compatible HTTP ingress: validates, tokenizes, and streams from engine replicas.

Prompts are tokenized here (the chat template too), so replicas receive token ids and the router
knows each prompt's length. Each prompt is one engine request; `n` samples fork inside the engine.
Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`.

No `from __future__ import annotations` here: Serve re-wraps the route methods, and FastAPI must
see real types in their signatures, not strings it can no longer resolve.
"""

import asyncio
import contextlib
import hmac
import logging
import math
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from cluster.config import AppConfig, LimitsConfig
from cluster.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Usage,
)
from replicas.deployment import GenerateRequest
from replicas.errors import EngineDeadError, EngineStepError
from replicas.outputs import CompletionOutput, Logprob, RequestOutput
from replicas.sampling_params import SamplingParams
from replicas.tokenizer import render_chat
from scheduler import QueueFullError

logger = logging.getLogger(__name__)

app = FastAPI(title="Continuum", description="OpenAI-compatible LLM serving on Ray Serve.")


class APIError(Exception):
    """An error the client caused or must see, with OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        ErrorResponse(error=error.detail).model_dump(),
        status_code=error.status,
        headers=error.headers,
    )


def retry_later(status: int, message: str, code: str) -> APIError:
    """Overload or a replica restarting: the client should come back in a moment."""
    kind = "rate_limit_error" if status == 429 else "service_unavailable"
    return APIError(status, message, kind, code=code, headers={"Retry-After": "1"})


def request_timeout() -> APIError:
    return APIError(408, "the request passed its deadline", "timeout_error", code="request_timeout")


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (unparsable body, unknown route, ...) in OpenAI's shape."""
    kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
    return error_response(APIError(exc.status_code, str(exc.detail), kind, headers=exc.headers))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return error_response(APIError(400, message, param=param, code="invalid_value"))


@app.exception_handler(ValidationError)
async def _sampling_error(_: Request, exc: ValidationError) -> JSONResponse:
    """Values each valid alone but not together (e.g. for SamplingParams)."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return error_response(
        APIError(400, f"{param}: {first['msg']}", param=param, code="invalid_value")
    )


class InternalErrorMiddleware:
    """Unexpected errors before a response has started become OpenAI-style 500s.

    Unlike an `Exception` handler (which re-raises after responding, to be logged twice),
    this answers once; cancellations (a client that left) pass through untouched.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started or scope["type"] != "http" or isinstance(exc, TaskCancelledError):
                raise
            logger.exception("unhandled error")
            response = error_response(APIError(500, "internal server error", "internal_error"))
            await response(scope, receive, send)


@dataclass
class Guard:
    """What every request is checked against before routing: the API key and the body size."""

    api_key: bytes | None
    max_body_bytes: int


# Serve runs one ingress replica per process; it sets this through `configure_guard`.
guard = Guard(api_key=None, max_body_bytes=LimitsConfig().max_body_bytes)


def configure_guard(api_key: str | None, max_body_bytes: int) -> None:
    """Set what `GuardMiddleware` checks. A module function, not an attribute write in the
    ingress: Serve ships the ingress class by value, with copies of the globals it names."""
    guard.api_key = api_key.strip().encode() if api_key and api_key.strip() else None
    guard.max_body_bytes = max_body_bytes


class GuardMiddleware:
    """Bearer-key check (constant time; /health is open) and the request body size limit."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if guard.api_key is not None and route_path(scope) != "/health":
            scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), guard.api_key):
                error = APIError(
                    401,
                    "missing or incorrect API key (Authorization: Bearer <key>)",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error_response(error)(scope, receive, send)
                return
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > guard.max_body_bytes:
            error = APIError(
                413, f"the request body is over {guard.max_body_bytes} bytes", code="too_large"
            )
            await error_response(error)(scope, receive, send)
            return
        # Bodies without a length are counted as they arrive (413 through `_http_error`).
        await RequestBodyLimitMiddleware(self.app, guard.max_body_bytes)(scope, receive, send)


def route_path(scope) -> str:
    """The path below the application's route prefix."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


# The last added runs first: unexpected errors are caught around everything else.
app.add_middleware(GuardMiddleware)
app.add_middleware(InternalErrorMiddleware)


def classify_engine_error(exc: BaseException) -> APIError:
    """Map an exception raised by a replica (Ray wraps it) to what the client should see."""
    if isinstance(exc, APIError):
        return exc
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, QueueFullError):
        return retry_later(429, str(cause), "queue_full")
    if isinstance(cause, BackPressureError):
        return retry_later(503, "all replicas are busy; retry", "queue_full")
    if isinstance(cause, EngineDeadError | RayActorError):
        return retry_later(503, "the model replica is restarting; retry", "replica_unavailable")
    if isinstance(cause, ValueError):
        return APIError(400, str(cause).splitlines()[0] if str(cause) else "invalid request")
    if isinstance(cause, EngineStepError):
        logger.error("engine step failed: %s", cause)
        return APIError(500, "the engine failed while generating this request", "internal_error")
    logger.error("request failed: %r", exc)
    return APIError(500, "internal error while generating", "internal_error")


def cancel_quietly(response: DeploymentResponseGenerator) -> None:
    """Cancel a replica call (aborting its request). `cancel` re-raises the error of a call
    that already failed, which has nothing left to cancel."""
    with contextlib.suppress(Exception):
        response.cancel()


def request_id_of(request: Request) -> str:
    """Serve's request id: the client's X-Request-ID if it sent one, else generated by the proxy.

    Serve returns it in the X-Request-ID response header and tags this request's logs with it on
    every replica it reaches; the OpenAI `id` and the engine's request id are built from it.
    """
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


def top_entries(entry: dict[int, Logprob], n: int) -> list[Logprob]:
    return sorted((lp for lp in entry.values() if lp.rank <= n), key=lambda lp: lp.rank)[:n]


def chat_logprobs(output: CompletionOutput, n: int) -> ChatLogprobs | None:
    if output.logprobs is None:
        return None
    content = []
    for token_id, entry in zip(output.token_ids, output.logprobs, strict=True):
        chosen = entry[token_id]
        content.append(
            ChatTokenLogprob(
                token=chosen.decoded_token,
                logprob=chosen.logprob,
                bytes=list(chosen.decoded_token.encode()),
                top_logprobs=[
                    ChatTopLogprob(
                        token=lp.decoded_token,
                        logprob=lp.logprob,
                        bytes=list(lp.decoded_token.encode()),
                    )
                    for lp in top_entries(entry, n)
                ],
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(output: CompletionOutput, n: int, offset: int) -> CompletionLogprobs | None:
    if output.logprobs is None:
        return None
    result = CompletionLogprobs()
    for token_id, entry in zip(output.token_ids, output.logprobs, strict=True):
        chosen = entry[token_id]
        result.tokens.append(chosen.decoded_token)
        result.token_logprobs.append(chosen.logprob)
        result.top_logprobs.append({lp.decoded_token: lp.logprob for lp in top_entries(entry, n)})
        result.text_offset.append(offset)
        offset += len(chosen.decoded_token)
    return result


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several async iterators as they come, tagged with their iterator's index."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except BaseException as exc:  # re-raised to the consumer below
            await queue.put((i, exc))
        await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, llm: DeploymentHandle, config: dict) -> None:
        self.config = AppConfig.model_validate(config)
        self.llm = llm
        self.model_name = self.config.model_name
        # Imported here: Serve's app builder imports this module and needs no transformers.
        from replicas.model_loader import resolve_model_source
        from replicas.tokenizer import load_tokenizer

        engine_config = self.config.engine
        self.tokenizer = load_tokenizer(engine_config, resolve_model_source(engine_config))
        self._model_info: dict | None = None
        self.limits = self.config.limits
        api_key = os.environ.get(self.config.api_key_env)
        configure_guard(api_key, self.limits.max_body_bytes)
        if not api_key:
            logger.warning("no API key in $%s: the API is open to anyone", self.config.api_key_env)

    # --- routes -------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            await asyncio.wait_for(self.model_info(), timeout=10)
        except Exception as exc:
            return error_response(
                APIError(503, f"no healthy replica: {exc!r}", "service_unavailable")
            )
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        info = await self.model_info()
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=info["max_model_len"])])

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, raw: Request):
        deadline = self.deadline(raw)
        self.check_model(body.model)
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported", param="echo")
        request_id = f"cmpl-{request_id_of(raw)}"
        prompts = body.prompts()
        token_prompts = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        max_tokens = await self.apply_limits(body.max_tokens, token_prompts, "prompt")
        params = body.sampling_params(max_tokens, body.logprobs)
        echoes = [
            (p if isinstance(p, str) else self.tokenizer.decode(p)) if body.echo else ""
            for p in prompts
        ]
        started = await asyncio.gather(
            *(
                self.start(f"{request_id}-{i}", ids, params, deadline)
                for i, ids in enumerate(token_prompts)
            ),
            return_exceptions=True,
        )
        if errors := [s for s in started if isinstance(s, BaseException)]:
            for stream in started:
                if not isinstance(stream, BaseException):
                    await stream.aclose()
            raise errors[0]
        streams = list(started)
        if body.stream:
            return self.stream_response(self.completion_events(request_id, body, streams, echoes))
        return await self.completion_result(request_id, body, streams, echoes)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, raw: Request):
        deadline = self.deadline(raw)
        self.check_model(body.model)
        try:
            prompt = render_chat(self.tokenizer, [m.as_template_message() for m in body.messages])
        except Exception as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
        max_tokens = await self.apply_limits(body.requested_max_tokens, [prompt], "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(max_tokens, logprobs)
        request_id = f"chatcmpl-{request_id_of(raw)}"
        stream = await self.start(request_id, prompt, params, deadline)
        if body.stream:
            return self.stream_response(self.chat_events(request_id, body, stream, len(prompt)))
        return await self.chat_result(request_id, body, stream, len(prompt))

    # --- helpers ------------------------------------------------------------------------------

    async def model_info(self) -> dict:
        if self._model_info is None:
            self._model_info = await self.llm.model_info.remote()
        return self._model_info

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                400,
                f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
            )

    def deadline(self, raw: Request) -> float:
        """When this request must be done (event-loop time): the configured timeout, or the
        client's shorter X-Request-Timeout (seconds)."""
        timeout = self.limits.request_timeout_s
        if (header := raw.headers.get("x-request-timeout")) is not None:
            try:
                requested = float(header)
            except ValueError:
                requested = 0.0
            if not 0 < requested < math.inf:  # NaN fails too
                raise APIError(
                    400, "X-Request-Timeout must be a positive number of seconds", param="header"
                )
            timeout = min(timeout, requested)
        return asyncio.get_running_loop().time() + timeout

    async def apply_limits(
        self, requested: int | None, prompts: list[list[int]], param: str
    ) -> int | None:
        """Check the prompt-length and max_tokens limits; returns the max_tokens to use (the
        cap is also the default)."""
        longest = max(len(p) for p in prompts)
        limit = self.limits.max_prompt_tokens
        if limit is not None and longest > limit:
            raise APIError(
                400,
                f"the prompt has {longest} tokens; this server accepts at most {limit}",
                param=param,
                code="context_length_exceeded",
            )
        cap = self.limits.max_tokens
        if cap is None:
            return requested
        if requested is None:
            room = (await self.model_info())["max_model_len"] - longest
            return max(1, min(cap, room))
        if requested > cap:
            raise APIError(
                400, f"max_tokens is at most {cap} here", param="max_tokens", code="invalid_value"
            )
        return requested

    async def start(
        self, request_id: str, prompt: list[int], params: SamplingParams, deadline: float
    ) -> AsyncIterator[RequestOutput]:
        """Send a request to a replica and wait for its first output, so that a request the
        engine refuses becomes a 4xx before any response is sent. Past `deadline`, the request
        is cancelled (its blocks freed) and the client gets a 408."""
        response: DeploymentResponseGenerator = self.llm.options(stream=True).generate.remote(
            GenerateRequest(request_id, prompt, params)
        )
        try:
            async with asyncio.timeout_at(deadline):
                first = await response.__anext__()
        except TimeoutError:
            cancel_quietly(response)
            raise request_timeout() from None
        except Exception as exc:
            cancel_quietly(response)
            raise classify_engine_error(exc) from exc

        async def outputs() -> AsyncIterator[RequestOutput]:
            try:
                yield first
                if first.finished:
                    return
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            output = await response.__anext__()
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise request_timeout() from None
                    yield output
                    if output.finished:
                        return
            finally:
                cancel_quietly(response)  # no-op if finished; aborts it if the client left

        return outputs()

    def stream_response(self, events: AsyncIterator[str]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            except Exception as exc:  # headers are sent: report the error in the stream
                error = exc if isinstance(exc, APIError) else classify_engine_error(exc)
                yield f"data: {ErrorResponse(error=error.detail).model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(guarded(), media_type="text/event-stream")

    async def chat_result(self, request_id, body: ChatCompletionRequest, stream, prompt_len: int):
        texts: dict[int, list[str]] = {}
        finals: dict[int, CompletionOutput] = {}
        logprobs: dict[int, list[ChatTokenLogprob]] = {}
        completion_tokens = cached = 0
        try:
            async for output in stream:
                cached = output.num_cached_tokens
                for choice in output.outputs:
                    texts.setdefault(choice.index, []).append(choice.text)
                    completion_tokens += len(choice.token_ids)
                    if (lp := chat_logprobs(choice, body.top_logprobs or 0)) is not None:
                        logprobs.setdefault(choice.index, []).extend(lp.content)
                    if choice.finished:
                        finals[choice.index] = choice
        except Exception as exc:
            raise classify_engine_error(exc) from exc
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content="".join(texts[i])),
                logprobs=ChatLogprobs(content=logprobs.get(i, [])) if body.logprobs else None,
                finish_reason=finals[i].finish_reason,
                stop_reason=finals[i].stop_reason,
            )
            for i in sorted(finals)
        ]
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=make_usage(prompt_len, completion_tokens, cached),
        )

    async def chat_events(self, request_id, body: ChatCompletionRequest, stream, prompt_len: int):
        def chunk(choices, usage=None) -> str:
            data = ChatCompletionChunk(
                id=request_id, model=self.model_name, choices=choices, usage=usage
            )
            return f"data: {data.model_dump_json(exclude_none=True)}\n\n"

        yield chunk(
            [
                ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(body.n)
            ]
        )
        completion_tokens = cached = 0
        async for output in stream:
            cached = output.num_cached_tokens
            choices = []
            for c in output.outputs:
                completion_tokens += len(c.token_ids)
                if not c.text and not c.finished:
                    continue
                choices.append(
                    ChatStreamChoice(
                        index=c.index,
                        delta=DeltaMessage(content=c.text),
                        logprobs=chat_logprobs(c, body.top_logprobs or 0),
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
            if choices:
                yield chunk(choices)
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], make_usage(prompt_len, completion_tokens, cached))

    async def completion_result(self, request_id, body: CompletionRequest, streams, echoes):
        texts: dict[int, list[str]] = {}
        finals: dict[int, CompletionOutput] = {}
        logprobs: dict[int, CompletionLogprobs] = {}
        prompt_tokens = completion_tokens = cached = 0
        seen_prompts: set[int] = set()
        try:
            async for p, output in merge(streams):
                if p not in seen_prompts:
                    seen_prompts.add(p)
                    prompt_tokens += len(output.prompt_token_ids)
                    cached += output.num_cached_tokens
                for c in output.outputs:
                    index = p * body.n + c.index
                    parts = texts.setdefault(index, [echoes[p]])
                    completion_tokens += len(c.token_ids)
                    offset = sum(len(t) for t in parts)
                    parts.append(c.text)
                    if (lp := completion_logprobs(c, body.logprobs or 0, offset)) is not None:
                        merged = logprobs.setdefault(index, CompletionLogprobs())
                        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                            getattr(merged, field).extend(getattr(lp, field))
                    if c.finished:
                        finals[index] = c
        except Exception as exc:
            raise classify_engine_error(exc) from exc
        choices = [
            CompletionChoice(
                index=i,
                text="".join(texts[i]),
                logprobs=logprobs.get(i),
                finish_reason=finals[i].finish_reason,
                stop_reason=finals[i].stop_reason,
            )
            for i in sorted(finals)
        ]
        return CompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=make_usage(prompt_tokens, completion_tokens, cached),
        )

    async def completion_events(self, request_id, body: CompletionRequest, streams, echoes):
        def event(choices, usage=None) -> str:
            data = CompletionResponse(
                id=request_id, model=self.model_name, choices=choices, usage=usage
            )
            return f"data: {data.model_dump_json(exclude_none=True)}\n\n"

        prompt_tokens = completion_tokens = cached = 0
        seen_prompts: set[int] = set()
        seen_choices: set[int] = set()
        async for p, output in merge(streams):
            if p not in seen_prompts:
                seen_prompts.add(p)
                prompt_tokens += len(output.prompt_token_ids)
                cached += output.num_cached_tokens
            choices = []
            for c in output.outputs:
                index = p * body.n + c.index
                completion_tokens += len(c.token_ids)
                text = c.text
                if index not in seen_choices:
                    seen_choices.add(index)
                    text = echoes[p] + text
                if not text and not c.finished:
                    continue
                choices.append(
                    CompletionChoice(
                        index=index,
                        text=text,
                        logprobs=completion_logprobs(c, body.logprobs or 0, 0),
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
            if choices:
                yield event(choices)
        if body.stream_options and body.stream_options.include_usage:
            yield event([], make_usage(prompt_tokens, completion_tokens, cached))
