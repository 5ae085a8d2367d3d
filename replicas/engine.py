"""One replica's engine core: token ids in, one scheduled forward pass and sampled tokens a step.

The engine owns request state (sampling parameters, generators); the scheduler owns sequences and
the block manager owns KV blocks. A request with `n > 1` prefills once and forks its sequence
into `n` when the first tokens are sampled, sharing the prompt's blocks. Each step returns only
what is new, as token ids (`EngineOutput`): text, stop strings and logprob text are made outside
the compute loop, by `replicas.output_processor` (in the replica process when serving).

Structured outputs: each constrained generation has an llguidance matcher that has consumed its
output tokens. A step starts the masks of its constrained rows on a thread before the forward
(their tokens are known once the step is scheduled) and joins them before sampling; the sampled
token advances the matcher, and a grammar that cannot go on ends the generation ("stop").
Prompt logprobs come from extra logits rows of the prefill's own forward; such a request skips
the prefix-cache lookup until they are complete (a cached prefix has no logits).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.profiler import record_function

from replicas.attention_backends import select_backend
from replicas.config import DEFAULT_BLOCK_SIZE, EngineConfig
from replicas.errors import ModelLoadError
from replicas.kv_cache import (
    KVCacheShape,
    PagedKVCache,
    kv_cache_budget,
    num_blocks_for_budget,
    profile_cuda_memory,
)
from replicas.messages import EngineOutput, ReplicaStats, TokenLogprobs
from replicas.metrics import EngineMetrics, MetricsSink, PrometheusSink
from replicas.model_loader import load_model
from replicas.model_runner import ModelRunner
from replicas.sampler import GrammarMask, Sampler, SamplerOutput, SamplingRow, prompt_logprobs
from replicas.sampling_params import SamplingParams
from replicas.structured_output import GrammarCompiler, GrammarMasks
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

if TYPE_CHECKING:
    from llguidance import LLMatcher

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
    generator: torch.Generator | None
    # Output tokens already handed out, and their logprobs since then.
    num_sent_tokens: int = 0
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_token_id: int | None = None
    last_token_time: float | None = None
    matcher: LLMatcher | None = None  # structured outputs: the grammar after the output tokens


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    generations: list[Generation] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Prompt token j's logprobs at index j - 1, filled as its prefill chunks run; handed out once,
    # with the request's first output.
    prompt_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs_sent: bool = False

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
        if config.synthetic is None:
            num_blocks, block_size, max_model_len = self._load_model(config)
        else:
            num_blocks, block_size, max_model_len = self._load_synthetic(config)
        self.block_manager = BlockManager(
            num_blocks,
            block_size,
            config.enable_prefix_caching,
            record_cache_events=config.report_cache_events,
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
        self.eos_token_ids = self._eos_token_ids()
        self.requests: dict[str, Request] = {}
        self.num_requests_admitted = 0
        self.num_tokens_generated = 0
        self._generation_of: dict[Sequence, Generation] = {}
        # Set to a list to record each step's shape and wall time (`python -m cluster calibrate`).
        self.step_samples: list[StepSample] | None = None

    @cached_property
    def grammars(self) -> GrammarCompiler:
        """Built on the first structured request (wrapping the vocabulary takes ~1 s)."""
        return GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)

    @cached_property
    def grammar_masks(self) -> GrammarMasks:
        return GrammarMasks(self.vocab_size, self.config.max_num_seqs)

    def _load_model(self, config: EngineConfig) -> tuple[int, int, int]:
        """Load the weights, pick the attention backend, size and allocate the KV cache, build
        the runner and sampler; returns the number of KV blocks, the block size and the
        maximum model length."""
        loaded = load_model(config)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.model_name = loaded.name
        self.device = loaded.device
        self.vocab_size = self.model.config.vocab_size
        shape = KVCacheShape.from_model_config(self.model.config, loaded.dtype)
        model_max_len = self._model_max_len(self.model.config)
        self.attention, block_size = select_backend(
            config, self.device, loaded.dtype, self.model.config
        )
        # On CUDA the warmup is the full budget: its peak memory is what the KV cache must leave.
        warmup_tokens = config.max_num_batched_tokens if self.device.type == "cuda" else 16
        warmup_tokens = min(warmup_tokens, model_max_len or 1 << 30)
        profile = None
        if self.device.type == "cuda":
            profile = profile_cuda_memory(
                lambda: self._warmup(shape, block_size, warmup_tokens), self.device
            )
        else:
            self._warmup(shape, block_size, warmup_tokens)
        num_blocks = config.num_blocks or num_blocks_for_budget(
            shape,
            block_size,
            kv_cache_budget(
                self.device, config.kv_cache_memory_gib, config.gpu_memory_utilization, profile
            ),
        )
        use_graphs = self._use_decode_graphs()
        # Zeroed where a backend reads unwritten (masked) slots, and on GPUs, where it is cheap.
        kv_cache = PagedKVCache(
            shape,
            num_blocks,
            block_size,
            self.device,
            zeroed=self.attention.reads_unwritten_slots or self.device.type != "cpu",
            scratch_block=use_graphs,
        )
        max_model_len = config.max_model_len or min(
            model_max_len or 1 << 30, num_blocks * block_size
        )
        self.runner = ModelRunner(self.model, kv_cache, self.device, self.attention)
        if use_graphs:
            self.runner.capture_decode_graphs(config.max_num_seqs, max_model_len)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        return num_blocks, block_size, max_model_len

    def _load_synthetic(self, config: EngineConfig) -> tuple[int, int, int]:
        """A synthetic model (replicas/synthetic.py): the model's tokenizer and shapes, no
        weights, no KV tensors; the KV blocks are bookkeeping only."""
        from transformers import AutoConfig

        from replicas.model_loader import resolve_model_source
        from replicas.model_source import model_display_name
        from replicas.synthetic import SyntheticRunner, SyntheticSampler
        from replicas.tokenizer import load_tokenizer

        source = resolve_model_source(config)
        model_config = AutoConfig.from_pretrained(source, revision=config.revision)
        self.model = None
        self.tokenizer = load_tokenizer(config, source)
        self.model_name = model_display_name(config.model)
        self.device = torch.device("cpu")
        self.vocab_size = len(self.tokenizer)
        block_size = config.block_size or DEFAULT_BLOCK_SIZE["cpu"]
        shape = KVCacheShape.from_model_config(model_config, torch.bfloat16)
        num_blocks = config.num_blocks or num_blocks_for_budget(
            shape,
            block_size,
            kv_cache_budget(self.device, config.kv_cache_memory_gib, 1.0, None),
        )
        self.runner = SyntheticRunner(config.synthetic.step_model())
        self.sampler = SyntheticSampler(config.synthetic, self.tokenizer, config.seed)
        model_max_len = self._model_max_len(model_config)
        max_model_len = config.max_model_len or min(
            model_max_len or 1 << 30, num_blocks * block_size
        )
        return num_blocks, block_size, max_model_len

    def _model_max_len(self, model_config) -> int | None:
        model_max_len = getattr(model_config, "max_position_embeddings", None)
        limit = self.config.max_model_len
        if limit and model_max_len and limit > model_max_len:
            raise ValueError(f"max_model_len {limit} exceeds the model's {model_max_len} positions")
        return model_max_len

    # --- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. Raises ValueError (e.g. `RequestTooLongError`, `GrammarError`) for one
        that can never run and `QueueFullError` when the queue is at its bound; a refused request
        leaves nothing behind."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = list(prompt_token_ids)
        if not token_ids:
            raise RequestTooLongError("the prompt is empty")
        for name, ids in (
            ("prompt token ids", token_ids),
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", params.logit_bias),
        ):
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"{name} must be in [0, {self.vocab_size})")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - len(token_ids)
            if max_tokens <= 0:
                raise RequestTooLongError(
                    f"the prompt ({len(token_ids)} tokens) fills the maximum model length "
                    f"of {self.max_model_len} tokens"
                )
        matcher = None
        if params.structured_outputs is not None:
            matcher = self.grammars.compile(params.structured_outputs)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seq = Sequence(request_id, token_ids, max_tokens)
        if params.prompt_logprobs is not None:
            seq.use_prefix_cache = False
        self.scheduler.add(seq)  # raises before anything is registered
        request = Request(request_id, token_ids, params, arrival)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = []
        self._add_generation(request, seq, 0, matcher)
        self.requests[request_id] = request
        self.num_requests_admitted += 1
        self.metrics.request_admitted(len(token_ids))

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its blocks are freed at once. Unknown ids are ignored."""
        request = self.requests.get(request_id)
        if request is not None:
            self._drop(request, "abort")
            self.metrics.gauges(self.scheduler, self.block_manager)

    def finish_generation(self, request_id: str, index: int) -> None:
        """End one generation that met a stop string (found where the text is made); its
        blocks are freed now. Generations already finished, or unknown, are ignored."""
        request = self.requests.get(request_id)
        if request is None or index >= len(request.generations):
            return
        gen = request.generations[index]
        if gen.finish_reason is None:
            self._finish(gen, "stop")
            if request.finished:
                del self.requests[request_id]
            self.metrics.gauges(self.scheduler, self.block_manager)

    def stats(self) -> ReplicaStats:
        """This engine's load, as the router reads it."""
        scheduler, bm = self.scheduler, self.block_manager
        return ReplicaStats(
            num_waiting=scheduler.num_waiting,
            num_running=scheduler.num_running,
            queued_prompt_tokens=scheduler.num_prefill_tokens_left,
            free_blocks=bm.num_free_blocks,
            total_blocks=bm.num_blocks,
            block_size=bm.block_size,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            requests_admitted=self.num_requests_admitted,
            tokens_generated=self.num_tokens_generated,
            time=time.time(),
        )

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- the step ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[EngineOutput]:
        """Run one scheduled forward pass; return what it added to each generation it changed."""
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

    def _run(self, batch: ScheduledBatch) -> list[EngineOutput]:
        self._record_first_scheduled(batch)
        # Sequences whose last prompt (or recomputed) token is fed now: they sample, unless they
        # only score their prompt (max_tokens 0).
        done_rows = [
            i
            for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True))
            if seq.num_computed_tokens + n == seq.num_tokens
        ]
        sample_rows = [i for i in done_rows if batch.seqs[i].max_tokens > 0]
        generations = [self._generation_of[batch.seqs[i]] for i in sample_rows]
        pending_masks = self._start_grammar_masks(generations)
        scored, positions = self._prompt_logprob_positions(batch)
        logits = self.runner.execute(batch, sample_rows, positions)
        masks = None
        if pending_masks is not None:  # joined before anything touches the matchers (forks copy)
            constrained, future = pending_masks
            with record_function("continuum.grammar_wait"):
                masks = (constrained, future.result())
        self.scheduler.update_computed(batch)
        if scored:
            self._record_prompt_logprobs(scored, logits[len(sample_rows) :])
        scoring_only = [self._generation_of[batch.seqs[i]] for i in done_rows]
        scoring_only = [g for g in scoring_only if g.seq.max_tokens == 0]
        for gen in scoring_only:
            self._finish(gen, "length")
        rows, generations = self._fork_first_samples(generations)
        logits = logits[: len(sample_rows)]
        if len(rows) != len(sample_rows):
            logits = logits[torch.tensor(rows, device=logits.device)]
        grammar = None if masks is None else self._grammar_mask(*masks, rows)
        with record_function("continuum.sample"):
            sampled = self.sampler(logits, [self._sampling_row(g) for g in generations], grammar)
        with record_function("continuum.outputs"):
            outputs = self._process_samples(generations, sampled, scoring_only)
        self.metrics.step(batch.total_tokens, self.scheduler, self.block_manager)
        return outputs

    def _start_grammar_masks(
        self, generations: list[Generation]
    ) -> tuple[list[int], Future[torch.Tensor]] | None:
        """Start filling the masks of the constrained rows; they overlap the forward pass."""
        constrained = [j for j, g in enumerate(generations) if g.matcher is not None]
        if not constrained:
            return None
        matchers = [generations[j].matcher for j in constrained]
        return constrained, self.grammar_masks.start(matchers)

    def _grammar_mask(
        self, constrained: list[int], bitmask: torch.Tensor, rows: list[int]
    ) -> GrammarMask:
        """The masks by sampled row; forks of one prompt (`rows`: their parent row) share one."""
        mask_of = {row: k for k, row in enumerate(constrained)}
        sampled_rows = [e for e, row in enumerate(rows) if row in mask_of]
        picks = [mask_of[rows[e]] for e in sampled_rows]
        if picks != list(range(len(constrained))):
            bitmask = bitmask[torch.tensor(picks)]
        return GrammarMask(sampled_rows, bitmask)

    def _prompt_logprob_positions(
        self, batch: ScheduledBatch
    ) -> tuple[list[tuple[Request, int, int]], np.ndarray | None]:
        """Where this step's forward must also keep logits for prompt logprobs: per request,
        (request, first position, count), and those positions in the step's flat tokens.
        Prompt token j's logprob comes from the logits at position j - 1."""
        scored: list[tuple[Request, int, int]] = []
        positions: list[np.ndarray] = []
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            request = self._generation_of[seq].request
            wanted = request.prompt_logprobs
            if wanted is not None and len(wanted) < seq.num_prompt_tokens - 1:
                start, first = seq.num_computed_tokens, len(wanted)
                if first < start:  # the prefix cache is skipped for these: a position was lost
                    raise RuntimeError(f"prompt logprobs of {request.request_id} lost a position")
                end = min(start + n, seq.num_prompt_tokens - 1)
                if end > first:
                    scored.append((request, first, end - first))
                    positions.append(offset + np.arange(first - start, end - start))
            offset += n
        if not scored:
            return [], None
        return scored, np.concatenate(positions)

    def _record_prompt_logprobs(
        self, scored: list[tuple[Request, int, int]], logits: torch.Tensor
    ) -> None:
        next_tokens: list[int] = []
        num_top: list[int] = []
        for request, first, count in scored:
            next_tokens += request.prompt_token_ids[first + 1 : first + 1 + count]
            num_top += [request.params.prompt_logprobs] * count
        with record_function("continuum.prompt_logprobs"):
            entries = prompt_logprobs(logits, next_tokens, num_top)
        i = 0
        for request, _, count in scored:
            request.prompt_logprobs += entries[i : i + count]
            i += count
            if len(request.prompt_logprobs) == len(request.prompt_token_ids) - 1:
                # Complete: a recompute after preemption may reuse cached blocks again.
                request.generations[0].seq.use_prefix_cache = True

    def _fail(self, batch: ScheduledBatch, error: str) -> list[EngineOutput]:
        """End every request with a sequence in `batch`; their blocks are freed now."""
        failed = {
            gen.request.request_id: gen.request
            for seq in batch.seqs
            if (gen := self._generation_of.get(seq)) is not None
        }
        outputs = [o for request in failed.values() for o in self._fail_request(request, error)]
        self.metrics.gauges(self.scheduler, self.block_manager)
        return outputs

    def _fail_request(self, request: Request, error: str) -> list[EngineOutput]:
        """End `request` (its blocks are freed now); its outputs carry `error`."""
        self._drop(request, "error")
        return [
            EngineOutput(request.request_id, g.index, [], finish_reason="error", error=error)
            for g in request.generations
        ]

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
        self, generations: list[Generation], sampled: SamplerOutput, scored: list[Generation]
    ) -> list[EngineOutput]:
        """Append sampled tokens, apply the stop conditions the engine owns (EOS, stop tokens,
        lengths, a complete grammar), and return what is new for each generation (also for the
        `scored` ones, which finished without sampling)."""
        now = time.monotonic()
        self.num_tokens_generated += len(generations)
        self.metrics.tokens_sampled(len(generations))
        broken: dict[str, Request] = {}
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
            if gen.matcher is not None and gen.matcher.is_error():
                broken[request.request_id] = request
        outputs = []
        for gen in scored + generations:
            request = gen.request
            if request.request_id in broken:  # llguidance gave up (a resource limit)
                if request.request_id in self.requests:
                    error = f"structured output: {gen.matcher.get_error()}"
                    outputs += self._fail_request(request, error)
                continue
            outputs.append(self._take_output(gen))
            if request.finished and request.request_id in self.requests:
                del self.requests[request.request_id]
        return outputs

    # --- internals --------------------------------------------------------------------------

    def _add_generation(
        self, request: Request, seq: Sequence, index: int, matcher: LLMatcher | None = None
    ) -> Generation:
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed + index)
        gen = Generation(
            request=request,
            index=index,
            seq=seq,
            generator=generator,
            new_logprobs=[] if params.logprobs is not None else None,
            matcher=matcher,
        )
        request.generations.append(gen)
        self._generation_of[seq] = gen
        return gen

    def _fork_first_samples(
        self, generations: list[Generation]
    ) -> tuple[list[int], list[Generation]]:
        """For requests with n > 1 whose prompt just finished, fork the other n - 1 generations,
        which sample from the same logits row: returns each generation's row."""
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
                child_id = f"{parent.seq_id}/{index}"
                child = Sequence(child_id, list(parent.token_ids), parent.max_tokens)
                self.scheduler.add_forked(parent, child)
                rows.append(row)
                matcher = None if gen.matcher is None else gen.matcher.deep_copy()
                expanded.append(self._add_generation(request, child, index, matcher))
        return rows, expanded

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
            gen.new_logprobs.append(logprobs)
        if gen.matcher is not None:
            gen.matcher.consume_token(token_id)  # an error is checked by the caller
        if not params.ignore_eos and token_id in self.eos_token_ids:
            self._finish(gen, "stop")
        elif token_id in params.stop_token_ids:
            gen.stop_token_id = token_id
            self._finish(gen, "stop")
        elif gen.matcher is not None and gen.matcher.is_stopped():  # the grammar is complete
            self._finish(gen, "stop")
        elif seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(gen, "length")

    def _finish(self, gen: Generation, reason: str) -> None:
        gen.finish_reason = reason
        self.scheduler.finish(gen.seq, FINISH_STATUS[reason])
        del self._generation_of[gen.seq]
        self.metrics.finished(reason, gen.request.arrival_time)

    def _take_output(self, gen: Generation) -> EngineOutput:
        """The tokens (and logprobs) `gen` gained since its last output."""
        seq = gen.seq
        start = seq.num_prompt_tokens + gen.num_sent_tokens
        gen.num_sent_tokens = seq.num_output_tokens
        logprobs = gen.new_logprobs
        if logprobs is not None:
            gen.new_logprobs = []
        request = gen.request
        prompt_logprobs = None
        if (
            gen.index == 0
            and request.prompt_logprobs is not None
            and not request.prompt_logprobs_sent
        ):
            prompt_logprobs, request.prompt_logprobs_sent = request.prompt_logprobs, True
        return EngineOutput(
            request.request_id,
            gen.index,
            seq.token_ids[start:],
            logprobs=logprobs,
            finish_reason=gen.finish_reason,
            stop_token_id=gen.stop_token_id,
            num_cached_tokens=seq.num_cached_tokens if start == seq.num_prompt_tokens else 0,
            prompt_logprobs=prompt_logprobs,
        )

    def _eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        generation_config = getattr(self.model, "generation_config", None)  # None if synthetic
        configured = getattr(generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(configured)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def _use_decode_graphs(self) -> bool:
        """CUDA graphs for decode steps: on CUDA, unless `enforce_eager`, with a backend that
        can run inside one."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            return False
        if not self.attention.graph_safe:
            logger.warning(
                "decode steps run eagerly: %s attention cannot run in a CUDA graph",
                self.attention.label,
            )
            return False
        return True

    def _warmup(self, shape: KVCacheShape, block_size: int, num_tokens: int) -> None:
        """Run one full-budget forward on a scratch cache: a self-test of the model under paged
        attention, and on CUDA the peak activation memory the KV-cache budget must leave free."""
        num_blocks = -(-num_tokens // block_size)
        scratch = PagedKVCache(shape, num_blocks, block_size, self.device, zeroed=True)
        seq = Sequence("warmup", [0] * num_tokens, max_tokens=1)
        seq.block_table = list(range(num_blocks))
        batch = ScheduledBatch(seqs=[seq], num_tokens=[num_tokens])
        runner = ModelRunner(self.model, scratch, self.device, self.attention)
        try:
            runner.execute(batch, [0])
        except (NotImplementedError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(
                f"{self.model_name} cannot run with paged attention: {exc}"
            ) from exc
