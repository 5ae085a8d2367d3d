"""Structured outputs, tool calls and prompt scoring end to end through Ray Serve, with the
official `openai` client, on the tiny random Llama whose chat template shows tools (Hermes).

A random model pads JSON with whitespace and writes endless strings; where a test needs the
output to finish, a logit bias steers it (the grammar alone still decides what is valid), and
schemas bound their strings and numbers.
"""

from __future__ import annotations

import json
import re
import time
from typing import Literal

import httpx
import jsonschema
import pytest
from conftest import build_tiny_model, deploy
from openai import BadRequestError, OpenAI
from pydantic import BaseModel, ConfigDict, Field
from test_tool_calls import TOOLS, TOOLS_TEMPLATE, WEATHER
from transformers import AutoTokenizer

from replicas import LLM, SamplingParams
from replicas.tokenizer import render_chat

APP = "structured"
ENGINE = {
    "dtype": "float32",
    "device": "cpu",
    "num_threads": 1,
    "num_blocks": 256,
    "block_size": 8,
    "max_num_batched_tokens": 64,
    "max_model_len": 1024,
}
GREEDY = {"temperature": 0}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {"get_weather": WEATHER, "add": TOOLS[1]["function"]["parameters"]}


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")  # strict schemas allow no other keys
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    name: str = Field(max_length=12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_dir):
    """The tiny model, its tokenizer given a chat template that shows tools."""
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-tools"), smol_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TOOLS_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_url(serve_instance, model_dir):
    args = {
        "served_model_name": "tiny",
        "engine": {"model": str(model_dir), **ENGINE},
        "replicas": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
    }
    return deploy(serve_instance, APP, args)


@pytest.fixture(scope="module")
def client(base_url):
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def no_whitespace(tokenizer) -> dict[str, int]:
    """A logit bias that keeps the random model off whitespace-only tokens."""
    return {str(i): -100 for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()}


# --- structured outputs ----------------------------------------------------------------------


def test_parse_with_a_pydantic_model(client, no_whitespace):
    completion = client.chat.completions.parse(
        model="tiny",
        messages=[{"role": "user", "content": "Describe a pet."}],
        response_format=Pet,
        max_tokens=60,
        logit_bias=no_whitespace,
        **GREEDY,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Pet), choice.message.content


def test_json_schema_strict_and_json_object(client, no_whitespace, tokenizer):
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "days": {"type": "array", "items": {"enum": ["mon", "tue"]}, "maxItems": 3},
            "rain": {"type": "boolean"},
        },
        "required": ["city", "days", "rain"],
        "additionalProperties": False,
    }
    response = client.chat.completions.create(
        model="tiny",
        messages=USER,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "forecast", "schema": schema, "strict": True},
        },
        max_tokens=80,
        logit_bias=no_whitespace,
        **GREEDY,
    )
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)
    # Any object: quotes are made likely (strings close at once) and `}` next; unconstrained,
    # this bias writes quotes only.
    quote, close = tokenizer.convert_tokens_to_ids(['"', "}"])
    response = client.chat.completions.create(
        model="tiny",
        messages=USER,
        response_format={"type": "json_object"},
        max_tokens=40,
        logit_bias={**no_whitespace, str(quote): 20, str(close): 10},
        **GREEDY,
    )
    text = response.choices[0].message.content
    assert isinstance(json.loads(text), dict), text


def test_streaming_under_a_schema_equals_the_whole_answer(client, no_whitespace):
    request = dict(
        model="tiny",
        messages=[{"role": "user", "content": "A pet, please."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "pet", "schema": Pet.model_json_schema(), "strict": True},
        },
        max_tokens=60,
        logit_bias=no_whitespace,
        **GREEDY,
    )
    whole = client.chat.completions.create(**request).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **request))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    Pet.model_validate_json(streamed)
    assert streamed == whole
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_vllm_extras_on_completions(client):
    """`structured_outputs` as vLLM names it: choice, regex and grammar, here on completions."""
    choice = client.completions.create(
        model="tiny",
        prompt="The answer is",
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}},
        **GREEDY,
    )
    assert choice.choices[0].text in ("yes", "no", "maybe")
    regex = client.completions.create(
        model="tiny",
        prompt="Code:",
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}},
        **GREEDY,
    )
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", regex.choices[0].text), regex.choices[0].text
    grammar = client.completions.create(
        model="tiny",
        prompt="Pick:",
        max_tokens=10,
        extra_body={"structured_outputs": {"grammar": 'start: "a" | "b" "c"'}},
        **GREEDY,
    )
    assert grammar.choices[0].text in ("a", "bc")


