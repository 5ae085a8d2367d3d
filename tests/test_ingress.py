"""The ingress's own logic, without Serve: request models, prompt tokenization, response shaping."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from pydantic import ValidationError

from cluster.errors import APIError
from cluster.prompts import INLINE_TOKENIZE_CHARS, PromptTokenizer
from cluster.protocol import ChatCompletionRequest, CompletionRequest
from cluster.responses import completion_events
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
        chunks = completion_events("c", "m", 1, 1, "none", ["Say: "], [3], [stream()])
        return [json.loads(e.removeprefix(b"data: ")) async for e in chunks]

    offsets = [o for e in asyncio.run(events()) for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [5, 8, 10, 14], "text_offset must continue across chunks, after the echo"


def test_completion_request_prompt_forms():
    assert CompletionRequest(prompt="a").prompts() == ["a"]
    assert CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
