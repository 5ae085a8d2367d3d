"""The ingress's own logic, without Serve: request models, prompt tokenization, response shaping
(prompt scoring, tool calls)."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cluster.errors import APIError
from cluster.prompts import INLINE_TOKENIZE_CHARS, PromptTokenizer
from cluster.protocol import ChatCompletionRequest, CompletionRequest
from cluster.responses import Echo, completion_events
from replicas.outputs import CompletionOutput, Logprob, StreamDelta
from replicas.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


# --- request models -----------------------------------------------------------------------------


def chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], **fields}


def test_sampling_bounds_are_the_engines_bounds():
    """One source of truth: whatever the API accepts, SamplingParams accepts, and the reverse."""
    for field, value in [("temperature", 2.0), ("top_p", 1.0), ("min_p", 1.0), ("seed", 2**63)]:
        body = ChatCompletionRequest.model_validate(chat(**{field: value}))
        body.sampling_params(5, None)  # must not raise
    for field, value in [("temperature", 2.5), ("presence_penalty", 3), ("n", 129)]:
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate(chat(**{field: value}))
        with pytest.raises(ValidationError):
            SamplingParams(**{field: value})


def test_message_names_reach_the_chat_template():
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi", "name": "ada"}]}
    )
    assert body.messages[0].as_template_message() == {
        "role": "user",
        "content": "hi",
        "name": "ada",
    }


def test_fields_without_effect_are_accepted_and_named():
    body = ChatCompletionRequest.model_validate(
        chat(user="u1", store=False, metadata={"k": "v"}, service_tier="auto")
    )
    assert set(body.ignored_fields()) == {"user", "store", "metadata", "service_tier"}
    assert ChatCompletionRequest.model_validate(chat(reasoning_effort="low")).template_kwargs() == {
        "reasoning_effort": "low"
    }


def test_image_content_is_refused_with_what_to_change():
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {}}]
    with pytest.raises(ValidationError, match=r"content\[1\] is of type 'image_url'.*text only"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": parts}]})


# --- prompt tokenization ------------------------------------------------------------------------


def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing(tokenizer, monkeypatch):
    prompts = PromptTokenizer(tokenizer)
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized anyway"))
    huge = "word " * 400_000  # 2 MB
    with pytest.raises(APIError) as refused:
        asyncio.run(prompts.encode(huge, 8192, "prompt"))
    assert refused.value.status == 400 and refused.value.detail.code == "context_length_exceeded"
    assert "2000000 bytes" in refused.value.detail.message


def test_the_bound_never_refuses_a_prompt_that_fits(tokenizer):
    """The byte bound is a lower bound on the token count: every text at the limit passes."""
    prompts = PromptTokenizer(tokenizer)
    for text in ["a" * 5000, "\u4e2d" * 3000, " " * 4000, "🙂" * 2000, "x1 " * 2000]:
        count = len(tokenizer.encode(text))
        assert asyncio.run(prompts.encode(text, count, "prompt")) == tokenizer.encode(text)


def test_long_prompts_are_tokenized_off_the_event_loop(tokenizer, monkeypatch):
    prompts = PromptTokenizer(tokenizer)
    threads = []
    encode = tokenizer.encode

    def spy(*args, **kwargs):
        threads.append(threading.get_ident())
        return encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", spy)

    async def run() -> int:
        loop_thread = threading.get_ident()
        await prompts.encode("short", 100, "prompt")
        await prompts.encode("long " * INLINE_TOKENIZE_CHARS, 10**6, "prompt")
        return loop_thread

    loop_thread = asyncio.run(run())
    assert threads[0] == loop_thread, "a short prompt needs no thread hop"
    assert threads[1] != loop_thread, "a long prompt was tokenized on the event loop"


# --- response shaping ---------------------------------------------------------------------------


def delta_with_logprobs(tokens: list[tuple[int, str]], finished: bool = False) -> StreamDelta:
    output = CompletionOutput(
        index=0,
        text="".join(text for _, text in tokens),
        token_ids=[tid for tid, _ in tokens],
        finish_reason="length" if finished else None,
        logprobs=[{tid: Logprob(-0.5, 1, text)} for tid, text in tokens],
    )
    return StreamDelta([output], finished)


def test_streamed_completion_text_offsets_count_from_the_start_of_the_text():
    async def stream():
        yield delta_with_logprobs([(1, "Hel"), (2, "lo")])
        yield delta_with_logprobs([(3, " wor")])
        yield delta_with_logprobs([(4, "ld")], finished=True)

    async def events() -> list[dict]:
        chunks = completion_events("c", "m", 1, 1, "none", [Echo("Say: ")], [3], [stream()])
        return [json.loads(e.removeprefix(b"data: ")) async for e in chunks]

    offsets = [o for e in asyncio.run(events()) for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [5, 8, 10, 14], "text_offset must continue across chunks, after the echo"


def test_completion_request_prompt_forms():
    assert CompletionRequest(prompt="a").prompts() == ["a"]
    assert CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]


def test_scoring_only_is_echo_with_one_choice():
    with pytest.raises(ValidationError, match="needs echo"):
        CompletionRequest(prompt="a", max_tokens=0)
    with pytest.raises(ValidationError, match="n = 1"):
        CompletionRequest(prompt="a", max_tokens=0, echo=True, n=2)
    scoring = CompletionRequest(prompt="a", max_tokens=0, echo=True, logprobs=2)
    params = scoring.sampling_params(0, scoring.logprobs, prompt_logprobs=scoring.prompt_logprobs)
    assert (params.max_tokens, params.prompt_logprobs, params.logprobs) == (0, 2, 2)
    assert CompletionRequest(prompt="a", logprobs=2).prompt_logprobs is None, "echo only"


# --- prompt scoring -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="ab \n\u00e9\u4e2d\U0001f642<|>", max_size=30))
def test_a_spelled_prompt_offsets_index_its_text(tokenizer, text):
    """Each token begins where the text of the tokens before it ends (a token inside a
    character begins where the character does)."""
    ids = tokenizer.encode(text)
    spelled, offsets = asyncio.run(PromptTokenizer(tokenizer).spell(ids))
    assert spelled == tokenizer.decode(ids) and len(offsets) == len(ids)
    for i, offset in enumerate(offsets):
        before = tokenizer.decode(ids[:i]).rstrip("\ufffd")
        assert offset == len(before), f"token {i} of {ids}"


def scored_delta(
    prompt: list[int], generated: list[tuple[int, str]], finished: bool
) -> StreamDelta:
    """A replica's first delta of a scored prompt: token t has logprob -t/10, and token t + 1
    is the top alternative (logprob -0.05) unless t is."""
    entries = [None] + [
        {t: Logprob(-t / 10, 2, f"<{t}>"), t + 1: Logprob(-0.05, 1, f"<{t + 1}>")}
        for t in prompt[1:]
    ]
    delta = delta_with_logprobs(generated, finished)
    delta.prompt_logprobs = entries
    return delta


def test_echoed_prompts_lead_the_logprobs_streamed_or_whole():
    from cluster.responses import completion_result

    echo = Echo("<1><2><3>", [1, 2, 3], [0, 3, 6], "<1>")

    def streams():
        async def stream():
            yield scored_delta([1, 2, 3], [(7, "ab")], finished=False)
            yield delta_with_logprobs([(8, "c")], finished=True)

        return [stream()]

    async def whole() -> dict:
        result = await completion_result("c", "m", 1, 1, [echo], [3], streams())
        return json.loads(msgspec.json.encode(result))["choices"][0]

    async def streamed() -> list[dict]:
        chunks = completion_events("c", "m", 1, 1, "none", [echo], [3], streams())
        return [json.loads(e.removeprefix(b"data: ")) async for e in chunks]

    choice = asyncio.run(whole())
    assert choice["text"] == "<1><2><3>abc"
    assert choice["logprobs"] == {
        "tokens": ["<1>", "<2>", "<3>", "ab", "c"],
        "token_logprobs": [None, -0.2, -0.3, -0.5, -0.5],
        "top_logprobs": [None, {"<3>": -0.05}, {"<4>": -0.05}, {"ab": -0.5}, {"c": -0.5}],
        "text_offset": [0, 3, 6, 9, 11],
    }
    pieces = [e["choices"][0] for e in asyncio.run(streamed())]
    assert "".join(p["text"] for p in pieces) == choice["text"]
    for key in choice["logprobs"]:
        assert [v for p in pieces for v in p["logprobs"][key]] == choice["logprobs"][key], key


# --- tool calls ---------------------------------------------------------------------------------

# Calls between content; the last characters could begin a call, so a stream holds them back
# until the end.
CALLS_TEXT = (
    'Sure.<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n'
    '<tool_call>{"name": "neg", "arguments": {"x": -2}}</tool_call> Bye <tool'
)


def text_stream(text: str, cuts: list[int], finish_reason: str):
    async def stream():
        points = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
        pieces = [text[a:b] for a, b in itertools.pairwise(points)]
        for i, piece in enumerate(pieces):
            done = i == len(pieces) - 1
            output = CompletionOutput(0, piece, [i], finish_reason if done else None)
            yield StreamDelta([output], done)

    return stream()


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 200), max_size=10))
def test_streamed_tool_calls_assemble_to_the_parsed_ones(cuts):
    from cluster.responses import ToolUse, chat_events, chat_result
    from cluster.tool_parsers import HermesToolParser

    tools = ToolUse(HermesToolParser, named=False)

    async def run():
        result = await chat_result("r", "m", None, 5, text_stream(CALLS_TEXT, [], "stop"), tools)
        pieces = text_stream(CALLS_TEXT, cuts, "stop")
        events = chat_events("r", "m", 1, None, "none", 5, pieces, tools)
        return result, [json.loads(e.removeprefix(b"data: ")) async for e in events]

    result, events = asyncio.run(run())
    (choice,) = result.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure.\n Bye <tool"
    expected = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert expected == [("add", '{"a": 1}'), ("neg", '{"x": -2}')]
    content, calls, finish = "", {}, None
    for event in events:
        for c in event["choices"]:
            content += c["delta"].get("content") or ""
            for piece in c["delta"].get("tool_calls", []):
                if "id" in piece:
                    assert piece["type"] == "function" and piece["function"]["name"]
                    calls[piece["index"]] = [piece["function"]["name"], ""]
                calls[piece["index"]][1] += piece["function"].get("arguments", "")
            finish = c.get("finish_reason") or finish
    assert content == "Sure.\n Bye <tool" and finish == "tool_calls"
    assert [tuple(c) for c in calls.values()] == expected


def test_tool_finish_reasons_and_plain_text():
    from cluster.responses import ToolUse, chat_result
    from cluster.tool_parsers import HermesToolParser

    def finish(text: str, reason: str, named: bool) -> tuple[str, object]:
        tools = ToolUse(HermesToolParser, named=named)
        stream = text_stream(text, [], reason)
        (choice,) = asyncio.run(chat_result("r", "m", None, 5, stream, tools)).choices
        return choice.finish_reason, choice.message

    assert finish(CALLS_TEXT, "stop", named=True)[0] == "stop", "OpenAI: a named call stops"
    reason, message = finish(CALLS_TEXT[:40], "length", named=False)
    assert reason == "length" and message.content == CALLS_TEXT[:40] and not message.tool_calls
    reason, message = finish("  just words\n", "stop", named=False)
    assert reason == "stop" and message.content == "  just words\n", "text stays untouched"


def test_streams_keep_the_logprobs_of_tokens_whose_text_is_held_back():
    """A token may add no text yet (half a character, a possible stop string): its logprob
    still streams, so that the pieces add up to the whole answer."""
    from cluster.responses import chat_events

    def stream():
        async def gen():
            yield delta_with_logprobs([(1, "Hel")])
            yield delta_with_logprobs([(2, "")])
            yield delta_with_logprobs([(3, "lo")], finished=True)

        return gen()

    async def completions() -> list[dict]:
        chunks = completion_events("c", "m", 1, 1, "none", [Echo("")], [3], [stream()])
        return [json.loads(e.removeprefix(b"data: ")) async for e in chunks]

    async def chat() -> list[dict]:
        chunks = chat_events("c", "m", 1, 1, "none", 3, stream())
        return [json.loads(e.removeprefix(b"data: ")) async for e in chunks]

    tokens = [t for e in asyncio.run(completions()) for t in e["choices"][0]["logprobs"]["tokens"]]
    assert tokens == ["Hel", "", "lo"]
    entries = [
        entry["token"]
        for e in asyncio.run(chat())
        for c in e["choices"]
        for entry in (c.get("logprobs") or {"content": []})["content"]
    ]
    assert entries == ["Hel", "", "lo"]
