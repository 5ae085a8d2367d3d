"""OpenAI-compatible request schemas (responses: cluster/responses.py).

Requests are strict: an unknown field, or a known one we cannot honour (suffix, best_of != n,
...), is a 400 with OpenAI's error body, never silently ignored. Fields that change nothing about
the answer are accepted, documented here and logged at debug level (`ACCEPTED_WITHOUT_EFFECT`).
Beyond OpenAI's fields, the sampling extras vLLM users know are accepted (top_k, min_p, ..., and
`structured_outputs`: {json | json_object | regex | choice | grammar}, vLLM's constrained
decoding). Every sampling bound comes from `replicas.sampling_params`.

Structured outputs: `response_format` (json_object, json_schema) or `structured_outputs` on
both endpoints, and on chat `tool_choice` "required" or a named function; each request maps to
at most one `StructuredOutputsParams` (`structured_outputs_params`), which the ingress compiles
(`replicas.structured_output.GrammarCompiler`) to refuse a bad one before any replica work.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from replicas.sampling_params import (
    LogitBias,
    MaxTokens,
    MaxTokensOrScoring,
    MinP,
    MinTokens,
    NumChoices,
    NumLogprobs,
    Penalty,
    RepetitionPenalty,
    SamplingParams,
    Seed,
    StopStrings,
    StructuredOutputsParams,
    Temperature,
    TokenId,
    TopK,
    TopP,
)

if TYPE_CHECKING:
    from cluster.tool_parsers import ToolParser

MAX_PROMPTS = 64  # prompts in one completions request
# Where a stream reports usage: nowhere, in a last chunk, or in every chunk (and the last).
UsageMode = Literal["none", "final", "every_chunk"]
# Fields clients send that change nothing about generation here: accepted, logged at debug.
#  user: an end-user id for the caller's abuse monitoring; store/metadata: OpenAI's stored
#  completions (nothing is stored here); service_tier: OpenAI's processing tiers (one tier here).
ACCEPTED_WITHOUT_EFFECT = ("user", "store", "metadata", "service_tier")
MAX_TOOLS = 128  # functions in one chat request (OpenAI's bound)
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


def _encodable(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_encodable(k) and _encodable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_encodable(v) for v in value)
    return True


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    # vLLM's extension: usage so far in every chunk (needs include_usage).
    continuous_usage_stats: bool = False

    def usage_mode(self) -> UsageMode:
        if not self.include_usage:
            return "none"
        return "every_chunk" if self.continuous_usage_stats else "final"


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: the schema the output must follow (always enforced, as
    OpenAI's `strict: true` is)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is given exactly when type is "json_schema"')
        return self

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema":
            schema = self.json_schema.schema_
            if schema is None:  # OpenAI allows it: any JSON object
                return StructuredOutputsParams(json_object=True)
            return StructuredOutputsParams(json=schema)
        return None


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions, mapped onto `SamplingParams`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    n: NumChoices = 1
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: StopStrings = Field(default_factory=list)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, LogitBias] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # vLLM extras
    top_k: TopK = 0
    min_p: MinP = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    min_tokens: MinTokens = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def ignored_fields(self) -> list[str]:
        """Fields the client set that change nothing here (for a debug log line)."""
        return [f for f in ACCEPTED_WITHOUT_EFFECT if getattr(self, f, None) is not None]

    def usage_mode(self) -> UsageMode:
        return "none" if self.stream_options is None else self.stream_options.usage_mode()

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        """JSON can carry lone surrogates (\\ud800) that no tokenizer can encode: refuse them."""
        if not _encodable(data):
            raise ValueError("strings must be valid Unicode (found a lone surrogate)")
        return data

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @model_validator(mode="after")
    def _one_output_constraint(self):
        formatted = self.response_format is not None and self.response_format.type != "text"
        if formatted and self.structured_outputs is not None:
            raise ValueError("give response_format or structured_outputs, not both")
        return self

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The constraint on the output, if any (compile it to validate it)."""
        if self.structured_outputs is not None:
            return self.structured_outputs
        return None if self.response_format is None else self.response_format.structured_outputs()

    @property
    def constraint_field(self) -> str:
        """The field an invalid constraint is reported under (OpenAI's error `param`)."""
        return "response_format" if self.structured_outputs is None else "structured_outputs"

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        structured_outputs: StructuredOutputsParams | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """`structured_outputs`: the request's constraint as the caller resolved it (chat's
        needs the tool parser); by default `structured_outputs_params()`."""
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            stop=self.stop,
            stop_token_ids=self.stop_token_ids or [],
            include_stop_str_in_output=self.include_stop_str_in_output,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            structured_outputs=structured_outputs or self.structured_outputs_params(),
        )


