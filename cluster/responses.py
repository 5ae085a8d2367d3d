"""OpenAI response bodies and SSE events, built from the replicas' `StreamDelta`s.

Response types are msgspec structs: a streamed token costs one small struct and one `encode`,
not a pydantic model and its validation. Streams (`*_events`) yield ready SSE bytes; results
(`*_result`) return one JSON body.

Chat with tools (`ToolUse`) runs each choice's text through the model family's tool parser:
whole for a result, piece by piece (one parser per choice) for a stream. Completions with `echo`
and `logprobs` put the prompt's logprobs (the replica's first delta) before the generated ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from replicas.outputs import CompletionOutput, Logprob, PromptLogprobs, StreamDelta

if TYPE_CHECKING:
    from cluster.tool_parsers import ToolParser

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


@dataclass(frozen=True)
class Echo:
    """What a completions choice repeats before its own text (`echo`): the prompt; and, when the
    prompt is scored too (`echo` with `logprobs`), its tokens, where each begins in `text`, and
    the text of the first one (which has no logprob)."""

    text: str
    token_ids: list[int] | None = None
    text_offset: list[int] | None = None
    first_token: str = ""


NO_ECHO = Echo("")


def prompt_completion_logprobs(
    echo: Echo, entries: PromptLogprobs | None, n: int
) -> CompletionLogprobs:
    """OpenAI's logprobs of an echoed prompt: null for its first token, then each token's."""
    if entries is None or len(entries) != len(echo.token_ids):
        raise RuntimeError("the replica sent no logprobs for the prompt")
    out = CompletionLogprobs([echo.first_token], [None], [None], list(echo.text_offset))
    for token_id, entry in zip(echo.token_ids[1:], entries[1:], strict=True):
        chosen = entry[token_id]
        out.tokens.append(chosen.decoded_token)
        out.token_logprobs.append(chosen.logprob)
        out.top_logprobs.append({lp.decoded_token: lp.logprob for lp in top_entries(entry, n)})
    return out


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


@dataclass(frozen=True)
class ToolUse:
    """A chat request whose model may call tools: the model family's parser, and whether
    `tool_choice` named the function (OpenAI then finishes with "stop", not "tool_calls")."""

    parser: type[ToolParser]
    named: bool

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        """A turn that ended ("stop") after calls ends with "tool_calls" (auto, required)."""
        return "tool_calls" if called and reason == "stop" and not self.named else reason

    def message(self, text: str) -> tuple[AssistantMessage, bool]:
        """A whole output as OpenAI's message, and whether it holds calls; text without a
        (well-formed) call stays content, untouched."""
        parsed = self.parser.parse(text)
        if not parsed.tool_calls:
            return AssistantMessage(content=text), False
        return parsed.message(), True


class _ToolCallStreams:
    """One streaming tool parser per choice, fed each text delta as it comes."""

    def __init__(self, tools: ToolUse) -> None:
        self.tools = tools
        self.parsers: dict[int, ToolParser] = {}

    def delta(self, c: CompletionOutput) -> tuple[DeltaMessage | None, str | None]:
        """The OpenAI delta of a choice's new text (None: nothing to send yet), and its
        finish reason."""
        parser = self.parsers.get(c.index)
        if parser is None:
            parser = self.parsers[c.index] = self.tools.parser()
        parsed = parser.feed(c.text)
        if not c.finished:
            return (parsed.message() if parsed else None), None
        tail = parser.finish()
        parsed.content += tail.content
        parsed.tool_calls += tail.tool_calls
        return parsed.message(), self.tools.finish_reason(c.finish_reason, parser.called)


async def chat_events(
    response_id: str,
    model: str,
    n: int,
    top_logprobs: int | None,
    usage_mode: str,
    prompt_tokens: int,
    stream: AsyncIterator[StreamDelta],
    tools: ToolUse | None = None,
) -> AsyncIterator[bytes]:
    """SSE chunks of a chat completion: the role first, then one chunk per replica message.
    With `tools`, calls in the text stream as OpenAI's tool-call deltas."""
    created = now()
    tool_streams = None if tools is None else _ToolCallStreams(tools)

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
            # Nothing to send, unless tokens whose text is held back have logprobs.
            if tool_streams is None:
                if not c.text and not c.finished and (top_logprobs is None or not c.token_ids):
                    continue
                message, finish_reason = DeltaMessage(content=c.text), c.finish_reason
            else:
                message, finish_reason = tool_streams.delta(c)
                if message is None:
                    if top_logprobs is None or not c.token_ids:
                        continue
                    message = DeltaMessage()
            logprobs = None
            if top_logprobs is not None:
                logprobs = ChatLogprobs(chat_logprobs(c, top_logprobs))
            choices.append(
                ChatStreamChoice(c.index, message, logprobs, finish_reason, c.stop_reason)
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
    tools: ToolUse | None = None,
) -> ChatCompletion:
    """A whole chat completion; with `tools`, each choice's calls parsed into `tool_calls`."""
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
    choices = []
    for i in sorted(finals):
        text, finish_reason = "".join(texts[i]), finals[i].finish_reason
        if tools is None:
            message = AssistantMessage(content=text)
        else:
            message, called = tools.message(text)
            finish_reason = tools.finish_reason(finish_reason, called)
        choices.append(
            ChatChoice(
                index=i,
                message=message,
                logprobs=None if top_logprobs is None else ChatLogprobs(logprobs.get(i, [])),
                finish_reason=finish_reason,
                stop_reason=finals[i].stop_reason,
            )
        )
    usage = make_usage(prompt_tokens, completion_tokens, cached)
    return ChatCompletion(response_id, "chat.completion", now(), model, choices, usage)


# --- completions ----------------------------------------------------------------------------


class _CompletionChoices:
    """Per choice of a completions request (prompt p, sample i -> index p * n + i): where its
    text stands, for `text_offset`, and whether its echo was sent; per prompt, its logprobs
    (in the first delta of its stream) when it is echoed and scored."""

    def __init__(self, n: int, echoes: list[Echo], num_logprobs: int | None) -> None:
        self.n = n
        self.echoes = echoes
        self.num_logprobs = num_logprobs
        self.offsets: dict[int, int] = {}
        self.prompt_logprobs: dict[int, PromptLogprobs] = {}

    def text_and_logprobs(
        self, prompt: int, c: CompletionOutput
    ) -> tuple[int, str, CompletionLogprobs | None]:
        index = prompt * self.n + c.index
        text = c.text
        echo = None
        if index not in self.offsets:  # the choice's first piece: its echo goes first
            echo = self.echoes[prompt]
            text = echo.text + text
            self.offsets[index] = len(echo.text)
        logprobs = None
        if self.num_logprobs is not None:
            if echo is not None and echo.token_ids is not None:
                entries = self.prompt_logprobs.get(prompt)
                logprobs = prompt_completion_logprobs(echo, entries, self.num_logprobs)
            else:
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
    echoes: list[Echo],
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
        if delta.prompt_logprobs is not None:  # a scored prompt's first delta
            choices_state.prompt_logprobs[p] = delta.prompt_logprobs
        choices = []
        for c in delta.outputs:
            completion_tokens += len(c.token_ids)
            index, text, logprobs = choices_state.text_and_logprobs(p, c)
            if not text and not c.finished and not (logprobs and logprobs.tokens):
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
    echoes: list[Echo],
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
        if delta.prompt_logprobs is not None:  # a scored prompt's first delta
            choices_state.prompt_logprobs[p] = delta.prompt_logprobs
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
