"""OpenAI-compatible request schemas (responses: cluster/responses.py).

Requests are strict: an unknown field, or a known one we cannot honour (a non-text
response_format, suffix, ...), is a 400 with OpenAI's error body, never silently ignored. Fields
that change nothing about the answer are accepted, documented here and logged at debug level
(`ACCEPTED_WITHOUT_EFFECT`). Beyond OpenAI's fields, the sampling extras vLLM users know are
accepted (top_k, min_p, ...). Every bound comes from `replicas.sampling_params`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from replicas.sampling_params import (
    LogitBias,
    MaxTokens,
    MinP,
    MinTokens,
    NumChoices,
    NumLogprobs,
    Penalty,
    RepetitionPenalty,
    SamplingParams,
    Seed,
    StopStrings,
    Temperature,
    TokenId,
    TopK,
    TopP,
)

MAX_PROMPTS = 64  # prompts in one completions request
# Where a stream reports usage: nowhere, in a last chunk, or in every chunk (and the last).
UsageMode = Literal["none", "final", "every_chunk"]
# Fields clients send that change nothing about generation here: accepted, logged at debug.
#  user: an end-user id for the caller's abuse monitoring; store/metadata: OpenAI's stored
#  completions (nothing is stored here); service_tier: OpenAI's processing tiers (one tier here);
#  parallel_tool_calls: only meaningful with tools.
ACCEPTED_WITHOUT_EFFECT = ("user", "store", "metadata", "service_tier", "parallel_tool_calls")


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

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        """JSON can carry lone surrogates (\\ud800) that no tokenizer can encode: refuse them."""
        if not _encodable(data):
            raise ValueError("strings must be valid Unicode (found a lone surrogate)")
        return data

    def ignored_fields(self) -> list[str]:
        """Fields the client set that change nothing here (for a debug log line)."""
        return [f for f in ACCEPTED_WITHOUT_EFFECT if getattr(self, f, None) is not None]

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

    def usage_mode(self) -> UsageMode:
        return "none" if self.stream_options is None else self.stream_options.usage_mode()

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
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
            skip_special_tokens=self.skip_special_tokens,
        )


# --- completions -------------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: MaxTokens | None = 16
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart]
    # Reaches the chat template, which may render it (e.g. to tell speakers apart).
    name: str | None = None

    _text_only = field_validator("content", mode="before")(_text_parts_only)

    def as_template_message(self) -> dict[str, str]:
        """The shape chat templates expect; `developer` is OpenAI's newer name for `system`."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = None
    response_format: ResponseFormat | None = None
    # Passed to the chat template: templates of reasoning models read it, others ignore it.
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    # Accepted only when they ask for nothing: tools are not supported.
    tools: None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_kwargs(self) -> dict[str, str]:
        """Extra variables for the chat template."""
        return {} if self.reasoning_effort is None else {"reasoning_effort": self.reasoning_effort}