# --- completions -------------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    """Legacy completions. `echo` with `logprobs: k` also scores the prompt (OpenAI's way, used by
    evaluation harnesses): every prompt token's logprob (null for the first) and top k, before
    the generated ones. `max_tokens: 0` generates nothing, so it needs `echo` (the answer is
    the prompt) and `n: 1`."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: MaxTokensOrScoring | None = 16
    logprobs: NumLogprobs | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: None = Field(
        None, description="Not supported: insertion needs a fill-in-the-middle model."
    )

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and (
            not value or any(isinstance(p, list) and not p for p in value)
        ):
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and not isinstance(value[0], int) and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        return value

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self

    @model_validator(mode="after")
    def _scoring_only_echoes(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it needs echo: true (prompt scoring)")
        if self.max_tokens == 0 and self.n != 1:
            raise ValueError("max_tokens 0 (prompt scoring) needs n = 1")
        return self

    @property
    def prompt_logprobs(self) -> int | None:
        """How many top alternatives of each prompt token to return: echo with logprobs."""
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """The prompts of a batch request: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)


# --- chat completions --------------------------------------------------------------------------


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


def _text_parts_only(parts: object) -> object:
    """Content parts other than text (images, audio, files) are refused with what was sent."""
    if isinstance(parts, list):
        for i, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise ValueError(
                    f"content[{i}] is of type {kind!r}: this model reads text only; send the "
                    "content as a string or as parts of type 'text'"
                )
    return parts


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text of an object, as the model wrote it


class ToolCall(BaseModel):
    """A call the assistant made: in responses, and in assistant messages sent back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """A conversation turn: system/developer/user text, an assistant turn (text and/or
    `tool_calls`), or a `tool` result answering the call `tool_call_id`."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    # Reaches the chat template, which may render it (e.g. to tell speakers apart).
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None
    tool_call_id: str | None = None

    _text_only = field_validator("content", mode="before")(_text_parts_only)

    @model_validator(mode="after")
    def _fields_of_the_role(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("tool messages (and only they) have a tool_call_id")
        if self.content is None and self.tool_calls is None:
            raise ValueError(f"a {self.role} message needs content")
        return self

    def as_template_message(self) -> dict[str, Any]:
        """The shape chat templates expect: `developer` is OpenAI's newer name for `system`;
        call arguments as objects (templates print them with `tojson`)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": content or "",
        }
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _json_or_text(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # calls forced by tool_choice always follow `parameters`


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = None
    tools: Annotated[list[ChatTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Passed to the chat template: templates of reasoning models read it, others ignore it.
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self):
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tool function names must be unique")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        if self.forces_tool_call and super().structured_outputs_params() is not None:
            raise ValueError("a forced tool call cannot be combined with an output format")
        return self

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: "auto" with tools, "none" without."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    @property
    def may_call_tools(self) -> bool:
        """Whether the model sees the tools (and its output is parsed for calls)."""
        return bool(self.tools) and self.effective_tool_choice != "none"

    @property
    def constraint_field(self) -> str:
        return "tool_choice" if self.forces_tool_call else super().constraint_field

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them; none when the model may not call any."""
        if not self.may_call_tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def structured_outputs_params(
        self, tool_parser: type[ToolParser] | None = None
    ) -> StructuredOutputsParams | None:
        """As `SamplingFields`, and a forced tool call (`tool_choice` "required" or named) as
        the grammar of `tool_parser`'s call format (the model family's)."""
        if not self.forces_tool_call:
            return super().structured_outputs_params()
        if tool_parser is None:
            raise ValueError("a forced tool call needs the model's tool parser")
        functions = [tool.function for tool in self.tools]
        named = self.tool_choice.function.name if self.forces_named_call else None
        return tool_parser.grammar(functions, named, parallel=self.parallel_tool_calls is not False)

    @property
    def forces_named_call(self) -> bool:
        return isinstance(self.tool_choice, NamedToolChoice)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_kwargs(self) -> dict[str, str]:
        """Extra variables for the chat template."""
        return {} if self.reasoning_effort is None else {"reasoning_effort": self.reasoning_effort}
