"""One replica's engine: requests in, a scheduled forward pass and sampled tokens per `step()`.

The engine owns request state (sampling parameters, detokenizers, generators); the scheduler owns
sequences and the block manager owns KV blocks. A request with `n > 1` prefills once and forks its
sequence into `n` when the first tokens are sampled, sharing the prompt's blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from replicas.config import EngineConfig
from replicas.detokenizer import IncrementalDetokenizer
from replicas.errors import ModelLoadError
from replicas.kernels import load_cpu_kernels
from replicas.kv_cache import KVCacheShape, PagedKVCache, num_blocks_for_budget
from replicas.metrics import EngineMetrics, MetricsSink, PrometheusSink
from replicas.model_loader import load_model
from replicas.model_runner import ModelRunner
from replicas.outputs import CompletionOutput, Logprob, RequestOutput
from replicas.sampler import Sampler, SamplerOutput, SamplingRow, TokenLogprobs
from replicas.sampling_params import OutputKind, SamplingParams
from replicas.tokenizer import render_chat
from scheduler import (
    BlockManager,
    RequestTooLongError,
    ScheduledBatch,
    Scheduler,
    SchedulerConfig,
    Sequence,
    SequenceStatus,
)
from scheduler.step_time import StepSample, step_shape

logger = logging.getLogger(__name__)

FINISH_STATUS = {
    "stop": SequenceStatus.FINISHED_STOPPED,
    "length": SequenceStatus.FINISHED_LENGTH,
    "abort": SequenceStatus.FINISHED_ABORTED,
}


@dataclass(eq=False)
class Generation:
    """One of a request's `n` output streams."""

    request: Request
    index: int
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_sent_tokens: int = 0  # output tokens already handed out (OutputKind.DELTA)
    last_token_time: float | None = None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    generations: list[Generation] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return len(self.generations) == self.params.n and all(
            g.finish_reason is not None for g in self.generations
        )


