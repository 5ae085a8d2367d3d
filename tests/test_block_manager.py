"""Block manager invariants under random allocate / compute / append / fork / free / preempt."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler import BlockManager, Sequence
from scheduler.block_manager import CacheEvents, hash_block, prompt_block_hashes

BLOCK_SIZE = 4
NUM_BLOCKS = 24


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives a BlockManager like the scheduler does, with a fake KV store to check contents.

    The fake store records which token each cache slot holds; prefix hits and copy-on-write are
    correct only if every sequence's computed tokens are found in its own blocks. A mirror of the
    prefix cache, built only from drained cache events, must equal the cache after each drain.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(
            NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=True, record_cache_events=True
        )
        self.mirror: set[bytes] = set()
        self.last_seq = 0
        self.seqs: list[Sequence] = []
        self.slots: dict[int, int] = {}  # cache slot -> token written there
        self.counter = 0

    # --- rules --------------------------------------------------------------------------------

    @rule(
        # A tiny alphabet and shared starts make prefix-cache hits common.
        prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]),
        tail=st.lists(st.integers(1, 3), min_size=1, max_size=12),
        budget=st.integers(1, 16),
    )
    def admit(self, prefix, tail, budget):
        self.counter += 1
        seq = Sequence(f"s{self.counter}", prefix + tail, max_tokens=8)
        hits = self.bm.lookup_prefix(seq)
        cached = len(hits) * BLOCK_SIZE
        assert cached < seq.num_tokens, "a prefix hit must leave a token to compute"
        num = min(seq.num_tokens - cached, budget)
        if self.bm.allocate(seq, num, hits):
            seq.num_computed_tokens = cached
            self.seqs.append(seq)
            self._compute(seq, num)
        else:
            assert not seq.block_table, "a failed allocation must change nothing"

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), budget=st.integers(1, 16))
    def step(self, data, budget):
        """Feed a sequence its next tokens (a prefill chunk, or a decode after appending one)."""
        seq = data.draw(st.sampled_from(self.seqs))
        if seq.num_uncomputed_tokens == 0:
            seq.append_token(data.draw(st.integers(1, 3)))
        num = min(seq.num_uncomputed_tokens, budget)
        free_before = self.bm.num_free_blocks
        if self.bm.allocate(seq, num):
            self._run_copies()
            self._compute(seq, num)
        else:
            assert self.bm.num_free_blocks == free_before

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.seqs))
        if parent.num_uncomputed_tokens:
            return  # forks happen when a sequence is fully computed
        self.counter += 1
        child = Sequence(f"s{self.counter}", list(parent.token_ids), max_tokens=8)
        self.bm.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        self.seqs.append(child)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), preempt=st.booleans())
    def release(self, data, preempt):
        """Finish a sequence, or preempt it (free its blocks; it would be recomputed later)."""
        seq = data.draw(st.sampled_from(self.seqs))
        self.bm.free(seq)
        self.seqs.remove(seq)
        if preempt:
            seq.num_computed_tokens = 0
            assert not seq.block_table

    @rule(snapshot=st.booleans())
    def drain_events(self, snapshot):
        events = self.bm.drain_cache_events(snapshot)
        assert events.seq == self.last_seq + 1, "reports must be numbered one by one"
        self.last_seq = events.seq
        assert not set(events.stored) & set(events.removed), "a hash both stored and removed"
        if events.snapshot:
            self.mirror = set(events.stored)
        else:
            assert not set(events.stored) & self.mirror, "stored twice without a removal"
            assert set(events.removed) <= self.mirror, "removed a hash never stored"
            self.mirror = (self.mirror - set(events.removed)) | set(events.stored)
        assert self.mirror == set(self.bm.cached_blocks), "events do not replay to the cache"

    # --- helpers ------------------------------------------------------------------------------

    def _compute(self, seq: Sequence, num: int) -> None:
        before = seq.num_computed_tokens
        for pos in range(before, before + num):
            block = seq.block_table[pos // BLOCK_SIZE]
            assert self.bm.ref_counts[block] == 1, "writing into a block another sequence shares"
            self.slots[block * BLOCK_SIZE + pos % BLOCK_SIZE] = seq.token_ids[pos]
        seq.num_computed_tokens = before + num
        self.bm.cache_full_blocks(seq, before)

    def _run_copies(self) -> None:
        for src, dst in self.bm.pending_copies:
            for offset in range(BLOCK_SIZE):
                if (slot := src * BLOCK_SIZE + offset) in self.slots:
                    self.slots[dst * BLOCK_SIZE + offset] = self.slots[slot]
        self.bm.pending_copies.clear()

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def every_block_free_cached_or_owned(self):
        owners = [0] * NUM_BLOCKS
        for seq in self.seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), (
                f"{seq.seq_id} holds a block twice"
            )
            for block in seq.block_table:
                owners[block] += 1
        for block in range(NUM_BLOCKS):
            assert self.bm.ref_counts[block] == owners[block], f"block {block}: ref count != owners"
            assert (block in self.bm.free_blocks) == (owners[block] == 0), f"block {block} lost"
        assert self.bm.num_free_blocks + sum(1 for o in owners if o) == NUM_BLOCKS

    @invariant()
    def prefix_cache_index_is_consistent(self):
        for block_hash, block in self.bm.cached_blocks.items():
            assert self.bm.block_hashes[block] == block_hash
        for block, block_hash in enumerate(self.bm.block_hashes):
            if block_hash is not None:
                assert self.bm.cached_blocks[block_hash] == block

    @invariant()
    def computed_tokens_are_in_own_blocks(self):
        for seq in self.seqs:
            assert len(seq.block_table) * BLOCK_SIZE >= seq.num_computed_tokens
            for pos in range(seq.num_computed_tokens):
                slot = seq.block_table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
                assert self.slots.get(slot) == seq.token_ids[pos], (
                    f"{seq.seq_id} position {pos} reads another token from the cache"
                )

    def teardown(self):
        for seq in self.seqs:
            self.bm.free(seq)
        assert self.bm.num_free_blocks == NUM_BLOCKS, "blocks leaked after every sequence finished"
        assert all(r == 0 for r in self.bm.ref_counts)


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_prompt_block_hashes_is_the_block_managers_chained_hash():
    tokens = list(range(37))
    hashes = prompt_block_hashes(tokens, 4)
    expected, parent = [], b""
    for i in range(0, 36, 4):
        parent = hash_block(parent, tokens[i : i + 4])
        expected.append(parent)
    assert hashes == expected, "the ingress must hash exactly as the replicas do"
    bm = BlockManager(16, 4)
    seq = Sequence("a", tokens, max_tokens=1)
    bm.update_block_hashes(seq)
    assert seq.block_hashes == hashes
    assert prompt_block_hashes(tokens[:3], 4) == [], "a partial block has no hash"


def test_cache_events_are_off_by_default_and_report_evictions():
    assert BlockManager(4, 2)._cache_changes is None
    with pytest.raises(RuntimeError, match="does not record"):
        BlockManager(4, 2).drain_cache_events()
    bm = BlockManager(2, 2, record_cache_events=True)
    seq = Sequence("a", [1, 2, 3, 4, 5], max_tokens=1)
    assert bm.allocate(seq, 4)
    seq.num_computed_tokens = 4
    bm.cache_full_blocks(seq, 0)
    bm.free(seq)
    stored = bm.drain_cache_events()
    assert stored == CacheEvents(1, prompt_block_hashes([1, 2, 3, 4], 2), [])
    other = Sequence("b", [9, 9, 9], max_tokens=1)
    assert bm.allocate(other, 3), "both cached blocks are evicted for new work"
    assert set(bm.drain_cache_events().removed) == set(stored.stored)
    assert bm.drain_cache_events() == CacheEvents(3, [], [])


def test_prefix_hit_shares_blocks_and_counts_hits():
    bm = BlockManager(8, 4)
    first = Sequence("a", list(range(10)), max_tokens=4)
    assert bm.allocate(first, 10)
    first.num_computed_tokens = 10
    bm.cache_full_blocks(first, 0)
    second = Sequence("b", list(range(9)) + [99], max_tokens=4)
    hits = bm.lookup_prefix(second)
    assert hits == first.block_table[:2], "the two full blocks of the shared 8-token prefix"
    assert bm.allocate(second, 2, hits)
    assert bm.ref_counts[hits[0]] == 2
    assert bm.prefix_cache_hits == 8 and bm.prefix_cache_queries == 20


def test_cached_blocks_survive_free_and_are_evicted_last():
    bm = BlockManager(4, 2)
    seq = Sequence("a", [1, 2, 3, 4, 5], max_tokens=1)
    assert bm.allocate(seq, 5)
    seq.num_computed_tokens = 5
    bm.cache_full_blocks(seq, 0)
    bm.free(seq)
    assert bm.num_free_blocks == 4
    again = Sequence("b", [1, 2, 3, 4, 9], max_tokens=1)
    assert len(bm.lookup_prefix(again)) == 2, "freed full blocks stay in the prefix cache"
    # The uncached free blocks are reused before any cached one is evicted.
    other = Sequence("c", [7, 7], max_tokens=1)
    assert bm.allocate(other, 2)
    assert len(bm.lookup_prefix(again)) == 2


def test_allocate_refuses_without_side_effects():
    bm = BlockManager(2, 4)
    seq = Sequence("a", list(range(12)), max_tokens=1)
    assert not bm.allocate(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2


@pytest.mark.parametrize("bad", [(0, 16), (4, 0)])
def test_rejects_empty_cache(bad):
    with pytest.raises(ValueError):
        BlockManager(*bad)
