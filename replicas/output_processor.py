"""Turns the engine core's token-id deltas into what callers read: text, stop strings, logprobs.

This is the work that must stay off the engine's compute loop (vLLM's OutputProcessor): when
serving it runs in the replica process, which waits idle while the engine process computes;
offline (`LLM`) it runs beside the engine. A stop string can only be found here, where the text
is, so `process` also returns the generations the engine must end (`finish_generation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from replicas.detokenizer import IncrementalDetokenizer
from replicas.messages import EngineOutput, TokenLogprobs
from replicas.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from replicas.sampling_params import OutputKind, SamplingParams


@dataclass(eq=False)
class _GenerationText:
    """One generation's text so far, and what has not been handed out yet."""

    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    num_sent_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(eq=False)
class _RequestText:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    generations: dict[int, _GenerationText] = field(default_factory=dict)
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None
    prompt_logprobs_sent: bool = False
    error: str | None = None

    @property
    def finished(self) -> bool:
        return len(self.generations) == self.params.n and all(
            g.finish_reason is not None for g in self.generations.values()
        )


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    # (request id, generation index) that met a stop string: the engine must end them.
    stopped: list[tuple[str, int]]


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        """`tokenizer`: the model's transformers tokenizer (a fast one)."""
        self.tokenizer = tokenizer
        self.backend_tokenizer = tokenizer.backend_tokenizer
        self.requests: dict[str, _RequestText] = {}
        self._token_text: dict[int, str] = {}

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> None:
        self.requests[request_id] = _RequestText(request_id, prompt, prompt_token_ids, params)

    def remove_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def process(self, outputs: list[EngineOutput]) -> ProcessedOutputs:
        """Outputs of one engine step -> request outputs, in the order their requests appear."""
        touched: dict[str, _RequestText] = {}
        stopped: list[tuple[str, int]] = []
        for output in outputs:
            request = self.requests.get(output.request_id)
            if request is None:  # aborted meanwhile
                continue
            touched[request.request_id] = request
            gen = request.generations.get(output.index)
            if gen is None:
                gen = request.generations[output.index] = self._new_generation(request)
                if output.index == 0:
                    request.num_cached_tokens = output.num_cached_tokens
            if output.prompt_logprobs is not None:
                request.prompt_logprobs = [None] + [
                    self._logprob_entry(token_id, logprobs)
                    for token_id, logprobs in zip(
                        request.prompt_token_ids[1:], output.prompt_logprobs, strict=True
                    )
                ]
            if gen.finish_reason is not None:  # tokens after a stop string: not the caller's
                continue
            if output.error is not None:
                request.error = output.error
            if self._append(gen, output, request.params):
                stopped.append((request.request_id, output.index))
        request_outputs = []
        for request in touched.values():
            if (result := self._request_output(request)) is not None:
                request_outputs.append(result)
            if request.finished:
                del self.requests[request.request_id]
        return ProcessedOutputs(request_outputs, stopped)

    # --- internals --------------------------------------------------------------------------

    def _new_generation(self, request: _RequestText) -> _GenerationText:
        params = request.params
        return _GenerationText(
            IncrementalDetokenizer(
                self.backend_tokenizer,
                request.prompt_token_ids,
                params.skip_special_tokens,
                params.stop,
                params.include_stop_str_in_output,
            ),
            logprobs=[] if params.logprobs is not None else None,
        )

    def _append(self, gen: _GenerationText, output: EngineOutput, params: SamplingParams) -> bool:
        """Add the engine's new tokens; True if they completed a stop string."""
        for i, token_id in enumerate(output.token_ids):
            gen.token_ids.append(token_id)
            if gen.logprobs is not None and output.logprobs:
                gen.logprobs.append(self._logprob_entry(token_id, output.logprobs[i]))
                gen.cumulative_logprob += output.logprobs[i].logprob
            if (stop := gen.detokenizer.update(token_id)) is not None:
                gen.finish_reason, gen.stop_reason = "stop", stop
                # The engine's own finish (EOS, length) for this same token says nothing more.
                return output.finish_reason is None
        gen.finish_reason = output.finish_reason
        gen.stop_reason = output.stop_token_id
        return False

    def _request_output(self, request: _RequestText) -> RequestOutput | None:
        kind = request.params.output_kind
        finished = request.finished
        if kind is OutputKind.FINAL_ONLY and not finished:
            return None
        completions = []
        for index in sorted(request.generations):
            gen = request.generations[index]
            done = gen.finish_reason is not None
            start = 0
            if kind is OutputKind.DELTA:
                start = gen.num_sent_tokens
                if start == len(gen.token_ids) and not done:
                    continue
                gen.num_sent_tokens = len(gen.token_ids)
                text = gen.detokenizer.take_delta(done)
            else:
                text = gen.detokenizer.text
            completions.append(
                CompletionOutput(
                    index=index,
                    text=text,
                    token_ids=gen.token_ids[start:],
                    finish_reason=gen.finish_reason,
                    stop_reason=gen.stop_reason,
                    logprobs=None if gen.logprobs is None else gen.logprobs[start:],
                    cumulative_logprob=None if gen.logprobs is None else gen.cumulative_logprob,
                )
            )
        if not completions:
            return None
        prompt_logprobs = request.prompt_logprobs
        if kind is OutputKind.DELTA and prompt_logprobs is not None:
            prompt_logprobs = None if request.prompt_logprobs_sent else prompt_logprobs
            request.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=request.num_cached_tokens,
            prompt_logprobs=prompt_logprobs,
            error=request.error,
        )

    def _logprob_entry(self, token_id: int, logprobs: TokenLogprobs) -> dict[int, Logprob]:
        entry = {token_id: Logprob(logprobs.logprob, logprobs.rank, self._decode(token_id))}
        for rank, (tid, lp) in enumerate(
            zip(logprobs.top_ids, logprobs.top_logprobs, strict=True), start=1
        ):
            entry.setdefault(tid, Logprob(lp, rank, self._decode(tid)))
        return entry

    def _decode(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text