class LLMEngine:
    def __init__(
        self, config: EngineConfig | None = None, metrics: MetricsSink | None = None, **overrides
    ) -> None:
        """`metrics`: where the engine's metrics go (default: a prometheus_client registry)."""
        self.config = config = config or EngineConfig(**overrides)
        self.metrics = EngineMetrics(metrics if metrics is not None else PrometheusSink())
        loaded = load_model(config)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.model_name = loaded.name
        self.device = loaded.device
        self.vocab_size = self.model.config.vocab_size
        shape = KVCacheShape.from_model_config(self.model.config, loaded.dtype)
        model_max_len = getattr(self.model.config, "max_position_embeddings", None)
        if config.max_model_len and model_max_len and config.max_model_len > model_max_len:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's "
                f"{model_max_len} positions"
            )
        self.native_decode = (
            config.native_kernels and self.device.type == "cpu" and load_cpu_kernels()
        )
        # On CUDA the warmup is the full budget: its peak memory is what the KV cache must leave.
        warmup_tokens = config.max_num_batched_tokens if self.device.type == "cuda" else 16
        self._warmup(shape, config.block_size, min(warmup_tokens, model_max_len or 1 << 30))
        num_blocks = config.num_blocks or num_blocks_for_budget(
            shape,
            config.block_size,
            self.device,
            config.kv_cache_memory_gib,
            config.gpu_memory_utilization,
        )
        # The native kernel reads only written slots; the torch path also reads padding.
        kv_cache = PagedKVCache(
            shape, num_blocks, config.block_size, self.device, zeroed=not self.native_decode
        )
        max_model_len = config.max_model_len or min(
            model_max_len or 1 << 30, num_blocks * config.block_size
        )
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_batched_tokens,
                config.max_num_seqs,
                max_model_len,
                config.max_waiting_seqs,
                config.max_queued_prompt_tokens,
            ),
            self.block_manager,
        )
        self.max_model_len = max_model_len
        self.runner = ModelRunner(self.model, kv_cache, self.device, self.native_decode)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        self.backend_tokenizer = self.tokenizer.backend_tokenizer
        self.eos_token_ids = self._eos_token_ids()
        self.requests: dict[str, Request] = {}
        self.num_requests_admitted = 0
        self._generation_of: dict[Sequence, Generation] = {}
        self._token_text: dict[int, str] = {}
        # Set to a list to record each step's shape and wall time (`python -m cluster calibrate`).
        self.step_samples: list[StepSample] | None = None

    # --- requests ---------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return render_chat(self.tokenizer, messages)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request; raises ValueError (e.g. `RequestTooLongError`) if it can never run."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            prompt_text, token_ids = prompt, self.tokenize(prompt)
        else:
            prompt_text, token_ids = None, list(prompt)
            if any(not 0 <= t < self.vocab_size for t in token_ids):
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if not token_ids:
            raise RequestTooLongError("the prompt is empty")
        for name, ids in (
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", params.logit_bias),
        ):
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"{name} must hold token ids in [0, {self.vocab_size})")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - len(token_ids)
            if max_tokens <= 0:
                raise RequestTooLongError(
                    f"the prompt ({len(token_ids)} tokens) fills the maximum model length "
                    f"of {self.max_model_len} tokens"
                )
        self.scheduler.check_fits(len(token_ids), max_tokens)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        request = Request(request_id, prompt_text, token_ids, params, arrival)
        seq = Sequence(request_id, list(token_ids), max_tokens, arrival)
        self._add_generation(request, seq, 0)
        self.scheduler.add(seq)
        self.requests[request_id] = request
        self.num_requests_admitted += 1
        self.metrics.request_admitted(len(token_ids))

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its blocks are freed at once. Unknown ids are ignored."""
        request = self.requests.get(request_id)
        if request is not None:
            self._drop(request, "abort")
            self.metrics.gauges(self.scheduler, self.block_manager)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- the step ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward pass; return outputs of the requests it changed."""
        start = time.perf_counter()
        with record_function("continuum.schedule"):
            batch = self.scheduler.schedule()
        if not batch:
            return []
        shape = step_shape(batch) if self.step_samples is not None else None
        try:
            return self._run(batch)
        except Exception as exc:  # a fault in one step fails that step's requests, not the engine
            logger.exception("step failed; failing the %d requests in it", len(batch.seqs))
            return self._fail(batch, f"{type(exc).__name__}: {exc}")
        finally:
            if shape is not None:
                self.step_samples.append(StepSample(shape, time.perf_counter() - start))

    def _run(self, batch: ScheduledBatch) -> list[RequestOutput]:
        self._record_first_scheduled(batch)
        sample_rows = [
            i
            for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True))
            if seq.num_computed_tokens + n == seq.num_tokens
        ]
        logits = self.runner.execute(batch, sample_rows)
        self.scheduler.update_computed(batch)
        generations = [self._generation_of[batch.seqs[i]] for i in sample_rows]
        logits, generations = self._fork_first_samples(logits, generations)
        with record_function("continuum.sample"):
            sampled = self.sampler(logits, [self._sampling_row(g) for g in generations])
        with record_function("continuum.outputs"):
            outputs = self._process_samples(generations, sampled)
        self.metrics.step(batch.total_tokens, self.scheduler, self.block_manager)
        return outputs

    def _fail(self, batch: ScheduledBatch, error: str) -> list[RequestOutput]:
        """End every request with a sequence in `batch`; their blocks are freed now."""
        failed = {
            gen.request.request_id: gen.request
            for seq in batch.seqs
            if (gen := self._generation_of.get(seq)) is not None
        }
        outputs = []
        for request in failed.values():
            self._drop(request, "error")
            outputs.append(
                RequestOutput(
                    request_id=request.request_id,
                    prompt=request.prompt,
                    prompt_token_ids=request.prompt_token_ids,
                    outputs=[
                        CompletionOutput(g.index, "", [], finish_reason="error")
                        for g in request.generations
                    ],
                    finished=True,
                    error=error,
                )
            )
        self.metrics.gauges(self.scheduler, self.block_manager)
        return outputs

    def _drop(self, request: Request, reason: str) -> None:
        """Forget `request`, finishing its unfinished sequences (counted under `reason`)."""
        del self.requests[request.request_id]
        for gen in request.generations:
            if not gen.seq.is_finished:
                self.scheduler.finish(gen.seq, SequenceStatus.FINISHED_ABORTED)
                self.metrics.finished(reason, request.arrival_time)
            self._generation_of.pop(gen.seq, None)

    def _record_first_scheduled(self, batch: ScheduledBatch) -> None:
        now = time.monotonic()
        for seq in batch.seqs:
            request = self._generation_of[seq].request
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
                self.metrics.first_scheduled(request.arrival_time, now)

    def _process_samples(
        self, generations: list[Generation], sampled: SamplerOutput
    ) -> list[RequestOutput]:
        """Append sampled tokens, detokenize, apply stop conditions, and build outputs."""
        now = time.monotonic()
        touched: dict[str, Request] = {}
        self.metrics.tokens_sampled(len(generations))
        for gen, token_id, logprobs in zip(
            generations, sampled.token_ids, sampled.logprobs, strict=True
        ):
            request = gen.request
            if request.first_token_time is None:
                request.first_token_time = now
                self.metrics.first_token(request.arrival_time, now)
            if gen.last_token_time is not None:
                self.metrics.next_token(now - gen.last_token_time)
            gen.last_token_time = now
            self._append_token(gen, token_id, logprobs)
            touched[request.request_id] = request
        outputs = []
        for request in touched.values():
            if output := self._make_output(request):
                outputs.append(output)
            if request.finished:
                del self.requests[request.request_id]
        return outputs

    # --- internals --------------------------------------------------------------------------

    def _add_generation(self, request: Request, seq: Sequence, index: int) -> Generation:
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed + index)
        gen = Generation(
            request=request,
            index=index,
            seq=seq,
            detokenizer=IncrementalDetokenizer(
                self.backend_tokenizer,
                request.prompt_token_ids,
                params.skip_special_tokens,
                params.stop,
                params.include_stop_str_in_output,
            ),
            generator=generator,
            logprobs=[] if params.logprobs is not None else None,
        )
        request.generations.append(gen)
        self._generation_of[seq] = gen
        return gen

    def _fork_first_samples(
        self, logits: torch.Tensor, generations: list[Generation]
    ) -> tuple[torch.Tensor, list[Generation]]:
        """For requests with n > 1 whose prompt just finished, fork the other n - 1 generations
        from the same logits row."""
        rows: list[int] = []
        expanded: list[Generation] = []
        for row, gen in enumerate(generations):
            rows.append(row)
            expanded.append(gen)
            request = gen.request
            if gen.seq.num_output_tokens or len(request.generations) == request.params.n:
                continue
            for index in range(1, request.params.n):
                parent = gen.seq
                child = Sequence(
                    f"{parent.seq_id}/{index}",
                    list(parent.token_ids),
                    parent.max_tokens,
                    parent.arrival_time,
                )
                self.scheduler.add_forked(parent, child)
                rows.append(row)
                expanded.append(self._add_generation(request, child, index))
        if len(rows) == len(generations):
            return logits, generations
        return logits[torch.tensor(rows, device=logits.device)], expanded

    def _sampling_row(self, gen: Generation) -> SamplingRow:
        params = gen.request.params
        seq = gen.seq
        banned: list[int] = []
        if seq.num_output_tokens < params.min_tokens:
            banned = list(params.stop_token_ids)
            if not params.ignore_eos:
                banned += self.eos_token_ids
        return SamplingRow(params, gen.generator, seq.token_ids, seq.num_prompt_tokens, banned)

    def _append_token(self, gen: Generation, token_id: int, logprobs: TokenLogprobs | None) -> None:
        seq = gen.seq
        params = gen.request.params
        seq.append_token(token_id)
        if logprobs is not None:
            gen.logprobs.append(self._logprob_entry(token_id, logprobs))
            gen.cumulative_logprob += logprobs.logprob
        stop_string = gen.detokenizer.update(token_id)
        if not params.ignore_eos and token_id in self.eos_token_ids:
            self._finish(gen, "stop")
        elif token_id in params.stop_token_ids:
            self._finish(gen, "stop", token_id)
        elif stop_string is not None:
            self._finish(gen, "stop", stop_string)
        elif seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(gen, "length")

    def _finish(self, gen: Generation, reason: str, stop_reason: str | int | None = None) -> None:
        gen.finish_reason = reason
        gen.stop_reason = stop_reason
        self.scheduler.finish(gen.seq, FINISH_STATUS[reason])
        del self._generation_of[gen.seq]
        self.metrics.finished(reason, gen.request.arrival_time)

    def _logprob_entry(self, token_id: int, logprobs: TokenLogprobs) -> dict[int, Logprob]:
        entry = {token_id: Logprob(logprobs.logprob, logprobs.rank, self._decode_token(token_id))}
        for rank, (tid, lp) in enumerate(
            zip(logprobs.top_ids, logprobs.top_logprobs, strict=True), start=1
        ):
            entry.setdefault(tid, Logprob(lp, rank, self._decode_token(tid)))
        return entry

    def _decode_token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _make_output(self, request: Request) -> RequestOutput | None:
        kind = request.params.output_kind
        finished = request.finished
        if kind is OutputKind.FINAL_ONLY and not finished:
            return None
        completions = []
        for gen in request.generations:
            done = gen.finish_reason is not None
            if kind is OutputKind.DELTA:
                start = gen.num_sent_tokens
                if start == gen.seq.num_output_tokens and not done:
                    continue
                gen.num_sent_tokens = gen.seq.num_output_tokens
                text = gen.detokenizer.take_delta(done)
            else:
                start = 0
                text = gen.detokenizer.text
            completions.append(
                CompletionOutput(
                    index=gen.index,
                    text=text,
                    token_ids=gen.seq.output_token_ids[start:],
                    finish_reason=gen.finish_reason,
                    stop_reason=gen.stop_reason,
                    logprobs=None if gen.logprobs is None else gen.logprobs[start:],
                    cumulative_logprob=None if gen.logprobs is None else gen.cumulative_logprob,
                )
            )
        if not completions:
            return None
        seq0 = request.generations[0].seq
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=seq0.num_cached_tokens,
        )

    def _eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        generation_config = getattr(self.model, "generation_config", None)
        configured = getattr(generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(configured)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def _warmup(self, shape: KVCacheShape, block_size: int, num_tokens: int) -> None:
        """Run one full-budget forward on a scratch cache: a self-test of the model under paged
        attention, and on CUDA the peak activation memory the KV-cache budget must leave free."""
        num_blocks = -(-num_tokens // block_size)
        scratch = PagedKVCache(shape, num_blocks, block_size, self.device, zeroed=True)
        seq = Sequence("warmup", [0] * num_tokens, max_tokens=1)
        seq.block_table = list(range(num_blocks))
        batch = ScheduledBatch(seqs=[seq], num_tokens=[num_tokens])
        runner = ModelRunner(self.model, scratch, self.device, self.native_decode)
        try:
            runner.execute(batch, [0])
        except (NotImplementedError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(
                f"{self.model_name} cannot run with paged attention: {exc}"
            ) from exc