def enum_object(num_properties: int) -> dict:
    """An object of `num_properties` enums of 300 values (as in test_structured_output.py)."""
    props = {f"k{i}": {"enum": [f"v{j}x{i}" for j in range(300)]} for i in range(num_properties)}
    return {"type": "object", "properties": props}


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


BAD_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}


@pytest.mark.parametrize(
    ("path", "fields", "param", "message"),
    [
        (
            "chat/completions",
            {"response_format": json_schema({"type": "no-such-type"})},
            "response_format",
            "no-such-type",
        ),
        ("completions", {"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "unclosed"),
        (
            "chat/completions",
            {"structured_outputs": {"grammar": "start: undefined_rule"}},
            "structured_outputs",
            "undefined_rule",
        ),
        (
            "chat/completions",
            {"tools": [BAD_TOOL], "tool_choice": "required"},
            "tool_choice",
            "type",
        ),
        # A lexer over llguidance's size bound: refused in bounded time, however slow to build.
        (
            "completions",
            {"response_format": json_schema(enum_object(300))},
            "response_format",
            "too big",
        ),
    ],
)
def test_bad_constraints_are_400_from_the_ingress(base_url, path, fields, param, message):
    """The ingress refuses them (its errors name the field; the engine's could not) with
    llguidance's message, in bounded time, and keeps serving."""
    body = {"max_tokens": 5, **fields}
    body.update({"messages": USER} if path.startswith("chat") else {"prompt": "x"})
    start = time.monotonic()
    response = httpx.post(f"{base_url}/v1/{path}", json=body, timeout=60)
    assert time.monotonic() - start < 5, "a constraint must be refused within the compile bound"
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert message in error["message"], error


NAMED_NOPE = {"type": "function", "function": {"name": "nope"}}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tools": TOOLS, "tool_choice": NAMED_NOPE}, "not in tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "output format",
        ),
        ({"tool_choice": "required"}, "needs tools"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "not both",
        ),
    ],
)
def test_tool_choices_combined_wrongly_are_400(base_url, fields, message):
    body = {"messages": USER, "max_tokens": 5, **fields}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


# --- tool calls ----------------------------------------------------------------------------------


