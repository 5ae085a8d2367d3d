"""Tool calls: parsing each model family's format (whole and streamed), the grammars that force a
call for any model, the request models, and tools through chat templates."""

from __future__ import annotations

import json

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cluster.protocol import ChatCompletionRequest, ChatMessage, ResponseFormat
from cluster.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    ToolParser,
    tool_parser_for,
)
from replicas import LLM, SamplingParams
from replicas.structured_output import GrammarCompiler
from replicas.tokenizer import render_chat, supports_tools

# A Qwen 2.5-style template, cut down: tools in the system turn, calls in <tool_call> tags,
# results as <tool_response> user turns.
TOOLS_TEMPLATE = """
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
For each call, return <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "number"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}},
]


def stream(parser_class: type[ToolParser], chunks: list[str]) -> tuple[str, dict[int, dict]]:
    """Feed `chunks`; return the content and, per call index, its header and arguments."""
    parser = parser_class()
    content = ""
    calls: dict[int, dict] = {}
    for delta in [*(parser.feed(c) for c in chunks), parser.finish()]:
        content += delta.content
        for piece in delta.tool_calls:
            if piece.index not in calls:
                assert piece.id and piece.name, "a call's first delta names it"
                assert piece.index == len(calls), "calls are numbered in order"
                calls[piece.index] = {"name": piece.name, "arguments": ""}
            else:
                assert piece.id is None and piece.name is None, "only the first delta names it"
            calls[piece.index]["arguments"] += piece.arguments
    return content, calls


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
calls_strategy = st.lists(
    st.tuples(
        st.from_regex(r"[a-z_]{1,10}", fullmatch=True),
        st.dictionaries(st.text(max_size=6), json_values, max_size=3),
        st.sampled_from([None, 2]),  # json.dumps indent: compact or pretty
    ),
    max_size=3,
)
content_text = st.text(alphabet="ab <>{}\n\"'", max_size=12).filter(
    lambda t: "<tool_call>" not in t
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=content_text,
    calls=calls_strategy,
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_hermes_streams_the_calls_it_parses(before, calls, cuts):
    text = before + "\n".join(
        f"<tool_call>\n{json.dumps({'name': n, 'arguments': a}, indent=i)}\n</tool_call>"
        for n, a, i in calls
    )
    parsed = HermesToolParser.parse(text)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        (n, a) for n, a, _ in calls
    ]
    assert parsed.content == (before.strip() or None)
    content, streamed = stream(HermesToolParser, split(text, cuts))
    assert content.strip() == (parsed.content or "")
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == [
        (c.name, c.arguments) for c in parsed.tool_calls
    ], "streamed arguments must concatenate to the parsed ones"


@settings(max_examples=100, deadline=None)
@given(
    tag=st.booleans(),
    calls=calls_strategy.filter(bool),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_llama3_json_streams_the_calls_it_parses(tag, calls, cuts):
    body = "; ".join(json.dumps({"name": n, "parameters": a}, indent=i) for n, a, i in calls)
    text = ("<|python_tag|>" if tag else "  ") + body
    parsed = Llama3JsonToolParser.parse(text)
    assert parsed.content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        (n, a) for n, a, _ in calls
    ]
    content, streamed = stream(Llama3JsonToolParser, split(text, cuts))
    assert content.strip() == ""
    assert [c["arguments"] for c in streamed.values()] == [c.arguments for c in parsed.tool_calls]


def test_what_is_not_a_call_stays_content():
    for text in [
        "plain answer",
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"foo": 1}</tool_call> and more',
        '<tool_call>{"name": "f", "arguments": {"a": 1}',  # cut short by max_tokens
    ]:
        assert HermesToolParser.parse(text).content == text
        assert HermesToolParser.parse(text).tool_calls == []
    content, calls = stream(HermesToolParser, ["x < y and ", "<tool", "_cal", "l> no call"])
    assert content == "x < y and <tool_call>no call" and not calls
    for text in ["Hello {", 'The JSON is {"name": "x"}', '{"name": "x", "parameters": {']:
        parsed = Llama3JsonToolParser.parse(text)
        assert parsed.content == text and parsed.tool_calls == []
    # Arguments some models write as a JSON string are decoded.
    parsed = HermesToolParser.parse('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}')
    assert parsed.tool_calls[0].arguments == '{"a": 1}'


def test_parser_is_chosen_by_the_model_family():
    assert tool_parser_for(TOOLS_TEMPLATE) is HermesToolParser
    llama = '{{- \'<|python_tag|>\' }} ... {"name": function name, "parameters": ...}'
    assert tool_parser_for(llama) is Llama3JsonToolParser
    assert tool_parser_for(None, "qwen2") is HermesToolParser
    assert tool_parser_for("{{ messages }}") is HermesToolParser  # the default format


def test_parsed_output_in_openai_shapes():
    parsed = HermesToolParser.parse('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    message = json.loads(msgspec.json.encode(parsed.message()))
    assert message["role"] == "assistant" and message["content"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "add", "arguments": '{"a": 1}'}
    parser = HermesToolParser()
    first = parser.feed('<tool_call>{"name": "add", "arguments": {"a"').message()
    assert first.tool_calls[0].type == "function" and first.tool_calls[0].function.name == "add"


# --- forced calls: grammars ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tool_llm(tiny_dir):
    llm = LLM(str(tiny_dir), dtype="float32", block_size=4, max_num_seqs=32)
    llm.get_tokenizer().chat_template = TOOLS_TEMPLATE
    return llm


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS,
        **fields,
    )


@pytest.mark.parametrize("parser_class", [HermesToolParser, Llama3JsonToolParser])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_calls_always_validate_even_for_random_weights(tool_llm, parser_class, choice):
    tool_choice = {"type": "function", "function": {"name": "add"}} if choice == "named" else choice
    body = request(tool_choice=tool_choice)
    spec = body.structured_outputs_params(parser_class)
    prompt = render_chat(
        tool_llm.get_tokenizer(),
        [m.as_template_message() for m in body.messages],
        tools=body.template_tools(),
    )
    params = [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=150, structured_outputs=spec)
        for seed in range(12)
    ]
    outputs = tool_llm.generate([prompt] * len(params), params, use_tqdm=False)
    schemas = {"get_weather": WEATHER, "add": ADD}
    finished = 0
    for out in outputs:
        if out.finish_reason == "length":
            continue
        finished += 1
        parsed = parser_class.parse(out.text)
        assert parsed.tool_calls, f"no call parsed from {out.text!r}"
        if choice == "named":
            assert [c.name for c in parsed.tool_calls] == ["add"]
        for call in parsed.tool_calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    assert finished >= len(outputs) // 2, f"only {finished} of {len(outputs)} finished"


def test_a_tool_result_round_trip(tool_llm):
    """Forced call -> parsed -> sent back with its result -> the model answers."""
    tokenizer = tool_llm.get_tokenizer()
    first = request(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    prompt = render_chat(
        tokenizer, [m.as_template_message() for m in first.messages], tools=first.template_tools()
    )
    spec = first.structured_outputs_params(HermesToolParser)
    out = tool_llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=100, structured_outputs=spec)
    )[0]
    (call,) = HermesToolParser.parse(out.text).tool_calls
    follow_up = ChatCompletionRequest(
        messages=[
            *first.messages,
            {"role": "assistant", "tool_calls": [{"id": call.id, "function": call.__dict__}]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
        ],
        tools=TOOLS,
    )
    messages = [m.as_template_message() for m in follow_up.messages]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == json.loads(call.arguments)
    text = render_chat(tokenizer, messages, tools=follow_up.template_tools())
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {call.arguments}}}' in text
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in text
    assert '"name": "add"' in text, "the tool list reaches the model"
    answer = tool_llm.generate(
        text, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False
    )[0]
    assert len(answer.token_ids) == 5


def test_templates_without_tools_get_them_as_text(smol_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    assert not supports_tools(tokenizer)
    messages = [
        {"role": "user", "content": "Add 1 and 2."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "function": {"name": "add", "arguments": {"a": 1}}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    text = render_chat(tokenizer, messages, tools=TOOLS)
    assert "<tools>" in text and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n3\n</tool_response>" in text


# --- request models ------------------------------------------------------------------------------


def test_request_models_refuse_inconsistent_tool_use():
    with pytest.raises(ValidationError, match="tool_choice needs tools"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tool_choice="required")
    with pytest.raises(ValidationError, match="not in tools"):
        request(tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValidationError, match="output format"):
        request(tool_choice="required", response_format={"type": "json_object"})
    with pytest.raises(ValidationError, match="not both"):
        request(response_format={"type": "json_object"}, structured_outputs={"regex": "a"})
    with pytest.raises(ValidationError):
        ChatMessage(role="tool", content="3")  # no tool_call_id
    with pytest.raises(ValidationError):
        ChatMessage(
            role="user", tool_calls=[{"id": "c", "function": {"name": "f", "arguments": "{}"}}]
        )
    with pytest.raises(ValidationError):
        ResponseFormat(type="json_schema")  # no schema given
    assert request().effective_tool_choice == "auto"
    assert request(tool_choice="none").template_tools() is None
    with pytest.raises(ValueError, match="tool parser"):
        request(tool_choice="required").sampling_params(16, None)


def test_response_formats_map_to_structured_outputs(tiny_dir):
    from openai.lib._parsing._completions import type_to_response_format_param
    from pydantic import BaseModel
    from transformers import AutoTokenizer

    class Person(BaseModel):
        name: str
        age: int

    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(tiny_dir), 49152, [2])
    openai_format = type_to_response_format_param(Person)  # what client.chat...parse sends
    body = request(response_format=openai_format)
    spec = body.structured_outputs_params()
    assert spec.json_ == openai_format["json_schema"]["schema"]
    compiler.compile(spec)
    assert body.sampling_params(16, None).structured_outputs == spec
    assert request(response_format={"type": "json_object"}).structured_outputs_params().json_object
    assert request(response_format={"type": "text"}).structured_outputs_params() is None
    extra = request(structured_outputs={"choice": ["a", "b"]}).structured_outputs_params()
    assert extra.choice == ["a", "b"]
    named = request(tool_choice={"type": "function", "function": {"name": "add"}})
    grammar = named.structured_outputs_params(HermesToolParser)
    compiler.compile(grammar)
    assert '"const": "add"' in grammar.grammar and "get_weather" not in grammar.grammar
