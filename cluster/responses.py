"""OpenAI response bodies and SSE events, built from the replicas' `StreamDelta`s.

Response types are msgspec structs: a streamed token costs one small struct and one `encode`,
not a pydantic model and its validation. Streams (`*_events`) yield ready SSE bytes; results
(`*_result`) return one JSON body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec

from replicas.outputs import CompletionOutput, Logprob, StreamDelta

_json = msgspec.json.Encoder()


def now() -> int:
    return int(time.time())


def sse(event: msgspec.Struct) -> bytes:
    return b"data: " + _json.encode(event) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# --- types ----------------------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(
        prompt_tokens,
        completion_tokens,
        prompt_tokens + completion_tokens,
        PromptTokensDetails(cached_tokens),
    )


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str] = msgspec.field(default_factory=list)
    token_logprobs: list[float | None] = msgspec.field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = msgspec.field(default_factory=list)
    text_offset: list[int] = msgspec.field(default_factory=list)


class CompletionChoice(msgspec.Struct, omit_defaults=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class Completion(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob]


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # JSON text of an object, as the model wrote it


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    type: str = "function"
    function: FunctionCall


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A piece of a streamed call: the first of each call has its id, type and name."""

    index: int
    id: str | None = None
    type: str | None = None
    function: DeltaFunctionCall


class DeltaMessage(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(msgspec.Struct, omit_defaults=True):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str
    max_model_len: int


class ModelList(msgspec.Struct):
    object: str
    data: list[ModelCard]


# --- logprobs -------------------------------------------------------------------------------


def top_entries(entry: dict[int, Logprob], n: int) -> list[Logprob]:
    return sorted((lp for lp in entry.values() if lp.rank <= n), key=lambda lp: lp.rank)[:n]


def chat_logprobs(output: CompletionOutput, n: int) -> list[ChatTokenLogprob]:
    content = []
    for token_id, entry in zip(output.token_ids, output.logprobs or (), strict=True):
        chosen = entry[token_id]
        content.append(
            ChatTokenLogprob(
                token=chosen.decoded_token,
                logprob=chosen.logprob,
                bytes=list(chosen.decoded_token.encode()),
                top_logprobs=[
                    ChatTopLogprob(lp.decoded_token, lp.logprob, list(lp.decoded_token.encode()))
                    for lp in top_entries(entry, n)
                ],
            )
        )
    return content


def extend_completion_logprobs(
    into: CompletionLogprobs, output: CompletionOutput, n: int, offset: int
) -> int:
    """Append `output`'s tokens to `into`, starting at character `offset`; returns the offset
    after them (OpenAI's `text_offset` counts from the start of the choice's text)."""
    for token_id, entry in zip(output.token_ids, output.logprobs or (), strict=True):
        chosen = entry[token_id]
        into.tokens.append(chosen.decoded_token)
        into.token_logprobs.append(chosen.logprob)
        into.top_logprobs.append({lp.decoded_token: lp.logprob for lp in top_entries(entry, n)})
        into.text_offset.append(offset)
        offset += len(chosen.decoded_token)
    return offset


# --- streams of several prompts -------------------------------------------------------------


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


# --- chat -----------------------------------------------------------------------------------


async def chat_events(
    response_id: str,
    model: str,
    n: int,
    top_logprobs: int | None,
    usage_mode: str,
    prompt_tokens: int,
    stream: AsyncIterator[StreamDelta],
) -> AsyncIterator[bytes]:
    """SSE chunks of a chat completion: the role first, then one chunk per replica message."""
    created = now()

    def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> bytes:
        if usage is None and usage_mode == "every_chunk":
            usage = make_usage(prompt_tokens, completion_tokens, cached)
        return sse(
            ChatCompletionChunk(
                response_id, "chat.completion.chunk", created, model, choices, usage
            )
        )

    completion_tokens = cached = 0
    yield chunk([ChatStreamChoice(i, DeltaMessage(role="assistant", content="")) for i in range(n)])
    async for delta in stream:
        cached = delta.num_cached_tokens
        choices = []
        for c in delta.outputs:
            completion_tokens += len(c.token_ids)
            if not c.text and not c.finished:
                continue
            logprobs = None
            if top_logprobs is not None:
                logprobs = ChatLogprobs(chat_logprobs(c, top_logprobs))
            choices.append(
                ChatStreamChoice(
                    c.index, DeltaMessage(content=c.text), logprobs, c.finish_reason, c.stop_reason
                )
            )
        if choices:
            yield chunk(choices)
    if usage_mode != "none":
        yield chunk([], make_usage(prompt_tokens, completion_tokens, cached))


async def chat_result(
    response_id: str,
    model: str,
    top_logprobs: int | None,
    prompt_tokens: int,
    stream: AsyncIterator[StreamDelta],
) -> ChatCompletion:
    texts: dict[int, list[str]] = {}
    finals: dict[int, CompletionOutput] = {}
    logprobs: dict[int, list[ChatTokenLogprob]] = {}
    completion_tokens = cached = 0
    async for delta in stream:
        cached = delta.num_cached_tokens
        for c in delta.outputs:
            texts.setdefault(c.index, []).append(c.text)
            completion_tokens += len(c.token_ids)
            if top_logprobs is not None:
                logprobs.setdefault(c.index, []).extend(chat_logprobs(c, top_logprobs))
            if c.finished:
                finals[c.index] = c
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content="".join(texts[i])),
            logprobs=None if top_logprobs is None else ChatLogprobs(logprobs.get(i, [])),
            finish_reason=finals[i].finish_reason,
            stop_reason=finals[i].stop_reason,
        )
        for i in sorted(finals)
    ]
    usage = make_usage(prompt_tokens, completion_tokens, cached)
    return ChatCompletion(response_id, "chat.completion", now(), model, choices, usage)


