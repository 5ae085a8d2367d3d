"""Scheduler behaviour, driven by a fake model that appends a token wherever one is sampled."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler import (
    BlockManager,
    QueueFullError,
    RequestTooLongError,
    ScheduledBatch,
    Scheduler,
    SchedulerConfig,
    Sequence,
    SequenceStatus,
)


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8, max_len=256, caching=True):
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(budget, max_seqs, max_len), bm)


def fake_step(sched: Scheduler, rng: random.Random):
    """One engine step without a model: compute what was scheduled, sample where due, finish."""
    batch = sched.schedule()
    due = [
        s
        for s, n in zip(batch.seqs, batch.num_tokens, strict=True)
        if s.num_computed_tokens + n == s.num_tokens
    ]
    sched.update_computed(batch)
    for seq in due:
        seq.append_token(rng.randint(0, 5))
        if seq.num_output_tokens >= seq.max_tokens:
            sched.finish(seq, SequenceStatus.FINISHED_LENGTH)
    return batch


workloads = st.lists(
    st.tuples(
        st.integers(1, 60), st.integers(1, 30), st.integers(0, 3)
    ),  # prompt, output, arrival step
    min_size=1,
    max_size=20,
)


@settings(max_examples=120, deadline=None)
@given(
    workload=workloads,
    budget=st.integers(8, 48),
    max_seqs=st.integers(1, 8),
    num_blocks=st.integers(23, 80),
    caching=st.booleans(),
    seed=st.integers(0, 100),
)
def test_limits_hold_and_every_request_finishes(
    workload, budget, max_seqs, num_blocks, caching, seed
):
    rng = random.Random(seed)
    max_seqs = min(max_seqs, budget)
    sched = make_scheduler(num_blocks, 4, budget, max_seqs, max_len=90, caching=caching)
    pending = sorted(
        (
            (arrival, Sequence(f"r{i}", [rng.randint(0, 3) for _ in range(p)], max_tokens=o))
            for i, (p, o, arrival) in enumerate(workload)
        ),
        key=lambda item: item[0],
    )
    seqs = [s for _, s in pending]
    for step in range(5000):
        while pending and pending[0][0] <= step:
            sched.add(pending.pop(0)[1])
        decoding_before = [s for s in sched.running if s.num_uncomputed_tokens == 1]
        batch = fake_step(sched, rng)
        assert batch.total_tokens <= budget, "token budget exceeded"
        assert len(batch.seqs) <= max_seqs, "max_num_seqs exceeded"
        assert len(sched.running) <= max_seqs
        assert all(n >= 1 for n in batch.num_tokens)
        assert all(n == 1 for n in batch.num_tokens[: batch.num_decodes])
        if len(decoding_before) <= max_seqs and not batch.preempted:
            missed = [
                s.seq_id for s in decoding_before if s not in batch.seqs and not s.is_finished
            ]
            assert not missed, f"decodes starved: {missed}"
        if not pending and not sched.has_unfinished():
            break
    else:
        pytest.fail("requests did not finish: the scheduler is stuck")
    assert all(s.num_output_tokens == s.max_tokens for s in seqs)
    assert sched.block_manager.num_free_blocks == num_blocks, "blocks leaked"


def test_decodes_go_first_and_prefill_is_chunked():
    sched = make_scheduler(budget=16, max_seqs=4)
    rng = random.Random(0)
    short = Sequence("short", [1, 2, 3], max_tokens=10)
    sched.add(short)
    fake_step(sched, rng)  # prefill of `short`; it now decodes
    long = Sequence("long", list(range(40)), max_tokens=2)
    sched.add(long)
    batch = fake_step(sched, rng)
    assert batch.seqs[0] is short and batch.num_tokens[0] == 1, "the decode comes first"
    assert batch.seqs[1] is long and batch.num_tokens[1] == 15, "the prefill takes what is left"
    assert batch.num_decodes == 1
    batch = fake_step(sched, rng)
    assert batch.num_tokens == [1, 15], "one step mixes a decode and the next prefill chunk"


def test_preempts_newest_and_oldest_completes():
    # 6 blocks of 4 tokens: two sequences of 8 + 8 cannot both finish without preemption.
    sched = make_scheduler(num_blocks=6, block_size=4, budget=32, max_seqs=4, max_len=24)
    rng = random.Random(0)
    old = Sequence("old", list(range(8)), max_tokens=12)
    new = Sequence("new", list(range(100, 108)), max_tokens=12)
    sched.add(old)
    sched.add(new)
    preempted = []
    for _ in range(200):
        batch = fake_step(sched, rng)
        preempted += [s.seq_id for s in batch.preempted]
        if not sched.has_unfinished():
            break
    assert preempted and set(preempted) == {"new"}, "only the newest is ever preempted"
    assert old.num_output_tokens == 12 and new.num_output_tokens == 12
    assert new.num_preemptions >= 1 and old.num_preemptions == 0
    assert sched.block_manager.num_free_blocks == 6


def test_request_longer_than_the_model_is_rejected_at_admission():
    sched = make_scheduler(max_len=256)
    with pytest.raises(RequestTooLongError, match="maximum model length of 256"):
        sched.add(Sequence("x", [1] * 250, max_tokens=10))
    with pytest.raises(RequestTooLongError, match="empty"):
        sched.add(Sequence("y", [], max_tokens=10))
    assert not sched.has_unfinished(), "a rejected request must not be queued"


def test_request_larger_than_the_cache_is_rejected():
    sched = make_scheduler(num_blocks=4, block_size=4, max_len=1000)
    with pytest.raises(RequestTooLongError, match="KV cache"):
        sched.add(Sequence("x", [1] * 10, max_tokens=10))
    assert not sched.has_unfinished()


def test_config_rejects_budget_below_max_seqs():
    with pytest.raises(ValueError, match="at least"):
        SchedulerConfig(max_num_batched_tokens=4, max_num_seqs=8)


def test_admission_bounds_refuse_new_requests_but_not_running_ones():
    bm = BlockManager(64, 4)
    sched = Scheduler(
        SchedulerConfig(32, 8, 256, max_waiting_seqs=2, max_queued_prompt_tokens=50), bm
    )
    sched.add(Sequence("a", [1] * 30, 4))
    with pytest.raises(QueueFullError, match="max_queued_prompt_tokens"):
        sched.add(Sequence("b", [1] * 30, 4))
    sched.add(Sequence("c", [1] * 10, 4))
    with pytest.raises(QueueFullError, match="max_waiting_seqs"):
        sched.add(Sequence("d", [1] * 1, 4))
    assert [s.seq_id for s in sched.waiting] == ["a", "c"], "a refused request must not be queued"
    fake_step(sched, random.Random(0))  # both start: the queue has room again
    sched.add(Sequence("d", [1] * 40, 4))
    assert sched.num_waiting == 1


class SchedulerMachine(RuleBasedStateMachine):
    """Random add / step / abort / forced preemption against the invariants of the scheduler and
    its block manager: limits per step, every block free, cached or owned by the sequences
    that hold it, and nothing left behind once all requests are gone."""

    def __init__(self) -> None:
        super().__init__()
        self.sched = make_scheduler(num_blocks=24, block_size=4, budget=16, max_seqs=4, max_len=64)
        self.sched.config = SchedulerConfig(16, 4, 64, max_waiting_seqs=6)
        self.live: list[Sequence] = []
        self.rng = random.Random(0)
        self.count = 0

    @rule(prompt=st.integers(1, 40), output=st.integers(1, 20), shared=st.booleans())
    def add(self, prompt, output, shared):
        self.count += 1
        tokens = ([7] * 8 if shared else []) + [self.rng.randint(1, 9) for _ in range(prompt)]
        seq = Sequence(f"s{self.count}", tokens, output)
        try:
            self.sched.add(seq)
        except RequestTooLongError:
            assert (
                seq.num_tokens + output > 64
                or self.sched.block_manager.blocks_for_tokens(seq.num_tokens + output) > 24
            )
        except QueueFullError:
            assert self.sched.num_waiting >= 6
        else:
            self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule()
    def step(self):
        decoding = [s for s in self.sched.running if s.num_uncomputed_tokens == 1]
        batch = fake_step(self.sched, self.rng)
        assert batch.total_tokens <= 16 and len(batch.seqs) <= 4, "a step passed its limits"
        assert len(set(batch.seqs)) == len(batch.seqs), "a sequence was scheduled twice"
        assert all(n == 1 for n in batch.num_tokens[: batch.num_decodes])
        for seq in decoding[:4]:
            assert seq in batch.seqs or seq in batch.preempted, f"decode of {seq.seq_id} starved"
        self.live = [s for s in self.live if not s.is_finished]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.sched.finish(seq, SequenceStatus.FINISHED_ABORTED)
        self.live.remove(seq)
        assert not seq.block_table, "an aborted sequence kept its blocks"

    @precondition(lambda self: len(self.sched.running) > 1)
    @rule()
    def preempt_newest(self):
        victim = self.sched.running[-1]
        self.sched._preempt(victim, ScheduledBatch())
        assert victim.status is SequenceStatus.WAITING and not victim.block_table

    @invariant()
    def blocks_are_free_cached_or_owned(self):
        bm = self.sched.block_manager
        owners: dict[int, int] = {}
        for seq in self.sched.running:
            for block in seq.block_table:
                owners[block] = owners.get(block, 0) + 1
        for seq in self.sched.waiting:
            assert not seq.block_table, "a waiting sequence holds blocks"
        for block in range(bm.num_blocks):
            assert bm.ref_counts[block] == owners.get(block, 0), f"block {block} miscounted"
        assert bm.num_free_blocks == bm.num_blocks - len(owners)

    @invariant()
    def every_live_sequence_is_queued_once(self):
        queued = list(self.sched.waiting) + self.sched.running
        assert len(queued) == len(set(queued)) == len(self.live)

    def teardown(self):
        for seq in list(self.live):
            self.sched.finish(seq, SequenceStatus.FINISHED_ABORTED)
        bm = self.sched.block_manager
        assert bm.num_free_blocks == bm.num_blocks, "blocks leaked after every request ended"


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_scheduler_state_machine = SchedulerMachine.TestCase


def test_prefill_left_counts_only_what_the_prefix_cache_does_not_hold():
    """The routing signal: a queued prompt whose prefix is cached adds only its uncached tokens
    (else a replica holding a popular prefix looks busy with work it will skip); a chunked
    prefill in progress adds what it has left."""
    sched = make_scheduler(block_size=4, budget=8)
    document = list(range(100, 140))  # 10 full blocks
    first = Sequence("first", document + [1, 2], max_tokens=1)
    sched.add(first)
    assert sched.num_prefill_tokens_left == 42
    sched.update_computed(sched.schedule())  # 8 of 42 computed
    assert sched.num_prefill_tokens_left == 34
    rng = random.Random(0)
    while not first.is_finished:
        fake_step(sched, rng)
    repeat = Sequence("repeat", document + [3, 4], max_tokens=1)
    sched.add(repeat)
    assert sched.num_prefill_tokens_left == 2, "the 40 cached prompt tokens are not queued work"
