"""The router's prefix index against the real block managers whose events it applies."""

from __future__ import annotations

import os
import random
import tracemalloc

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler import BlockManager, Sequence
from scheduler.block_manager import CacheEvents, prompt_block_hashes
from scheduler.prefix_index import PrefixIndex

BLOCK_SIZE = 2
NUM_BLOCKS = 8  # small: eviction is common
PREFIXES = [[1, 2, 3, 4], [1, 2, 5, 6], [7, 7, 7, 7, 7, 7]]


def run_prompt(bm: BlockManager, tokens: list[int]) -> None:
    """Prefill a prompt like the scheduler would (prefix hit, allocate, compute), then free it."""
    seq = Sequence("x", tokens, max_tokens=1)
    hits = bm.lookup_prefix(seq)
    cached = len(hits) * BLOCK_SIZE
    if not bm.allocate(seq, len(tokens) - cached, hits):
        return
    seq.num_computed_tokens = len(tokens)
    bm.cache_full_blocks(seq, cached)
    bm.free(seq)


class IndexMachine(RuleBasedStateMachine):
    """Replicas run prompts, report (or lose) their cache events, die and restart; after every
    delivered report the index must equal what the replicas' caches hold. Lost reports may only
    leave extra (stale) entries, which a snapshot clears."""

    def __init__(self) -> None:
        super().__init__()
        self.index = PrefixIndex()
        self.replicas: dict[str, BlockManager] = {}
        # The replica's cache at its last delivered report, or None after a lost one (until a
        # snapshot); and every hash it ever reported stored.
        self.reported: dict[str, set[bytes] | None] = {}
        self.ever: dict[str, set[bytes]] = {}
        self.count = 0

    def _fresh(self, name: str) -> None:
        self.replicas[name] = BlockManager(NUM_BLOCKS, BLOCK_SIZE, record_cache_events=True)
        self.reported[name] = set()
        self.ever[name] = set()

    @rule()
    def start_replica(self):
        self.count += 1
        self._fresh(f"r{self.count}")

    @precondition(lambda self: self.replicas)
    @rule(data=st.data(), prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(1, 3)))
    def run(self, data, prefix, tail):
        name = data.draw(st.sampled_from(sorted(self.replicas)))
        run_prompt(self.replicas[name], prefix + tail)

    @precondition(lambda self: self.replicas)
    @rule(data=st.data(), lose=st.booleans(), snapshot=st.booleans())
    def report(self, data, lose, snapshot):
        name = data.draw(st.sampled_from(sorted(self.replicas)))
        bm = self.replicas[name]
        events = bm.drain_cache_events(snapshot)
        self.ever[name] |= set(events.stored)
        if lose and not snapshot:
            self.reported[name] = None
            return
        self.index.apply(name, events)
        if snapshot or self.reported[name] is not None:
            self.reported[name] = set(bm.cached_blocks)
        self.index.apply(name, events)  # a duplicate is ignored

    @precondition(lambda self: self.replicas)
    @rule(data=st.data(), restart=st.booleans())
    def kill(self, data, restart):
        """A replica dies (Serve drops it) or its engine restarts (a fresh block manager)."""
        name = data.draw(st.sampled_from(sorted(self.replicas)))
        if restart:
            self._fresh(name)
            run_prompt(self.replicas[name], [9, 9, 9, 9])
            events = self.replicas[name].drain_cache_events()  # report no. 1
            self.ever[name] |= set(events.stored)
            self.index.apply(name, events)
            self.reported[name] = set(self.replicas[name].cached_blocks)
        else:
            del self.replicas[name]
            self.index.drop_replica(name)

    @invariant()
    def index_is_the_union_of_the_replicas_caches(self):
        truth: dict[bytes, set[str]] = {}
        for name in self.replicas:
            held = self.index.blocks_of(name)
            if self.reported[name] is not None:
                assert held == self.reported[name], f"{name}: index differs from its cache"
            assert held <= self.ever[name], f"{name}: indexed a block it never reported"
            for block_hash in held:
                truth.setdefault(block_hash, set()).add(name)
        assert set(self.index.replicas) <= set(self.replicas), "a dead replica is still indexed"
        for block_hash, names in truth.items():
            assert self.index.holders(block_hash) == names
        assert self.index.stats().entries == sum(len(n) for n in truth.values())

    @invariant()
    def match_counts_leading_blocks(self):
        """Exact while the index is the replicas' caches (no lost report); after a loss, only
        plausible (it may cost hits, never name a replica without the first block)."""
        consistent = all(reported is not None for reported in self.reported.values())
        for prefix in PREFIXES:
            hashes = prompt_block_hashes(prefix, BLOCK_SIZE)
            expected = {}
            for name in self.index.replicas:
                held = self.index.blocks_of(name)
                n = 0
                while n < len(hashes) and hashes[n] in held:
                    n += 1
                if n:
                    expected[name] = n
            got = self.index.match(hashes)
            if consistent:
                assert got == expected
            else:
                assert set(got) == set(expected)
                assert all(1 <= n <= len(hashes) for n in got.values())


IndexMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
test_index_state_machine = IndexMachine.TestCase


def test_match_bisects_long_prompts_with_few_lookups():
    index = PrefixIndex()
    prompt = prompt_block_hashes(list(range(6000)), 16)  # 375 blocks
    for r, blocks in enumerate((375, 375, 200, 17, 1)):
        index.add(f"r{r}", prompt[:blocks])
    lookups = []
    holders = index._holders

    class Counting(dict):
        def get(self, key, default=None):
            lookups.append(key)
            return holders.get(key, default)

    index._holders = Counting()
    assert index.match(prompt) == {"r0": 375, "r1": 375, "r2": 200, "r3": 17, "r4": 1}
    assert len(lookups) < 50, f"{len(lookups)} lookups for 375 blocks"
    index._holders = holders
    assert index.match(prompt[:1]) == {"r0": 1, "r1": 1, "r2": 1, "r3": 1, "r4": 1}
    assert index.match([]) == {} and index.match([b"unknown"]) == {}


def test_bounded_index_evicts_least_recently_used_tails_first():
    index = PrefixIndex(max_entries=10)
    a = [os.urandom(16) for _ in range(6)]
    b = [os.urandom(16) for _ in range(6)]
    index.apply("r1", CacheEvents(1, a, []))
    index.apply("r2", CacheEvents(1, b, []))
    stats = index.stats()
    assert stats.entries <= 10 and stats.evicted_blocks == 2
    assert index.match(a) == {"r1": 4}, "the oldest prompt lost its tail, not its head"
    assert index.match(b) == {"r2": 6}


def test_gap_in_reports_is_counted_and_a_snapshot_resyncs():
    index = PrefixIndex()
    x, y, z = (os.urandom(16) for _ in range(3))
    index.apply("r", CacheEvents(1, [x, y], []))
    index.apply("r", CacheEvents(3, [z], []))  # report 2 (removing y) was lost
    assert index.stats().missed_reports == 1
    assert index.blocks_of("r") == {x, y, z}, "stale until a snapshot"
    index.apply("r", CacheEvents(4, [x, z], [], snapshot=True))
    assert index.blocks_of("r") == {x, z}
    index.apply("r", CacheEvents(2, [], [x]))  # older than what was applied: ignored
    assert index.blocks_of("r") == {x, z}


def test_memory_estimate_matches_tracemalloc():
    rng = random.Random(0)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = PrefixIndex()
    shared = [rng.randbytes(16) for _ in range(2000)]
    for r in range(64):
        index.add(f"r{r}", [rng.randbytes(16) for _ in range(500)] + shared[: rng.randint(0, 2000)])
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    estimate = index.stats().approx_bytes
    assert 0.75 < estimate / used < 1.33, f"estimate {estimate} vs measured {used} bytes"


def test_replica_reports_keep_the_index_equal_to_the_cache_and_repair_lost_ones():
    """CacheReporter's numbered net changes, applied in order, give the index exactly the
    replica's cache; a lost report leaves it stale only until the next snapshot."""
    from replicas.cache_report import SNAPSHOT_EVERY, CacheReporter

    rng = random.Random(0)
    hashes = [bytes([i]) * 16 for i in range(40)]
    reporter, index, cache = CacheReporter(), PrefixIndex(10_000), set()

    def index_view() -> set[bytes]:
        return {h for h in hashes if index.match([h]).get("r") == 1}

    lost_at = 7
    for number in range(1, 3 * SNAPSHOT_EVERY + 1):
        for _ in range(3):  # several drains per report: a hash may come and go between reports
            # One drain is a net change (BlockManager.drain_cache_events): no hash in both lists.
            removed = [h for h in rng.sample(hashes, 4) if h in cache]
            stored = [h for h in rng.sample(hashes, 4) if h not in removed]
            cache -= set(removed)
            cache |= set(stored)
            reporter.absorb(stored, removed)
        report = reporter.report()
        assert report["seq"] == number
        if number == lost_at:
            continue  # Serve handed the router a later report only
        index.apply("r", CacheEvents(**report))
        if number < lost_at or number > SNAPSHOT_EVERY:
            assert index_view() == cache, f"report {number}: index differs from the cache"
