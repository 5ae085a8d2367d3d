"""The offline API, in the style of vLLM: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence as Seq

from torch.profiler import record_function
from tqdm.auto import tqdm

from replicas.config import EngineConfig
from replicas.engine import LLMEngine
from replicas.output_processor import OutputProcessor
from replicas.outputs import RequestOutput
from replicas.sampling_params import OutputKind, SamplingParams
from replicas.tokenizer import render_chat
from scheduler import QueueFullError

Prompt = str | list[int]
Conversation = list[dict]


class LLM:
    """Runs batches of prompts through one engine, all at once, with continuous batching."""

    def __init__(self, model: str | None = None, **engine_args) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.processor = OutputProcessor(self.engine.tokenizer)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One output per prompt, in prompt order. A prompt is text or a list of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, use_tqdm)

    def chat(
        self,
        messages: Conversation | Seq[Conversation],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Like `generate`, for conversations rendered with the model's chat template (with
        OpenAI-style `tools`, if given)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts = [
            tokenizer.encode(render_chat(tokenizer, list(c), tools=tools), add_special_tokens=False)
            for c in conversations
        ]
        return self._run(prompts, sampling_params, use_tqdm)

    def step(self) -> list[RequestOutput]:
        """One engine step, its outputs made into text (the offline OutputProcessor)."""
        outputs = self.engine.step()
        with record_function("continuum.detokenize"):
            processed = self.processor.process(outputs)
        for request_id, index in processed.stopped:
            self.engine.finish_generation(request_id, index)
        return processed.request_outputs

    def _run(
        self,
        prompts: list[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError("give one SamplingParams, or one per prompt")
        pending = deque(enumerate(zip(prompts, params_list, strict=True)))
        order: dict[str, int] = {}
        results: list[RequestOutput | None] = [None] * len(prompts)
        try:
            with tqdm(
                total=len(prompts), desc="Generating", disable=not use_tqdm or len(prompts) < 2
            ) as bar:
                while pending or self.engine.has_unfinished_requests():
                    self._admit(pending, order)
                    for output in self.step():
                        if output.finished:
                            results[order[output.request_id]] = output
                            bar.update(1)
        finally:
            for request_id in order:
                self.engine.abort_request(request_id)
                self.processor.remove_request(request_id)
        return results

    def _admit(self, pending: deque, order: dict[str, int]) -> None:
        """Queue as many pending prompts as the engine's admission bounds take (an empty queue
        always takes one)."""
        while pending:
            i, (prompt, params) = pending[0]
            request_id = str(next(self._ids))
            final = params.model_copy(update={"output_kind": OutputKind.FINAL_ONLY})
            text, token_ids = (
                (prompt, self.engine.tokenizer.encode(prompt))
                if isinstance(prompt, str)
                else (None, list(prompt))
            )
            try:
                self.engine.add_request(request_id, token_ids, final)
            except QueueFullError:
                return
            self.processor.add_request(request_id, token_ids, final, text)
            order[request_id] = i
            pending.popleft()