def assemble(chunks) -> tuple[str, list[dict], str | None]:
    """Content, calls ({id, name, arguments}) and finish reason of a streamed chat choice,
    checking OpenAI's shape of the deltas on the way."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for piece in choice.delta.tool_calls or []:
                if piece.index not in calls:
                    assert piece.index == len(calls), "calls are numbered in order"
                    assert piece.id and piece.type == "function" and piece.function.name
                    calls[piece.index] = {"id": piece.id, "name": piece.function.name}
                    calls[piece.index]["arguments"] = piece.function.arguments or ""
                else:
                    assert piece.id is None and piece.function.name is None, "named once"
                    calls[piece.index]["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, list(calls.values()), finish


def plain(calls) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in calls or []]


def test_auto_parses_the_calls_a_model_writes(client):
    """With tool_choice auto the output is free; here a `choice` constraint makes the model
    write content and a call, which come back as `content` and `tool_calls`."""
    written = (
        "Let me look.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
        '\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2.5}}\n</tool_call>'
    )
    request = dict(
        model="tiny",
        messages=USER,
        tools=TOOLS,
        max_tokens=80,
        extra_body={"structured_outputs": {"choice": [written]}},
        **GREEDY,
    )
    choice = client.chat.completions.create(**request).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    assert plain(choice.message.tool_calls) == [
        ("get_weather", '{"city": "Paris", "unit": "celsius"}'),
        ("add", '{"a": 1, "b": 2.5}'),
    ]
    ids = [call.id for call in choice.message.tool_calls]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2
    content, calls, finish = assemble(client.chat.completions.create(stream=True, **request))
    assert content.strip() == "Let me look." and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == plain(choice.message.tool_calls)
    # Without a call in the text, the answer is its content, untouched.
    text = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, max_tokens=8, **GREEDY
    ).choices[0]
    assert text.message.tool_calls is None and text.finish_reason in ("length", "stop")
    assert text.message.content


@pytest.mark.parametrize("tool_choice", ["named", "required"])
def test_forced_calls_validate_and_stream_as_they_parse(client, tool_choice):
    forced = (
        {"type": "function", "function": {"name": "get_weather"}}
        if tool_choice == "named"
        else "required"
    )
    # Greedy, the random model picks `add` under "required", with a long integer.
    request = dict(
        model="tiny", messages=USER, tools=TOOLS, tool_choice=forced, max_tokens=200, **GREEDY
    )
    choice = client.chat.completions.create(**request).choices[0]
    # OpenAI: "stop" when the function was named, "tool_calls" when the model chose it.
    assert choice.finish_reason == ("stop" if tool_choice == "named" else "tool_calls")
    assert choice.message.content is None and choice.message.tool_calls
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    if tool_choice == "named":
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    content, calls, finish = assemble(client.chat.completions.create(stream=True, **request))
    assert [(c["name"], c["arguments"]) for c in calls] == plain(choice.message.tool_calls)
    assert not content.strip() and finish == choice.finish_reason


def test_a_tool_result_round_trip(client, tokenizer):
    """The call goes back as an assistant turn with its result as a `tool` message; both reach
    the model through the chat template."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice=named, max_tokens=120, **GREEDY
    )
    (call,) = first.choices[0].message.tool_calls
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call.model_dump(exclude_none=True)],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, max_tokens=5, **GREEDY
    )
    template_messages = [
        *USER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": json.loads(call.function.arguments),
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    rendered = render_chat(tokenizer, template_messages, tools=TOOLS)
    assert "<tool_response>" in rendered and '{"name": "get_weather", "arguments"' in rendered
    expected = len(tokenizer.encode(rendered, add_special_tokens=False))
    assert answer.usage.prompt_tokens == expected, "the call and its result were not rendered"
    assert answer.choices[0].message.content is not None


# --- prompt scoring ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(str(model_dir), dtype="float32", block_size=8)


PROMPT = "The capital of France is Paris, and café is French."


@pytest.mark.parametrize("max_tokens", [0, 1])
@pytest.mark.parametrize("as_ids", [False, True])
def test_echo_scores_every_prompt_token(client, tokenizer, offline, max_tokens, as_ids):
    ids = tokenizer.encode(PROMPT)
    response = client.completions.create(
        model="tiny",
        prompt=ids if as_ids else PROMPT,
        echo=True,
        logprobs=1,
        max_tokens=max_tokens,
        **GREEDY,
    )
    choice = response.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert choice.text.startswith(PROMPT) and response.usage.completion_tokens == max_tokens
    assert lp.text_offset[0] == 0
    assert all(a <= b for a, b in zip(lp.text_offset, lp.text_offset[1:], strict=False))
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        if "\ufffd" not in token:  # a piece of a character spells no text of its own
            assert choice.text[offset : offset + len(token)] == token, "offsets index the text"
    expected = offline.generate(
        [ids],
        SamplingParams(max_tokens=max_tokens, prompt_logprobs=1, logprobs=1, temperature=0),
        use_tqdm=False,
    )[0]
    for j in range(1, len(ids)):
        entry = expected.prompt_logprobs[j]
        assert lp.tokens[j] == entry[ids[j]].decoded_token
        assert lp.token_logprobs[j] == pytest.approx(entry[ids[j]].logprob, abs=1e-4), j
        (top,) = [e for e in entry.values() if e.rank == 1]
        assert list(lp.top_logprobs[j]) == [top.decoded_token]
        assert lp.top_logprobs[j][top.decoded_token] == pytest.approx(top.logprob, abs=1e-4)
    if max_tokens:
        (token,) = expected.outputs[0].token_ids
        generated = expected.outputs[0].logprobs[0][token]
        assert lp.tokens[-1] == generated.decoded_token
        assert lp.token_logprobs[-1] == pytest.approx(generated.logprob, abs=1e-4)
        assert lp.text_offset[-1] == len(PROMPT) and choice.text == PROMPT + expected.text


def test_streamed_scoring_equals_the_whole_answer(client):
    request = dict(model="tiny", prompt=PROMPT, echo=True, logprobs=2, max_tokens=3, **GREEDY)
    whole = client.completions.create(**request).choices[0]
    merged = {"text": "", "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(stream=True, **request):
        for choice in chunk.choices:
            merged["text"] += choice.text
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                merged[key] += getattr(choice.logprobs, key)
    assert merged["text"] == whole.text
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert merged[key] == getattr(whole.logprobs, key), key


def test_scoring_only_needs_echo_and_one_choice(client):
    with pytest.raises(BadRequestError, match="needs echo"):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    with pytest.raises(BadRequestError, match="n = 1"):
        client.completions.create(model="tiny", prompt="x", max_tokens=0, echo=True, n=2)
    echoed = client.completions.create(model="tiny", prompt="just this", max_tokens=0, echo=True)
    assert echoed.choices[0].text == "just this" and echoed.usage.completion_tokens == 0
    for bad_id in (-3, 2**40):  # refused by the engine before the ingress decodes them
        with pytest.raises(BadRequestError):
            client.completions.create(
                model="tiny", prompt=[5, bad_id], max_tokens=0, echo=True, logprobs=1
            )