# --- completions ----------------------------------------------------------------------------


class _CompletionChoices:
    """Per choice of a completions request (prompt p, sample i -> index p * n + i): where its
    text stands, for `text_offset`, and whether its echo was sent."""

    def __init__(self, n: int, echoes: list[str], num_logprobs: int | None) -> None:
        self.n = n
        self.echoes = echoes
        self.num_logprobs = num_logprobs
        self.offsets: dict[int, int] = {}

    def text_and_logprobs(
        self, prompt: int, c: CompletionOutput
    ) -> tuple[int, str, CompletionLogprobs | None]:
        index = prompt * self.n + c.index
        text = c.text
        if index not in self.offsets:  # the choice's first piece: its echo goes first
            text = self.echoes[prompt] + text
            self.offsets[index] = len(self.echoes[prompt])
        logprobs = None
        if self.num_logprobs is not None:
            logprobs = CompletionLogprobs()
            self.offsets[index] = extend_completion_logprobs(
                logprobs, c, self.num_logprobs, self.offsets[index]
            )
        return index, text, logprobs


async def completion_events(
    response_id: str,
    model: str,
    n: int,
    num_logprobs: int | None,
    usage_mode: str,
    echoes: list[str],
    prompt_lengths: list[int],
    streams: list[AsyncIterator[StreamDelta]],
) -> AsyncIterator[bytes]:
    created = now()
    choices_state = _CompletionChoices(n, echoes, num_logprobs)
    completion_tokens = 0
    cached: dict[int, int] = {}

    def usage() -> Usage:
        return make_usage(sum(prompt_lengths), completion_tokens, sum(cached.values()))

    async for p, delta in merge(streams):
        cached[p] = delta.num_cached_tokens
        choices = []
        for c in delta.outputs:
            completion_tokens += len(c.token_ids)
            index, text, logprobs = choices_state.text_and_logprobs(p, c)
            if not text and not c.finished:
                continue
            choices.append(CompletionChoice(index, text, logprobs, c.finish_reason, c.stop_reason))
        if choices:
            every = usage() if usage_mode == "every_chunk" else None
            yield sse(Completion(response_id, "text_completion", created, model, choices, every))
    if usage_mode != "none":
        yield sse(Completion(response_id, "text_completion", created, model, [], usage()))


async def completion_result(
    response_id: str,
    model: str,
    n: int,
    num_logprobs: int | None,
    echoes: list[str],
    prompt_lengths: list[int],
    streams: list[AsyncIterator[StreamDelta]],
) -> Completion:
    choices_state = _CompletionChoices(n, echoes, num_logprobs)
    texts: dict[int, list[str]] = {}
    logprobs: dict[int, CompletionLogprobs] = {}
    finals: dict[int, CompletionOutput] = {}
    completion_tokens = 0
    cached: dict[int, int] = {}
    async for p, delta in merge(streams):
        cached[p] = delta.num_cached_tokens
        for c in delta.outputs:
            completion_tokens += len(c.token_ids)
            index, text, piece = choices_state.text_and_logprobs(p, c)
            texts.setdefault(index, []).append(text)
            if piece is not None:
                merged = logprobs.setdefault(index, CompletionLogprobs())
                merged.tokens += piece.tokens
                merged.token_logprobs += piece.token_logprobs
                merged.top_logprobs += piece.top_logprobs
                merged.text_offset += piece.text_offset
            if c.finished:
                finals[index] = c
    choices = [
        CompletionChoice(
            i, "".join(texts[i]), logprobs.get(i), finals[i].finish_reason, finals[i].stop_reason
        )
        for i in sorted(finals)
    ]
    usage = make_usage(sum(prompt_lengths), completion_tokens, sum(cached.values()))
    return Completion(response_id, "text_completion", now(), model, choices, usage)
