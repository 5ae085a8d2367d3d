"""How to pick tokens and when to stop, per request; the same fields vLLM users know."""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LOGPROBS = 20
MAX_CHOICES = 1024  # alternatives in one `choice` constraint
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


class StructuredOutputsParams(BaseModel):
    """Constrain the output to a grammar: exactly one of `json` (a JSON schema, as a dict or its
    text), `json_object` (any JSON object), `regex`, `choice` (one of these strings) or `grammar`
    (Lark, or GBNF/EBNF, as llguidance reads them). Named and shaped as vLLM's."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    grammar: str | None = None
    # JSON only: no whitespace between tokens (vLLM's name). Models that pad JSON with endless
    # newlines under a grammar finish with it.
    disable_any_whitespace: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputsParams:
        kinds = [k for k in STRUCTURED_KINDS if self.get(k) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError(
                "structured outputs take exactly one of json, json_object, regex, choice, "
                f"grammar (got {', '.join(kinds) or 'none'})"
            )
        return self

    def get(self, kind: str) -> Any:
        """The value of one constraint kind (`json` reads the aliased field)."""
        return self.json_ if kind == "json" else getattr(self, kind)

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if self.get(k) not in (None, False))


class OutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every output holds all text so far
    DELTA = "delta"  # every output holds only what is new (streaming)
    FINAL_ONLY = "final_only"  # one output, when the request finishes (offline)


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n: Annotated[int, Field(ge=1, le=128)] = 1
    temperature: Annotated[float, Field(ge=0, le=100)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0  # 0: off
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None  # what torch accepts
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] = Field(default_factory=dict)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    # 0: no token is generated; the request only scores its prompt (`prompt_logprobs`).
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    # The logprob of every prompt token after the first (None for it), with this many top
    # alternatives; computed in the prefill's own forward pass.
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    skip_special_tokens: bool = True
    output_kind: OutputKind = OutputKind.CUMULATIVE

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _scoring_is_one_stream(self) -> SamplingParams:
        if self.max_tokens == 0 and self.n != 1:
            raise ValueError("max_tokens 0 (prompt scoring only) needs n = 1")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
