"""The OpenAI-compatible HTTP ingress: validates, tokenizes, and streams from engine replicas.

Prompts are tokenized here (the chat template too), so replicas receive token ids and the router
knows each prompt's length. Each prompt is one engine request, with an id unique to it (the
client's X-Request-ID only names the response and log lines); `n` samples fork in the engine.
Replicas stream text deltas (`StreamDelta`); cluster/responses.py shapes them into OpenAI's
bodies and SSE events; cluster/errors.py maps failures to OpenAI's error body.

Structured outputs are compiled here first (`GrammarCompiler`, on a worker thread, bounded in
time), so a bad schema, regex or grammar is a 400 before any replica work; the replica's engine
compiles the same spec again (from its own cache). Tool calls are parsed here, from the text
the replicas stream, by the parser of the model's family (cluster/tool_parsers.py).

No `from __future__ import annotations` here: Serve re-wraps the route methods, and FastAPI must
see real types in their signatures, not strings it can no longer resolve.
"""

import asyncio
import contextlib
import itertools
import logging
import math
import os
import threading
import uuid
from collections.abc import AsyncIterator

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from cluster import responses
from cluster.config import AppConfig
from cluster.errors import (
    APIError,
    ErrorBody,
    InternalErrorMiddleware,
    classify_engine_error,
    install_error_handlers,
    replica_unavailable,
    request_timeout,
)
from cluster.guard import GuardMiddleware, configure_guard
from cluster.prompts import PromptTokenizer, prompt_too_long
from cluster.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from cluster.replica_health import report_dead_engine, serving_replicas
from cluster.tool_parsers import ToolParser, tool_parser_for
from replicas.deployment import GenerateRequest
from replicas.errors import EngineDeadError
from replicas.messages import EngineInfo
from replicas.outputs import StreamDelta, decode_delta
from replicas.sampling_params import SamplingParams, StructuredOutputsParams
from scheduler.block_manager import prompt_block_hashes

logger = logging.getLogger(__name__)

app = FastAPI(title="Continuum", description="OpenAI-compatible LLM serving on Ray Serve.")
install_error_handlers(app)
# The last added runs first: unexpected errors are caught around everything else.
app.add_middleware(GuardMiddleware)
app.add_middleware(InternalErrorMiddleware)

# Tries of a request whose replica turned out dead before it answered (one more replica each).
START_ATTEMPTS = 3


def json_response(body: msgspec.Struct) -> Response:
    return Response(msgspec.json.encode(body), media_type="application/json")


def cancel_quietly(response: DeploymentResponseGenerator) -> None:
    """Cancel a replica call (aborting its request). `cancel` re-raises the error of a call
    that already failed, which has nothing left to cancel."""
    with contextlib.suppress(Exception):
        response.cancel()


def model_tool_parser(tokenizer, engine_config, source: str) -> type[ToolParser]:
    """The tool-call format of the served model's family: from its chat template (or, for
    templates that do not show it, its model type)."""
    from transformers import AutoConfig

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = "\n".join(template.values())
    model_type = AutoConfig.from_pretrained(
        source, revision=engine_config.revision, trust_remote_code=engine_config.trust_remote_code
    ).model_type
    return tool_parser_for(template, model_type)


