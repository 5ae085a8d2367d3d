"""What the engine hands back per request, shaped like vLLM's outputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None  # None where the engine hands out ids only (prompt logprobs)


# Per prompt token: {its id: its Logprob, and the top alternatives'}; None for the first token.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One of a request's `n` generations: cumulative, or only what is new (`OutputKind.DELTA`)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # With `prompt_logprobs`: in every cumulative output, in the first delta (`OutputKind.DELTA`).
    prompt_logprobs: PromptLogprobs | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # the step running this request failed; the request is over

    # Shortcuts to the first generation, for the common n == 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


def merge_deltas(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive delta outputs of a request as one, for streams that send less often."""
    merged = {c.index: c for c in first.outputs}
    for c in then.outputs:
        prev = merged.get(c.index)
        if prev is not None:
            c = CompletionOutput(
                index=c.index,
                text=prev.text + c.text,
                token_ids=prev.token_ids + c.token_ids,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                logprobs=None if prev.logprobs is None else prev.logprobs + (c.logprobs or []),
                cumulative_logprob=c.cumulative_logprob,
            )
        merged[c.index] = c
    return RequestOutput(
        request_id=then.request_id,
        prompt=then.prompt,
        prompt_token_ids=then.prompt_token_ids,
        outputs=[merged[i] for i in sorted(merged)],
        finished=then.finished,
        num_cached_tokens=then.num_cached_tokens,
        prompt_logprobs=first.prompt_logprobs or then.prompt_logprobs,
        metrics=then.metrics,
        error=then.error,
    )
