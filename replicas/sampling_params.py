"""How to pick tokens and when to stop, per request; the same fields vLLM users know.

Every bound is declared once here, as an annotated type, and reused by the OpenAI API models
(cluster/protocol.py): a value the API accepts is a value the engine accepts.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

MAX_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 512  # characters per stop sequence


def _stop_strings(value: list[str]) -> list[str]:
    if len(value) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
    if any(not s for s in value):
        raise ValueError("stop sequences must not be empty")
    if any(len(s) > MAX_STOP_LENGTH for s in value):
        raise ValueError(f"stop sequences are at most {MAX_STOP_LENGTH} characters")
    return value


def _as_list(value: object) -> object:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


NumChoices = Annotated[int, Field(ge=1, le=128)]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=0)]  # 0: off
MinP = Annotated[float, Field(ge=0, le=1)]
Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]  # what torch.Generator accepts
RepetitionPenalty = Annotated[float, Field(gt=0, le=10)]
Penalty = Annotated[float, Field(ge=-2, le=2)]  # presence and frequency
LogitBias = Annotated[float, Field(ge=-100, le=100)]
TokenId = Annotated[int, Field(ge=0)]
NumLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
MaxTokens = Annotated[int, Field(ge=1)]
# 0: no token is generated; the request only scores its prompt (`prompt_logprobs`).
MaxTokensOrScoring = Annotated[int, Field(ge=0)]
MinTokens = Annotated[int, Field(ge=0)]
# A string or a list of strings, at most MAX_STOP_SEQUENCES of at most MAX_STOP_LENGTH each.
StopStrings = Annotated[list[str], BeforeValidator(_as_list), AfterValidator(_stop_strings)]

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

    n: NumChoices = 1
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    min_p: MinP = 0.0
    seed: Seed | None = None
    repetition_penalty: RepetitionPenalty = 1.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[int, LogitBias] = Field(default_factory=dict)
    stop: StopStrings = Field(default_factory=list)
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    max_tokens: MaxTokensOrScoring | None = 16
    min_tokens: MinTokens = 0
    ignore_eos: bool = False
    logprobs: NumLogprobs | None = None
    # The logprob of every prompt token after the first (None for it), with this many top
    # alternatives; computed in the prefill's own forward pass.
    prompt_logprobs: NumLogprobs | None = None
    structured_outputs: StructuredOutputsParams | None = None
    skip_special_tokens: bool = True
    output_kind: OutputKind = OutputKind.CUMULATIVE

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
