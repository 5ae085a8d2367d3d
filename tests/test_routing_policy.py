"""The cache-aware routing policy and the classic baselines, without Ray."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.block_manager import CacheEvents, prompt_block_hashes
from scheduler.prefix_index import PrefixIndex
from scheduler.routing import (
    FALLBACK,
    LOAD,
    PREFIX_HIT,
    SESSION,
    CostPolicy,
    CostWeights,
    PowerOfTwo,
    QueueKV,
    ReplicaState,
    RoundRobin,
    RouteRequest,
)
from scheduler.routing_state import LoadBoard, PendingLoad, RoutedPrefixes
from scheduler.step_time import StepTimeModel

BS = 16
P = 1e-4  # seconds per prefill token
WEIGHTS = CostWeights(prefill_s_per_token=P, request_s=0.001, kv_fill_s=0.0, tie_s=0.005)
DOCUMENT = list(range(1000, 1000 + 4000))  # 250 blocks


def state(waiting=0, running=0, queued=0, free=1000, total=1000, time=0.0):
    return ReplicaState(waiting, running, queued, free, total, BS, time)


def make_policy(n=4, weights=WEIGHTS, seed=0, **states):
    index = PrefixIndex()
    policy = CostPolicy(weights, index, random.Random(seed))
    for i in range(n):
        name = f"r{i}"
        policy.update_replica(name, states.get(name, state()), 0.0)
    return policy, index


def request(tokens, session=None):
    return RouteRequest(len(tokens), prompt_block_hashes(tokens, BS), session)


def store(index, replica, tokens, seq=1):
    index.apply(replica, CacheEvents(seq, prompt_block_hashes(tokens, BS), []))


def test_a_prompt_goes_to_the_replica_that_holds_its_prefix():
    policy, index = make_policy(r2=state(running=5, queued=200))
    store(index, "r2", DOCUMENT)
    decision = policy.route(request([*DOCUMENT, 1, 2, 3]), now=0.0)
    assert decision.replica_id == "r2", "4,000 cached tokens outweigh a short queue"
    assert decision.reason == PREFIX_HIT and decision.matched_blocks == 250
    assert len(decision.replica_ids) == 4 and len(set(decision.replica_ids)) == 4


def test_no_match_goes_to_the_least_loaded():
    policy, _ = make_policy(r0=state(queued=500), r1=state(running=10), r3=state(queued=100))
    decision = policy.route(request(list(range(300))), now=0.0)
    assert decision.replica_id == "r2" and decision.reason == LOAD


def test_a_burst_of_one_new_prefix_prefills_once_then_spreads_when_the_holder_is_busy():
    """Anti-herding: routed-but-unreported requests count against their replica at once. The
    first request of a new 4,000-token prefix goes anywhere; the next ones follow it (they will
    hit its blocks once computed); when its queue is worth more than a prefill, they spread."""
    policy, _ = make_policy(n=4)
    chosen = [policy.route(request([*DOCUMENT, i]), now=0.0) for i in range(12)]
    first = chosen[0].replica_id
    assert chosen[1].replica_id == first and chosen[1].reason == PREFIX_HIT
    holders = {d.replica_id for d in chosen}
    assert 1 < len(holders) <= 4, f"the burst went to {holders}"
    counts = [sum(d.replica_id == r for d in chosen) for r in sorted(holders)]
    assert max(counts) - min(counts) <= 4, f"uneven spread {counts}"


def test_pending_load_is_dropped_by_the_report_that_shows_it():
    policy, _ = make_policy(n=2)
    policy.route(request(list(range(2000))), now=1.0)  # 2,000 uncached tokens: 0.2 s
    target = max(policy.replica_ids, key=lambda r: policy.load_of(r, 1.0))
    assert policy.load_of(target, 1.0) == pytest.approx(0.2 + 0.001)
    assert policy.load_of(target, 1.1) == pytest.approx(0.1 + 0.001), "queued prefill drains"
    policy.update_replica(target, state(waiting=1, queued=2000, time=0.5), now=1.2)
    assert policy.pending.get(target)[0] == 1, "a report from before the routing does not show it"
    policy.update_replica(target, state(waiting=1, queued=2000, time=1.2), now=1.2)
    assert policy.pending.get(target) == (0, 0, 0)
    assert policy.load_of(target, 1.2) == pytest.approx(0.2 + 0.001)


def test_load_guard_lets_load_win_over_affinity():
    """r0 holds the document (a 0.4 s prefill) and has 0.3 s of queued prefill: the cost picks it
    (0.3 < 0.4), but a tight guard says that imbalance is too much; a loose one allows it."""

    def route(guard_s):
        weights = CostWeights(prefill_s_per_token=P, tie_s=0.0, load_guard_s=guard_s)
        policy, index = make_policy(weights=weights, r0=state(queued=3_000))
        store(index, "r0", DOCUMENT)
        return policy.route(request([*DOCUMENT, 7]), now=0.0)

    tight = route(guard_s=0.1)
    assert tight.replica_id != "r0" and tight.reason == LOAD and tight.matched_blocks == 0
    loose = route(guard_s=0.5)
    assert loose.replica_id == "r0" and loose.reason == PREFIX_HIT


def test_prompt_that_fits_nowhere_queues_on_the_least_loaded():
    tight = {f"r{i}": state(free=10, queued=100 * i) for i in range(3)}
    policy, _ = make_policy(n=3, **tight)
    decision = policy.route(request(list(range(1000))), now=0.0)  # 63 blocks > 10 free
    assert decision.reason == FALLBACK and decision.replica_id == "r0"


def test_a_cached_prefix_makes_a_full_replica_fit():
    policy, index = make_policy(n=2, r0=state(free=5), r1=state(free=5, queued=100))
    store(index, "r1", DOCUMENT)
    decision = policy.route(request([*DOCUMENT, 1]), now=0.0)
    assert decision.replica_id == "r1", "only r1 has room for the uncached part"


def test_session_affinity_holds_while_load_allows():
    weights = CostWeights(prefill_s_per_token=P, tie_s=0.0, load_guard_s=0.2)
    policy, _ = make_policy(weights=weights)
    first = policy.route(request(list(range(50)), session="abc"), now=0.0)
    again = policy.route(request(list(range(900, 950)), session="abc"), now=0.0)
    assert again.replica_id == first.replica_id and again.reason == SESSION
    policy.update_replica(first.replica_id, state(queued=20_000, time=0.1), now=0.1)
    moved = policy.route(request(list(range(900, 950)), session="abc"), now=0.1)
    assert moved.replica_id != first.replica_id and moved.reason == LOAD
    no_sessions = CostPolicy(CostWeights(session_affinity=False), None, random.Random(0))
    no_sessions.update_replica("x", state(), 0.0)
    assert no_sessions.route(request([1, 2, 3], session="abc"), 0.0).reason == LOAD


def test_removed_replica_is_never_chosen_even_if_the_index_still_names_it():
    policy, index = make_policy(n=3)
    store(index, "r1", DOCUMENT)
    policy.remove_replica("r1")  # the index was not told: stale
    decisions = [policy.route(request([*DOCUMENT, i]), now=0.0) for i in range(20)]
    assert all("r1" not in d.replica_ids for d in decisions)
    assert set(policy.replica_ids) == {"r0", "r2"}
    with pytest.raises(LookupError):
        CostPolicy(WEIGHTS).route(request([1]), 0.0)


def test_equal_replicas_share_work_at_random():
    weights = CostWeights(prefill_s_per_token=P)
    firsts = set()
    for seed in range(20):
        policy, _ = make_policy(n=4, weights=weights, seed=seed)
        firsts.add(policy.route(request(list(range(100))), now=0.0).replica_id)
    assert firsts == {"r0", "r1", "r2", "r3"}


@settings(max_examples=40, deadline=None)
@given(
    prompts=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 600)), min_size=1, max_size=30),
    seed=st.integers(0, 1000),
)
def test_routed_prefix_match_equals_the_longest_common_block_prefix(prompts, seed):
    """The binary search over chained hashes finds exactly the leading blocks shared with the
    latest prompt routed to each replica that starts alike."""
    rng = random.Random(seed)
    bases = [[rng.randrange(50) for _ in range(640)] for _ in range(4)]
    routed = RoutedPrefixes(ttl_s=10.0)
    sent: dict[str, list[list[bytes]]] = {}
    for k, (base, length) in enumerate(prompts):
        hashes = prompt_block_hashes(bases[base][:length], BS)
        replica = f"r{k % 3}"
        routed.add(replica, hashes, now=0.0)
        sent.setdefault(replica, []).append(hashes)
    query = prompt_block_hashes(bases[0][:500] + [99] * 40, BS)
    expected = {}
    for replica, lists in sent.items():
        # The latest prompt sent to the replica that starts like the query counts.
        latest = [h for h in lists if h and h[0] == query[0]][-1:]
        for hashes in latest:
            n = 0
            while n < min(len(hashes), len(query)) and hashes[n] == query[n]:
                n += 1
            expected[replica] = n
    assert routed.match(query) == expected
    routed.expire(now=10.0)
    assert routed.match(query) == {}, "routed prompts are forgotten after their ttl"


def test_pending_entries_expire_even_without_reports():
    pending = PendingLoad(report_lag_s=0.0, ttl_s=5.0)
    pending.add("r", now=0.0, tokens=100, blocks=7)
    pending.reflect("r", report_time=-1.0, now=4.0)
    assert pending.get("r") == (1, 100, 7)
    pending.reflect("r", report_time=-1.0, now=6.0)
    assert pending.get("r") == (0, 0, 0)


def test_weights_from_a_step_model():
    model = StepTimeModel(0.007, 3e-5, 1e-5, 4e-8, 1e-9)
    weights = CostWeights.from_step_model(model, max_num_batched_tokens=8192)
    assert weights.prefill_s_per_token == pytest.approx(
        model.seconds(8192, 1, 8192, 8192 * 2048) / 8192
    )
    assert weights.tie_s == pytest.approx(model.seconds(1, 1, 2048, 2048))
    with pytest.raises(ValueError):
        CostWeights(prefill_s_per_token=0)
    with pytest.raises(ValueError):
        CostWeights(load_guard_ratio=0.5)


def test_baselines_route_by_their_rules():
    rr = RoundRobin(random.Random(0))
    p2 = PowerOfTwo(random.Random(0))
    qk = QueueKV(rng=random.Random(0))
    for policy in (rr, p2, qk):
        for i in range(4):
            policy.update_replica(f"r{i}", state(running=10 * i, free=1000 - 200 * i), 0.0)
    assert len({rr.route(request([1]), 0.0).replica_id for _ in range(4)}) == 4
    assert qk.route(request([1]), 0.0).replica_id == "r0"
    picks = [p2.route(request([1]), 0.0).replica_id for _ in range(12)]
    assert "r3" not in picks, "the busiest replica never wins a pair"


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["set", "set", "set", "remove", "query"]),
            st.integers(0, 7),  # replica
            st.floats(0, 2),  # until, relative to now
            st.floats(0, 1),  # other load
            st.floats(0, 0.5),  # time step
        ),
        min_size=1,
        max_size=60,
    ),
    tie=st.sampled_from([0.0, 0.01, 0.3]),
)
def test_load_board_agrees_with_computing_every_load(ops, tie):
    board, truth, now = LoadBoard(), {}, 0.0
    for op, r, until, other, step in ops:
        now += step
        name = f"r{r}"
        if op == "set":
            board.set(name, now + until - 1, other, now)  # some already done, some not
            truth[name] = (now + until - 1, other)
        elif op == "remove":
            board.remove(name)
            truth.pop(name, None)
        elif truth:
            loads = {n: max(u - now, 0.0) + o for n, (u, o) in truth.items()}
            lowest, busy, idle = board.least(now, tie)
            assert lowest == pytest.approx(min(loads.values()))
            ties = {board.idle_at(i) for i in range(idle)} | set(busy or [])
            eps = 1e-9  # the board adds and subtracts in another order
            assert all(loads[n] <= lowest + tie + eps for n in ties), (ties, loads)
            assert {n for n, load in loads.items() if load <= lowest + tie - eps} <= ties
            assert all(board.load(n, now) == pytest.approx(v) for n, v in loads.items())
    assert len(board) == len(truth)
