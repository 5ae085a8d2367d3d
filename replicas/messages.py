"""What crosses the engine process's pipe, and what a replica reports: small typed structs.

The engine process sends one `StepDone` per step, holding only what is new for each generation
(token ids, raw logprobs, a finish reason): no text, no prompt. The replica process turns those
into text (replicas/output_processor.py). Everything here is msgspec-encoded (msgpack) on the
pipe; importing this module needs neither torch nor ray.
"""

from __future__ import annotations

from typing import Literal

import msgspec

ErrorKind = Literal["invalid", "too_long", "queue_full"]


class TokenLogprobs(msgspec.Struct, array_like=True, gc=False):
    """Log-probabilities of the model's raw distribution at one sampled position."""

    logprob: float  # of the sampled token
    rank: int  # 1 = the most likely token
    top_ids: list[int]
    top_logprobs: list[float]


class EngineOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one step added to one generation (`index` of the request's `n`)."""

    request_id: str
    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_token_id: int | None = None  # the stop token that ended it (not EOS)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    # Prompt token j's logprobs at j - 1 (the first token has none); in the first output only.
    prompt_logprobs: list[TokenLogprobs] | None = None
    error: str | None = None  # the step running it failed


class ReplicaStats(msgspec.Struct, kw_only=True):
    """One replica's load, as the router reads it (shipped through Serve as a dict)."""

    num_waiting: int
    num_running: int
    queued_prompt_tokens: int  # prompt tokens still to prefill, waiting and running
    free_blocks: int
    total_blocks: int
    block_size: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    requests_admitted: int
    tokens_generated: int  # sampled since the engine started
    time: float  # when the engine took it (time.time(): comparable across processes)
    engine_alive: bool = True

    def as_dict(self) -> dict:
        return msgspec.structs.asdict(self)

    @classmethod
    def from_dict(cls, stats: dict) -> ReplicaStats | None:
        """None for a replica that has not reported yet (Serve starts from an empty dict)."""
        return msgspec.convert(stats, cls) if stats else None


class MetricRecord(msgspec.Struct, array_like=True, gc=False):
    name: str
    value: float
    labels: dict[str, str] | None = None


class EngineInfo(msgspec.Struct):
    max_model_len: int
    block_size: int


# --- replica -> engine process ----------------------------------------------------------------


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: dict  # SamplingParams.model_dump(mode="json"), validated again in the engine


class AbortRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str


class FinishGeneration(msgspec.Struct, tag=True, array_like=True):
    """The replica found a stop string: end that generation (it already told its caller)."""

    request_id: str
    index: int


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


Command = AddRequest | AbortRequest | FinishGeneration | Shutdown


# --- engine process -> replica ----------------------------------------------------------------


class Ready(msgspec.Struct, tag=True, array_like=True):
    info: EngineInfo
    stats: ReplicaStats


class StartupFailed(msgspec.Struct, tag=True, array_like=True):
    error: str


class Added(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    stats: ReplicaStats
    error_kind: ErrorKind | None = None
    error: str | None = None


class CacheChanges(msgspec.Struct, array_like=True, gc=False):
    """Block hashes that entered and left the prefix cache since the last message."""

    stored: list[bytes]
    removed: list[bytes]


class StepDone(msgspec.Struct, tag=True, array_like=True):
    outputs: list[EngineOutput]
    stats: ReplicaStats
    metrics: list[MetricRecord]
    cache: CacheChanges | None = None


class StatsChanged(msgspec.Struct, tag=True, array_like=True):
    """After an abort or finish, which no step reports."""

    stats: ReplicaStats
    metrics: list[MetricRecord]
    cache: CacheChanges | None = None


class Died(msgspec.Struct, tag=True, array_like=True):
    error: str


Event = Ready | StartupFailed | Added | StepDone | StatsChanged | Died
