"""What callers read per request, shaped like vLLM's outputs; and its lean form on the wire.

`RequestOutput` is the offline API's result. A Serve replica streams `StreamDelta`s instead:
only the new text, tokens and logprobs of each generation, never the prompt again, encoded with
msgspec (`encode_delta` / `decode_delta`) so each hop handles bytes, not pickled objects.
"""

from __future__ import annotations

import msgspec


class Logprob(msgspec.Struct, array_like=True, gc=False):
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str


# Per prompt token: {its id: its Logprob, and the top alternatives'}; None for the first token.
PromptLogprobs = list[dict[int, Logprob] | None]


class CompletionOutput(msgspec.Struct, array_like=True, omit_defaults=True):
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


class RequestOutput(msgspec.Struct, omit_defaults=True):
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # With `prompt_logprobs`: in every cumulative output, in the first delta (`OutputKind.DELTA`).
    prompt_logprobs: PromptLogprobs | None = None
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


class StreamDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    """What a replica streams to the ingress per message: a `RequestOutput` without the prompt."""

    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # in the first delta only


_encoder = msgspec.msgpack.Encoder()
_delta_decoder = msgspec.msgpack.Decoder(StreamDelta)


def encode_delta(output: RequestOutput) -> bytes:
    return _encoder.encode(
        StreamDelta(
            output.outputs, output.finished, output.num_cached_tokens, output.prompt_logprobs
        )
    )


def decode_delta(data: bytes) -> StreamDelta:
    return _delta_decoder.decode(data)


def merge_deltas(pending: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Fold the next delta output of a request into `pending` (in place) and return it: what a
    consumer that fell behind receives at once, in one message."""
    by_index = {c.index: c for c in pending.outputs}
    for c in then.outputs:
        prev = by_index.get(c.index)
        if prev is None:
            pending.outputs.append(c)
            continue
        prev.text += c.text
        prev.token_ids.extend(c.token_ids)
        if prev.logprobs is not None:
            prev.logprobs.extend(c.logprobs or [])
        prev.finish_reason = c.finish_reason
        prev.stop_reason = c.stop_reason
        prev.cumulative_logprob = c.cumulative_logprob
    pending.outputs.sort(key=lambda c: c.index)
    pending.finished = then.finished
    pending.num_cached_tokens = then.num_cached_tokens
    pending.prompt_logprobs = pending.prompt_logprobs or then.prompt_logprobs
    pending.error = then.error
    return pending
