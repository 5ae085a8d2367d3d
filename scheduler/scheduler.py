"""Continuous batching: which sequences run in the next step, and how many tokens each feeds.

A step is a token budget (`max_num_batched_tokens`) shared by at most `max_num_seqs` sequences.
Running sequences that decode go first (one token each), then running prefills continue, then
waiting sequences start, their prompts cut into chunks that fit what is left (chunked prefill), so
one step mixes decodes and prefill chunks. When the cache is full, the newest running sequence is
preempted: its blocks are freed and it is recomputed later. The oldest sequence is never the
victim while another runs, and every admitted sequence fits the cache alone, so the oldest always
progresses: no deadlock, no starvation.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from scheduler.block_manager import BlockManager
from scheduler.sequence import Sequence, SequenceStatus


class RequestTooLongError(ValueError):
    """A request that could never be scheduled; rejected at admission instead of hanging."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the request may succeed later (HTTP 429)."""


@dataclass
class ScheduledBatch:
    """One step's work, decodes first: `seqs[i]` feeds `num_tokens[i]` tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    num_decodes: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    # KV block copies (src, dst) to run before the forward pass (copy-on-write after `fork`).
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int = 8192
    # Admission bounds: beyond them a new request is refused rather than queued.
    max_waiting_seqs: int = 1024
    max_queued_prompt_tokens: int = 262_144

    def __post_init__(self) -> None:
        limits = (
            self.max_num_batched_tokens,
            self.max_num_seqs,
            self.max_model_len,
            self.max_waiting_seqs,
            self.max_queued_prompt_tokens,
        )
        if min(limits) <= 0:
            raise ValueError(f"scheduler limits must be positive: {self}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Otherwise a full batch of decodes would not fit one step and the newest would starve.
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs})"
            )


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        # Oldest first: the victim of a preemption is taken from the end.
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise `RequestTooLongError` if a request could never run to its end."""
        total = num_prompt_tokens + max_tokens
        if num_prompt_tokens == 0:
            raise RequestTooLongError("the prompt is empty")
        if total > self.config.max_model_len:
            raise RequestTooLongError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} "
                "exceeds "
                f"the maximum model length of {self.config.max_model_len} tokens"
            )
        bm = self.block_manager
        if bm.blocks_for_tokens(total) > bm.num_blocks:
            raise RequestTooLongError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} "
                "exceeds "
                f"the KV cache ({bm.num_blocks * bm.block_size} tokens)"
            )

    @property
    def num_queued_tokens(self) -> int:
        """Tokens the waiting sequences still have to prefill."""
        return sum(seq.num_tokens - seq.num_computed_tokens for seq in self.waiting)

    @property
    def num_prefill_tokens_left(self) -> int:
        """Prompt tokens still to prefill, waiting (less what the prefix cache held when they
        were queued) or part-way through a chunked prefill: the work a new request queues behind
        (a routing signal)."""
        waiting = sum(
            seq.num_tokens - max(seq.num_computed_tokens, seq.num_expected_cached_tokens)
            for seq in self.waiting
        )
        running = sum(n for seq in self.running if (n := seq.num_uncomputed_tokens) > 1)
        return waiting + running

    def check_admission(self, num_prompt_tokens: int) -> None:
        """Raise `QueueFullError` if queueing one more prompt would pass the waiting bounds."""
        if len(self.waiting) >= self.config.max_waiting_seqs:
            raise QueueFullError(
                f"{len(self.waiting)} requests are already waiting "
                f"(max_waiting_seqs={self.config.max_waiting_seqs}); retry later"
            )
        queued = self.num_queued_tokens
        if self.waiting and queued + num_prompt_tokens > self.config.max_queued_prompt_tokens:
            raise QueueFullError(
                f"{queued} prompt tokens are already waiting; {num_prompt_tokens} more would pass "
                f"max_queued_prompt_tokens={self.config.max_queued_prompt_tokens}; retry later"
            )

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raises `RequestTooLongError` or `QueueFullError`."""
        self.check_fits(seq.num_prompt_tokens, seq.max_tokens)
        self.check_admission(seq.num_prompt_tokens)
        seq.num_expected_cached_tokens = (
            len(self.block_manager.lookup_prefix(seq)) * self.block_manager.block_size
        )
        self.waiting.append(seq)

    def add_forked(self, parent: Sequence, child: Sequence) -> None:
        """Run `child` beside `parent`, sharing its blocks and computed tokens."""
        self.block_manager.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Retire `seq` (stopped, reached its length, or aborted) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = status
        self.block_manager.free(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        max_seqs = self.config.max_num_seqs
        # Running sequences: decodes first, then prefills that are part-way through, each group
        # oldest first. A sequence preempted meanwhile (by an older one's allocation) is skipped.
        decodes: list[Sequence] = []
        prefills: list[Sequence] = []
        for seq in self.running:
            (decodes if seq.num_tokens - seq.num_computed_tokens == 1 else prefills).append(seq)
        for group, decoding in ((decodes, True), (prefills, False)):
            for seq in group:
                if budget == 0 or len(batch.seqs) == max_seqs:
                    break
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
                ok, refunded = self._allocate_or_preempt(seq, num_tokens, batch)
                budget += refunded
                if ok:
                    self._add_to_batch(batch, seq, num_tokens, decoding)
                    budget -= num_tokens
        # Waiting sequences, first come first served; none start in a step that had to preempt.
        while (
            self.waiting
            and budget > 0
            and not batch.preempted
            and len(self.running) < max_seqs
            and len(batch.seqs) < max_seqs
        ):
            seq = self.waiting[0]
            prefix = self.block_manager.lookup_prefix(seq)
            num_cached = len(prefix) * self.block_manager.block_size
            num_tokens = min(seq.num_tokens - num_cached, budget)
            if not self.block_manager.allocate(seq, num_tokens, prefix):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = num_cached
            seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add_to_batch(batch, seq, num_tokens, seq.num_uncomputed_tokens == 1)
            budget -= num_tokens
        batch.block_copies = self.block_manager.pending_copies
        self.block_manager.pending_copies = []
        return batch

    def update_computed(self, batch: ScheduledBatch) -> None:
        """Count the step's tokens as computed and publish newly full blocks to the prefix cache."""
        for seq, num_tokens in zip(batch.seqs, batch.num_tokens, strict=True):
            before = seq.num_computed_tokens
            seq.num_computed_tokens = before + num_tokens
            self.block_manager.cache_full_blocks(seq, before)

    def _add_to_batch(
        self, batch: ScheduledBatch, seq: Sequence, num_tokens: int, decoding: bool
    ) -> None:
        if decoding:
            batch.seqs.insert(batch.num_decodes, seq)
            batch.num_tokens.insert(batch.num_decodes, num_tokens)
            batch.num_decodes += 1
        else:
            batch.seqs.append(seq)
            batch.num_tokens.append(num_tokens)

    def _allocate_or_preempt(
        self, seq: Sequence, num_tokens: int, batch: ScheduledBatch
    ) -> tuple[bool, int]:
        """Allocate for `seq`, preempting the newest running sequences until it fits.

        Returns whether `seq` got its blocks (False if it was itself the newest left and was
        preempted) and the budget given back by victims already in this step's batch.
        """
        refunded = 0
        while not self.block_manager.allocate(seq, num_tokens):
            victim = self.running[-1]
            if victim is seq:
                self._preempt(seq, batch)
                return False, refunded
            if victim in batch.seqs:
                refunded += self._unschedule(victim, batch)
            self._preempt(victim, batch)
        return True, refunded

    def _unschedule(self, seq: Sequence, batch: ScheduledBatch) -> int:
        i = batch.seqs.index(seq)
        del batch.seqs[i]
        if i < batch.num_decodes:
            batch.num_decodes -= 1
        return batch.num_tokens.pop(i)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