@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, llm: DeploymentHandle, config: dict) -> None:
        self.config = AppConfig.model_validate(config)
        self.llm = llm
        self.model_name = self.config.model_name
        self.app_name = serve.get_replica_context().app_name
        # Imported here: Serve's app builder imports this module and needs no transformers.
        from replicas.model_loader import resolve_model_source
        from replicas.tokenizer import load_tokenizer

        engine_config = self.config.engine
        source = resolve_model_source(engine_config)
        self.tokenizer = load_tokenizer(engine_config, source)
        self.prompts = PromptTokenizer(self.tokenizer)
        self.tool_parser = model_tool_parser(self.tokenizer, engine_config, source)
        self._grammars = None  # GrammarCompiler, built on the first structured request
        self._grammars_lock = threading.Lock()
        self._engine_info: EngineInfo | None = None
        self._request_ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:12]
        self.limits = self.config.limits
        api_key = os.environ.get(self.config.api_key_env)
        configure_guard(api_key, self.limits.max_body_bytes)
        if not api_key:
            logger.warning("no API key in $%s: the API is open to anyone", self.config.api_key_env)

    # --- routes -------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> Response:
        """200 when at least one engine replica can serve, from the router's view (replica
        reports and failed requests): no model call per probe."""
        serving = serving_replicas(self.app_name)
        if serving is None:  # no request went through yet: asking once makes the router
            try:
                await asyncio.wait_for(self.engine_info(), timeout=10)
            except Exception as exc:
                return self._unhealthy(f"no replica answered: {exc!r}")
            serving = serving_replicas(self.app_name)
        if not serving:
            return self._unhealthy("no engine replica can serve")
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/v1/models")
    async def models(self) -> Response:
        info = await self.engine_info()
        card = responses.ModelCard(
            self.model_name, "model", responses.now(), "continuum", info.max_model_len
        )
        return json_response(responses.ModelList("list", [card]))

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, raw: Request):
        deadline = self.deadline(raw)
        self.check_request(body)
        prompts = body.prompts()
        token_prompts = [
            await self.tokenize(p, "prompt") if isinstance(p, str) else p for p in prompts
        ]
        max_tokens = await self.apply_limits(body.max_tokens, token_prompts, "prompt")
        constraint = body.structured_outputs_params()
        await self.check_constraint(constraint, body.constraint_field)
        params = body.sampling_params(
            max_tokens, body.logprobs, constraint, prompt_logprobs=body.prompt_logprobs
        )
        log_id = self.log_id(raw)
        started = await asyncio.gather(
            *(
                self.start(ids, params, deadline, log_id, self.session_id(raw))
                for ids in token_prompts
            ),
            return_exceptions=True,
        )
        if errors := [s for s in started if isinstance(s, BaseException)]:
            for stream in started:
                if not isinstance(stream, BaseException):
                    await stream.aclose()
            raise errors[0]
        echoes = [  # once the engine accepted the token ids (no decoding of ids out of range)
            await self.echo(p, ids, scored=body.prompt_logprobs is not None)
            if body.echo
            else responses.NO_ECHO
            for p, ids in zip(prompts, token_prompts, strict=True)
        ]
        response_id = f"cmpl-{log_id}"
        lengths = [len(p) for p in token_prompts]
        if body.stream:
            return self.stream_response(
                responses.completion_events(
                    response_id,
                    self.model_name,
                    body.n,
                    body.logprobs,
                    body.usage_mode(),
                    echoes,
                    lengths,
                    list(started),
                )
            )
        result = responses.completion_result(
            response_id, self.model_name, body.n, body.logprobs, echoes, lengths, list(started)
        )
        return json_response(await self.finish(result))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, raw: Request):
        deadline = self.deadline(raw)
        self.check_request(body)
        from replicas.tokenizer import render_chat

        try:
            text = render_chat(
                self.tokenizer,
                [m.as_template_message() for m in body.messages],
                tools=body.template_tools(),
                **body.template_kwargs(),
            )
        except Exception as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
        prompt = await self.tokenize(text, "messages", add_special_tokens=False)
        max_tokens = await self.apply_limits(body.requested_max_tokens, [prompt], "messages")
        try:  # a forced tool call is the grammar of the model family's call format
            constraint = body.structured_outputs_params(self.tool_parser)
        except ValueError as exc:
            raise APIError(400, str(exc), param=body.constraint_field) from exc
        await self.check_constraint(constraint, body.constraint_field)
        top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(max_tokens, top_logprobs, constraint)
        tools = None
        if body.may_call_tools:
            tools = responses.ToolUse(self.tool_parser, named=body.forces_named_call)
        log_id = self.log_id(raw)
        stream = await self.start(prompt, params, deadline, log_id, self.session_id(raw))
        response_id = f"chatcmpl-{log_id}"
        if body.stream:
            return self.stream_response(
                responses.chat_events(
                    response_id,
                    self.model_name,
                    body.n,
                    top_logprobs,
                    body.usage_mode(),
                    len(prompt),
                    stream,
                    tools,
                )
            )
        result = responses.chat_result(
            response_id, self.model_name, top_logprobs, len(prompt), stream, tools
        )
        return json_response(await self.finish(result))

    # --- helpers ------------------------------------------------------------------------------

    async def engine_info(self) -> EngineInfo:
        if self._engine_info is None:
            self._engine_info = await self.llm.model_info.remote()
        return self._engine_info

    def _unhealthy(self, message: str) -> Response:
        return APIError(503, message, "service_unavailable", code="no_replica").response()

    def check_request(self, body: SamplingFields) -> None:
        if body.model is not None and body.model != self.model_name:
            raise APIError(
                400,
                f"the model `{body.model}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
            )
        if ignored := body.ignored_fields():
            logger.debug("fields accepted without effect: %s", ", ".join(ignored))

    def log_id(self, raw: Request) -> str:
        """The client's X-Request-ID (Serve's, when the client sent none): it names the response
        and the log lines, never an engine request."""
        return raw.headers.get("x-request-id") or uuid.uuid4().hex

    def engine_request_id(self) -> str:
        return f"{self._id_prefix}-{next(self._request_ids)}"

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

    async def prompt_limit(self) -> int:
        """The most prompt tokens a request may have here."""
        limit = (await self.engine_info()).max_model_len - 1
        if self.limits.max_prompt_tokens is not None:
            limit = min(limit, self.limits.max_prompt_tokens)
        return limit

    async def tokenize(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        limit = await self.prompt_limit()
        return await self.prompts.encode(text, limit, param, add_special_tokens)

    async def check_constraint(self, spec: StructuredOutputsParams | None, param: str) -> None:
        """Compile a request's output constraint before any replica work: one that is invalid,
        unsupported or too slow to build is a 400 with llguidance's message."""
        if spec is None:
            return
        try:
            await asyncio.to_thread(self._compile, spec)
        except ValueError as exc:  # GrammarError, or a schema llguidance cannot read
            raise APIError(400, str(exc), param=param, code="invalid_value") from exc

    def _compile(self, spec: StructuredOutputsParams) -> None:
        from replicas.structured_output import GrammarCompiler

        with self._grammars_lock:  # wrapping the vocabulary takes ~0.3 s: once per ingress
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer)
        self._grammars.compile(spec)

    async def echo(
        self, prompt: str | list[int], token_ids: list[int], scored: bool
    ) -> responses.Echo:
        """What a completions choice repeats first: the prompt as sent; when it is scored
        (`logprobs`), the text its tokens spell, so that `text_offset` indexes the answer."""
        if not scored:
            text = prompt if isinstance(prompt, str) else self.tokenizer.decode(token_ids)
            return responses.Echo(text)
        text, offsets = await self.prompts.spell(token_ids)
        return responses.Echo(text, token_ids, offsets, self.tokenizer.decode(token_ids[:1]))

    async def apply_limits(
        self, requested: int | None, prompts: list[list[int]], param: str
    ) -> int | None:
        """Check the prompt-length, context-length and max_tokens limits; returns the
        max_tokens to use (`limits.max_tokens` is also the default)."""
        longest = max(len(p) for p in prompts)
        limit = await self.prompt_limit()
        if longest > limit:
            raise prompt_too_long(param, f"{longest} tokens", limit)
        context = (await self.engine_info()).max_model_len
        cap = self.limits.max_tokens
        if requested is None:
            return None if cap is None else max(1, min(cap, context - longest))
        if cap is not None and requested > cap:
            raise APIError(
                400,
                f"max_tokens is {requested}; this server allows at most {cap}",
                param="max_tokens",
                code="invalid_value",
            )
        if longest + requested > context:
            raise APIError(
                400,
                f"this model's maximum context length is {context} tokens; the request asks for "
                f"{longest + requested} ({longest} in the {param}, {requested} in the completion): "
                f"shorten the {param} or lower max_tokens to at most {context - longest}",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    async def start(
        self,
        prompt: list[int],
        params: SamplingParams,
        deadline: float,
        log_id: str,
        session_id: str | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Send a request to a replica and wait for its first output, so that a request the
        engine refuses becomes a 4xx before any response is sent. A replica found dead before
        it answered is reported to the router and the request goes to another. Past
        `deadline`, the request is cancelled (its blocks freed) and the client gets a 408."""
        block_hashes = await self.block_hashes(prompt)
        for attempt in range(START_ATTEMPTS):
            request = GenerateRequest(
                self.engine_request_id(), prompt, params, log_id, block_hashes, session_id
            )
            response: DeploymentResponseGenerator = self.llm.options(
                stream=True, _by_reference=False
            ).generate.remote(request)
            try:
                async with asyncio.timeout_at(deadline):
                    first = decode_delta(await response.__anext__())
                break
            except TimeoutError:
                cancel_quietly(response)
                raise request_timeout() from None
            except Exception as exc:
                cancel_quietly(response)
                cause = getattr(exc, "cause", None) or exc
                if isinstance(cause, EngineDeadError) and cause.replica_id:
                    report_dead_engine(cause.replica_id)
                if not replica_unavailable(exc) or attempt == START_ATTEMPTS - 1:
                    raise classify_engine_error(exc) from exc

        async def outputs() -> AsyncIterator[StreamDelta]:
            try:
                yield first
                if first.finished:
                    return
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            data = await response.__anext__()
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise request_timeout() from None
                    except Exception as exc:
                        cause = getattr(exc, "cause", None) or exc
                        if isinstance(cause, EngineDeadError) and cause.replica_id:
                            report_dead_engine(cause.replica_id)
                        raise
                    delta = decode_delta(data)
                    yield delta
                    if delta.finished:
                        return
            finally:
                cancel_quietly(response)  # no-op if finished; aborts it if the client left

        return outputs()

    async def block_hashes(self, prompt: list[int]) -> list[bytes]:
        """The prompt's full-block hashes, as the replicas' block managers compute them: what
        the router looks up in its prefix index (none when the policy does not use them)."""
        if self.config.router.policy != "cost":
            return []
        block_size = (await self.engine_info()).block_size
        return prompt_block_hashes(prompt, block_size)

    def session_id(self, raw: Request) -> str | None:
        header = self.config.router.session_header
        return raw.headers.get(header) if header else None

    async def finish(self, result):
        """Await a whole (non-streaming) result, mapping replica failures to API errors."""
        try:
            return await result
        except Exception as exc:
            raise classify_engine_error(exc) from exc

    def stream_response(self, events: AsyncIterator[bytes]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[bytes]:
            try:
                async for event in events:
                    yield event
            except Exception as exc:  # headers are sent: report the error in the stream
                error = classify_engine_error(exc)
                yield b"data: " + msgspec.json.encode(ErrorBody(error.detail)) + b"\n\n"
            yield responses.SSE_DONE

        return StreamingResponse(guarded(), media_type="text/event-stream")
