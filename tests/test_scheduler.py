"""Scheduler behaviour, driven by a fake model that appends a token wherever one is sampled."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import (
    BlockManager,
    RequestTooLongError,
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
