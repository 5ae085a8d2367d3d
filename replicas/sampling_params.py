"""How to pick tokens and when to stop, per request; the same fields vLLM users know.

Every bound is declared once here, as an annotated type, and reused by the OpenAI API models
(cluster/protocol.py): a value the API accepts is a value the engine accepts.
"""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

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
MinTokens = Annotated[int, Field(ge=0)]
# A string or a list of strings, at most MAX_STOP_SEQUENCES of at most MAX_STOP_LENGTH each.
StopStrings = Annotated[list[str], BeforeValidator(_as_list), AfterValidator(_stop_strings)]


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
    max_tokens: MaxTokens | None = 16
    min_tokens: MinTokens = 0
    ignore_eos: bool = False
    logprobs: NumLogprobs | None = None
    skip_special_tokens: bool = True
    output_kind: OutputKind = OutputKind.CUMULATIVE

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
