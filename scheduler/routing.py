"""Routing policies: which replica should take a new request. Pure Python over load reports.

`rank_replicas` is the queue + KV policy (the baseline): a replica's score adds its queue depth and
its KV-cache occupancy, each scaled to [0, 1] and weighted; lower is better. A replica whose free
blocks cannot hold the request's prompt ranks after every replica that can: it would only queue
the request until blocks free up. Equal scores are ordered randomly.

`CostPolicy` is the cache-aware policy: it estimates each replica's time to first token as
(its queued prefill + this prompt's uncached tokens) x prefill cost + its running work, where
"uncached" comes from the router's `PrefixIndex`, and picks the smallest; see docs/routing.md.
`RoundRobin` and `PowerOfTwo` are the classic baselines, for the simulator.

The stateful policies share one interface: `update_replica` when a replica reports,
`remove_replica` when it leaves, `route` per request. They do no I/O and take the time as an
argument, so the simulator runs them on a virtual clock and the Serve router on the real one.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from scheduler.prefix_index import PrefixIndex

# --- the queue + KV baseline -----------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaLoad:
    """What the router knows of one replica."""

    replica_id: str
    queue_len: int  # requests sent and not finished (the router's live count)
    max_queue_len: int  # the replica's max_ongoing_requests
    free_blocks: int | None = None  # from the replica's routing stats; None until reported
    total_blocks: int | None = None
    block_size: int = 16


@dataclass(frozen=True)
class RoutingWeights:
    queue: float = 1.0
    kv_cache: float = 1.0

    def __post_init__(self) -> None:
        if self.queue < 0 or self.kv_cache < 0 or self.queue + self.kv_cache == 0:
            raise ValueError("routing weights must be non-negative and not both zero")


def replica_score(load: ReplicaLoad, weights: RoutingWeights) -> float:
    """Lower is better: weighted queue fill plus KV-cache fill, each in [0, 1]."""
    queue_fill = min(load.queue_len / max(load.max_queue_len, 1), 1.0)
    kv_fill = 0.0
    if load.free_blocks is not None and load.total_blocks:
        kv_fill = 1.0 - load.free_blocks / load.total_blocks
    return weights.queue * queue_fill + weights.kv_cache * kv_fill


def fits_prompt(load: ReplicaLoad, prompt_tokens: int | None) -> bool:
    if prompt_tokens is None or load.free_blocks is None:
        return True
    return load.free_blocks * load.block_size >= prompt_tokens


def rank_replicas(
    loads: list[ReplicaLoad],
    prompt_tokens: int | None,
    weights: RoutingWeights,
    rng: random.Random,
) -> list[str]:
    """Replica ids, best first."""
    shuffled = list(loads)
    rng.shuffle(shuffled)  # sort is stable: ties keep this random order
    shuffled.sort(
        key=lambda load: (not fits_prompt(load, prompt_tokens), replica_score(load, weights))
    )
    return [load.replica_id for load in shuffled]


# --- what the stateful policies see ------------------------------------------------------------

PREFIX_HIT, LOAD, FALLBACK, SESSION = "prefix_hit", "load", "fallback", "session"
REASONS = (PREFIX_HIT, LOAD, FALLBACK, SESSION)


@dataclass(frozen=True)
class ReplicaState:
    """One report of a replica (its routing stats)."""

    num_waiting: int = 0
    num_running: int = 0
    queued_prefill_tokens: int = 0  # prompt tokens its waiting and prefilling sequences still need
    free_blocks: int | None = None  # free + evictable cached blocks; None: not reported yet
    total_blocks: int | None = None
    block_size: int = 16
    time: float = 0.0  # when the replica took it, on the clock `route` is given

    @property
    def outstanding(self) -> int:
        return self.num_waiting + self.num_running


@dataclass(frozen=True)
class RouteRequest:
    prompt_tokens: int
    block_hashes: Sequence[bytes] = ()  # `prompt_block_hashes(prompt, block_size)`
    session_id: str | None = None  # from a header, for clients that send one


@dataclass(frozen=True)
class RoutingDecision:
    replica_ids: list[str]  # the choice first, then fallbacks (best first)
    reason: str  # one of REASONS
    matched_blocks: int = 0  # leading prompt blocks the chosen replica holds, per the index

    @property
    def replica_id(self) -> str:
        return self.replica_ids[0]


class PendingLoad:
    """Anti-herding: requests this router sent that a replica's reports do not show yet count
    against it at once, so a burst does not pile onto the replica that looked best a report ago.

    An entry is dropped by the first report taken `report_lag_s` after it was routed (the report
    then counts it in its queue), or after `ttl_s` whatever happens (a report lost or never sent).
    """

    def __init__(self, report_lag_s: float = 0.0, ttl_s: float = 30.0):
        self.report_lag_s = report_lag_s
        self.ttl_s = ttl_s
        self._entries: dict[str, deque[tuple[float, int, int]]] = {}
        self._sums: dict[str, list[int]] = {}  # replica -> [requests, tokens, blocks]

    def add(self, replica_id: str, now: float, tokens: int, blocks: int) -> None:
        self._entries.setdefault(replica_id, deque()).append((now, tokens, blocks))
        sums = self._sums.setdefault(replica_id, [0, 0, 0])
        sums[0] += 1
        sums[1] += tokens
        sums[2] += blocks

    def reflect(self, replica_id: str, report_time: float, now: float) -> None:
        """A report taken at `report_time` arrived: drop what it shows (and what expired)."""
        entries = self._entries.get(replica_id)
        if not entries:
            return
        cutoff = max(report_time - self.report_lag_s, now - self.ttl_s)
        sums = self._sums[replica_id]
        while entries and entries[0][0] <= cutoff:
            _, tokens, blocks = entries.popleft()
            sums[0] -= 1
            sums[1] -= tokens
            sums[2] -= blocks

    def entries(self, replica_id: str) -> Sequence[tuple[float, int, int]]:
        """(routed at, tokens, blocks) of each request not yet reported, oldest first."""
        return self._entries.get(replica_id, ())

    def get(self, replica_id: str) -> tuple[int, int, int]:
        """(requests, prompt tokens to prefill, KV blocks) routed and not yet reported."""
        sums = self._sums.get(replica_id)
        return (0, 0, 0) if sums is None else (sums[0], sums[1], sums[2])

    def drop(self, replica_id: str) -> None:
        self._entries.pop(replica_id, None)
        self._sums.pop(replica_id, None)


class RoutedPrefixes:
    """Prompts this router sent to each replica in the last `ttl_s`: the replica will hold their
    blocks once it prefills, seconds before its report says so. Matching against them sends a
    burst of one new prefix to one replica (which computes it once) instead of to every replica.
    A wrong guess (the request failed, the blocks were evicted) only costs a hit.

    Chained hashes make this cheap: two prompts share their first i blocks exactly when their
    i-th block hashes are equal, so the blocks two prompts share are found by binary search.
    """

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._by_first: dict[bytes, list[tuple[str, Sequence[bytes]]]] = {}
        self._expiry: deque[tuple[float, tuple[str, Sequence[bytes]]]] = deque()

    def add(self, replica_id: str, hashes: Sequence[bytes], now: float) -> None:
        """Remember a routed prompt (`hashes` is kept, not copied: append to it at most)."""
        if hashes:
            entry = (replica_id, hashes)
            self._by_first.setdefault(hashes[0], []).append(entry)
            self._expiry.append((now + self.ttl_s, entry))

    def match(self, hashes: Sequence[bytes]) -> dict[str, int]:
        """Per replica, the most leading blocks of `hashes` that a prompt routed there shares."""
        matched: dict[str, int] = {}
        if not hashes:
            return matched
        for replica_id, routed in self._by_first.get(hashes[0], ()):
            low, high = 1, min(len(hashes), len(routed))  # blocks [0, low) are shared
            while low < high:
                mid = (low + high + 1) // 2
                if routed[mid - 1] == hashes[mid - 1]:
                    low = mid
                else:
                    high = mid - 1
            if low > matched.get(replica_id, 0):
                matched[replica_id] = low
        return matched

    def expire(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, entry = expiry.popleft()
            first = entry[1][0]
            entries = self._by_first.get(first)
            if entries is not None:
                entries.remove(entry)
                if not entries:
                    del self._by_first[first]

    def drop(self, replica_id: str) -> None:
        for first in list(self._by_first):
            kept = [e for e in self._by_first[first] if e[0] != replica_id]
            if kept:
                self._by_first[first] = kept
            else:
                del self._by_first[first]
        self._expiry = deque(item for item in self._expiry if item[1][0] != replica_id)


class SessionTable:
    """Session id -> the replica that served it last; bounded, least recently used out."""

    def __init__(self, max_sessions: int = 100_000):
        self.max_sessions = max_sessions
        self._replica: OrderedDict[str, str] = OrderedDict()

    def get(self, session_id: str) -> str | None:
        replica_id = self._replica.get(session_id)
        if replica_id is not None:
            self._replica.move_to_end(session_id)
        return replica_id

    def set(self, session_id: str, replica_id: str) -> None:
        self._replica[session_id] = replica_id
        self._replica.move_to_end(session_id)
        if len(self._replica) > self.max_sessions:
            self._replica.popitem(last=False)

    def __len__(self) -> int:
        return len(self._replica)


# --- the cache-aware policy ----------------------------------------------------------------------


@dataclass(frozen=True)
class CostWeights:
    """The cache-aware policy's settings; every cost is in seconds of estimated TTFT.

    Set `prefill_s_per_token` from the engine's step model (`from_step_model`): it converts the
    prompt tokens a cache hit saves into time, against the time a request waits behind others.
    """

    prefill_s_per_token: float = 1e-4  # prefilling one prompt token (queued, or this prompt's)
    request_s: float = 0.01  # each request a replica runs or queues (its share of every step)
    kv_fill_s: float = 0.02  # a full KV cache (scaled by the fill): preemption risk, no room
    tie_s: float = 0.005  # loads this close to the least count as equal (chosen at random)
    load_guard_s: float = 1.0  # affinity may cost at most this much more load than the least...
    load_guard_ratio: float = 2.0  # ...and this many times it; beyond both, load wins
    report_lag_s: float = 0.0  # a request routed this long before a report is in that report
    pending_ttl_s: float = 30.0  # forget an unreported routed request after this long
    routed_prefix_ttl_s: float = 2.0  # count a routed prompt's blocks as held this long
    session_affinity: bool = True  # honour RouteRequest.session_id while load allows
    fallbacks: int = 3  # replicas ranked after the choice (tried if it refuses)

    def __post_init__(self) -> None:
        for name in ("prefill_s_per_token", "request_s", "kv_fill_s", "tie_s", "load_guard_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.prefill_s_per_token == 0:
            raise ValueError("prefill_s_per_token must be > 0: it is what a cache hit saves")
        if self.load_guard_ratio < 1:
            raise ValueError("load_guard_ratio must be >= 1")
        if min(self.report_lag_s, self.pending_ttl_s, self.routed_prefix_ttl_s) < 0:
            raise ValueError("lags and ttls must be >= 0")
        if self.fallbacks < 0:
            raise ValueError("fallbacks must be >= 0")

    @classmethod
    def from_step_model(
        cls, model, max_num_batched_tokens: int, typical_context: int = 2048, **overrides
    ) -> CostWeights:
        """Weights from a `StepTimeModel`: a full prefill step's time per token, one running
        request's share of a step (its token, sequence and KV read), and one small step as the
        tie tolerance (twice that for a full KV cache)."""
        chunk = max_num_batched_tokens
        per_token = model.seconds(chunk, 1, chunk, chunk * typical_context) / chunk
        running = (
            model.per_token_s
            + model.per_seq_s
            + (model.per_kv_token_s + model.per_attention_pair_s) * typical_context
        )
        # Loads closer than one small decode step are noise (reports of different ages).
        step = model.seconds(1, 1, typical_context, typical_context)
        values = {
            "prefill_s_per_token": per_token,
            "request_s": running,
            "tie_s": step,
            "kv_fill_s": 2 * step,
            **overrides,
        }
        return cls(**values)


@dataclass
class _Replica:
    replica_id: str
    state: ReplicaState
    free_blocks: float = float("inf")  # after what was routed and not reported
    block_size: int = 16


class CostPolicy:
    """Estimated-TTFT routing over a prefix index, with anti-herding, a load guard and sessions.

    Per replica i, with m_i leading prompt blocks cached (index, plus prompts routed there):
        load_i = queued prefill_i + r * requests_i + k * kv_fill_i
        cost_i = load_i + p * (prompt tokens - m_i * block_size)
    Queued prefill is in seconds and drains as time passes: the reported queue (p per token),
    plus what this router sent since that report, minus the time elapsed since (a replica works
    off a second of prefill per second). So a replica that reported long ago does not look busier
    than one that just reported, and a burst counts at once. Requests and KV blocks also count
    what was sent since the report. Choose the smallest cost among replicas with room for the
    uncached prompt; if its load passes the guard (more than `load_guard_s` over the least loaded
    and `load_guard_ratio` times it), take the least loaded instead. Nothing fits: the least
    loaded (it queues there). Ties are broken at random.
    """

    def __init__(
        self,
        weights: CostWeights,
        index: PrefixIndex | None = None,
        rng: random.Random | None = None,
    ):
        self.weights = weights
        self.index = index
        self.rng = rng or random.Random()
        self.pending = PendingLoad(weights.report_lag_s, weights.pending_ttl_s)
        self.routed = RoutedPrefixes(weights.routed_prefix_ttl_s)
        self.sessions = SessionTable()
        self._replicas: list[_Replica] = []
        self._position: dict[str, int] = {}
        # Parallel to _replicas, so a route is a few C-speed passes at 1,024 replicas: when the
        # queued prefill would be done (absolute time), and the other load terms (seconds).
        self._prefill_until: list[float] = []
        self._other_load: list[float] = []

    # --- replica reports ------------------------------------------------------------------------

    def update_replica(self, replica_id: str, state: ReplicaState, now: float) -> None:
        """A replica's new report (a new replica joins with its first)."""
        pos = self._position.get(replica_id)
        if pos is None:
            pos = self._position[replica_id] = len(self._replicas)
            self._replicas.append(_Replica(replica_id, state))
            self._prefill_until.append(0.0)
            self._other_load.append(0.0)
        self._replicas[pos].state = state
        self.pending.reflect(replica_id, state.time, now)
        self._refresh(pos)

    def remove_replica(self, replica_id: str) -> None:
        """Forget a replica (dead or scaled down). The router also drops it from the index."""
        pos = self._position.pop(replica_id, None)
        if pos is None:
            return
        last = self._replicas.pop()
        until, other = self._prefill_until.pop(), self._other_load.pop()
        if pos < len(self._replicas):
            self._replicas[pos] = last
            self._prefill_until[pos], self._other_load[pos] = until, other
            self._position[last.replica_id] = pos
        self.pending.drop(replica_id)
        self.routed.drop(replica_id)

    @property
    def replica_ids(self) -> list[str]:
        return [r.replica_id for r in self._replicas]

    def load_of(self, replica_id: str, now: float) -> float:
        """The estimated seconds before a new request's own prefill could start there."""
        pos = self._position[replica_id]
        return max(self._prefill_until[pos] - now, 0.0) + self._other_load[pos]

    # --- routing --------------------------------------------------------------------------------

    def route(self, request: RouteRequest, now: float) -> RoutingDecision:
        if not self._replicas:
            raise LookupError("no replica to route to")
        w = self.weights
        self.routed.expire(now)
        matched: dict[str, int] = {}
        if request.block_hashes:
            matched = self.routed.match(request.block_hashes)
            if self.index is not None:
                for replica_id, blocks in self.index.match(request.block_hashes).items():
                    if blocks > matched.get(replica_id, 0):
                        matched[replica_id] = blocks
        # Each replica's load now, offset by `now` (argmin is the same; no subtraction per item).
        loads = [
            (until if until > now else now) + other
            for until, other in zip(self._prefill_until, self._other_load, strict=True)
        ]
        pos, reason, others = self._choose(request, matched, loads, now)
        chosen = self._replicas[pos]
        hit = matched.get(chosen.replica_id, 0)
        decision = RoutingDecision(self._ranked(pos, others), reason, hit)
        # Count the request against its replica at once (anti-herding) and remember its blocks.
        block_size = chosen.block_size
        uncached = max(request.prompt_tokens - hit * block_size, 1)
        self.pending.add(chosen.replica_id, now, uncached, -(-uncached // block_size))
        self._refresh(pos)
        if request.block_hashes:
            self.routed.add(chosen.replica_id, request.block_hashes, now)
            if self.index is not None:
                self.index.touch(request.block_hashes[:hit])
        if request.session_id is not None and w.session_affinity:
            self.sessions.set(request.session_id, chosen.replica_id)
        return decision

    def _choose(
        self, request: RouteRequest, matched: dict[str, int], loads: list[float], now: float
    ) -> tuple[int, str, list[tuple[float, int]]]:
        """The choice, its reason, and the other replicas considered as (cost, position)."""
        w = self.weights
        p = w.prefill_s_per_token
        replicas = self._replicas
        prompt = request.prompt_tokens
        fitting = {
            pos
            for replica_id in matched
            if (pos := self._position.get(replica_id)) is not None
            and self._fits(pos, prompt, matched)
        }
        least = self._least_loaded(loads, prompt)
        # Room nowhere for the uncached prompt: it will queue wherever it goes, so still go
        # where the estimated TTFT is lowest (the cached prefix may well still be there).
        fallback = least is None and not fitting
        if least is None:
            least = self._least_loaded(loads, None)
        min_load = loads[least] - now

        def guard_ok(pos: int) -> bool:
            load = loads[pos] - now
            return load - min_load <= w.load_guard_s or load <= w.load_guard_ratio * min_load

        if request.session_id is not None and w.session_affinity:
            replica_id = self.sessions.get(request.session_id)
            pos = self._position.get(replica_id) if replica_id is not None else None
            if pos is not None and guard_ok(pos) and (fallback or self._fits(pos, prompt, matched)):
                return pos, SESSION, []
        considered: list[tuple[float, int]] = []
        best, best_cost = None, float("inf")
        for replica_id, blocks in matched.items():
            pos = self._position.get(replica_id)
            if pos is None or not (fallback or pos in fitting):
                continue
            cost = loads[pos] - now + p * max(prompt - blocks * replicas[pos].block_size, 1)
            considered.append((cost, pos))
            if cost < best_cost:
                best, best_cost = pos, cost
        least_cost = min_load + p * prompt
        considered.append((least_cost, least))
        room_least = fallback or replicas[least].free_blocks * replicas[least].block_size >= prompt
        # A cache hit that is as fast as recomputing elsewhere (within the tie) still wins: it
        # saves the cluster the prefill.
        if best is None or (room_least and least_cost < best_cost - w.tie_s):
            best = least
        if best != least and not guard_ok(best):
            best = least
        if fallback:
            return best, FALLBACK, considered
        hit = matched.get(replicas[best].replica_id, 0)
        return best, (PREFIX_HIT if hit else LOAD), considered

    def _fits(self, pos: int, prompt: int, matched: dict[str, int]) -> bool:
        replica = self._replicas[pos]
        needed = -(-prompt // replica.block_size) - matched.get(replica.replica_id, 0)
        return replica.free_blocks >= needed

    def _least_loaded(self, loads: list[float], prompt: int | None) -> int | None:
        """A replica of least load (with room for the whole prompt, unless None), at random
        among those within `tie_s` of the least: loads come from reports of different ages, and
        a strict minimum would send every request to whichever replica happened to report last.
        """
        replicas = self._replicas
        limit = min(loads) + self.weights.tie_s
        ties = [i for i, load in enumerate(loads) if load <= limit]
        pos = ties[self.rng.randrange(len(ties))]
        if prompt is None or replicas[pos].free_blocks * replicas[pos].block_size >= prompt:
            return pos
        room = [
            i for i, r in enumerate(replicas) if r.free_blocks * r.block_size >= prompt
        ]  # rare: the least loaded replica is full
        if not room:
            return None
        lowest = min(loads[i] for i in room)
        return self.rng.choice([i for i in room if loads[i] <= lowest + self.weights.tie_s])

    def _ranked(self, pos: int, considered: list[tuple[float, int]]) -> list[str]:
        """The choice, then the other replicas it was weighed against, cheapest first (then, if
        too few, random others): Serve tries them in turn if the choice refuses."""
        k = self.weights.fallbacks
        ranked = [pos]
        for _, other in sorted(considered):
            if other not in ranked:
                ranked.append(other)
        n = len(self._replicas)
        while len(ranked) < min(k + 1, n):
            other = self.rng.randrange(n)
            if other not in ranked:
                ranked.append(other)
        return [self._replicas[i].replica_id for i in ranked[: k + 1]]

    def _refresh(self, pos: int) -> None:
        """Recompute one replica's load from its last report plus what was routed since: the
        queued prefill as a fluid queue that drains a second per second."""
        w = self.weights
        p = w.prefill_s_per_token
        replica = self._replicas[pos]
        state = replica.state
        until = state.time + p * state.queued_prefill_tokens
        for routed_at, tokens, _ in self.pending.entries(replica.replica_id):
            until = max(until, routed_at) + p * tokens
        self._prefill_until[pos] = until
        requests, _, blocks = self.pending.get(replica.replica_id)
        other = w.request_s * (state.outstanding + requests)
        replica.block_size = state.block_size
        if state.free_blocks is not None and state.total_blocks:
            free = state.free_blocks - blocks
            replica.free_blocks = free
            other += w.kv_fill_s * min(max(1.0 - free / state.total_blocks, 0.0), 1.0)
        else:
            replica.free_blocks = float("inf")
        self._other_load[pos] = other


# --- classic baselines (for the simulator) ----------------------------------------------------


class RoundRobin:
    """Each replica in turn, whatever its load."""

    def __init__(self, rng: random.Random | None = None):
        self._ids: list[str] = []
        self._next = (rng or random.Random()).randrange(1 << 30)

    def update_replica(self, replica_id: str, state: ReplicaState, now: float) -> None:
        if replica_id not in self._ids:
            self._ids.append(replica_id)

    def remove_replica(self, replica_id: str) -> None:
        if replica_id in self._ids:
            self._ids.remove(replica_id)

    def route(self, request: RouteRequest, now: float) -> RoutingDecision:
        self._next += 1
        return RoutingDecision([self._ids[self._next % len(self._ids)]], LOAD)


@dataclass
class _Outstanding:
    """A replica's reported queue plus this router's requests since that report."""

    pending: PendingLoad
    states: dict[str, ReplicaState] = field(default_factory=dict)

    def update(self, replica_id: str, state: ReplicaState, now: float) -> None:
        self.states[replica_id] = state
        self.pending.reflect(replica_id, state.time, now)

    def remove(self, replica_id: str) -> None:
        self.states.pop(replica_id, None)
        self.pending.drop(replica_id)

    def queue_len(self, replica_id: str) -> int:
        return self.states[replica_id].outstanding + self.pending.get(replica_id)[0]


class PowerOfTwo:
    """Two replicas at random; the one with fewer requests (reported + sent since)."""

    def __init__(self, rng: random.Random | None = None, report_lag_s: float = 0.0):
        self.rng = rng or random.Random()
        self.view = _Outstanding(PendingLoad(report_lag_s))
        self._ids: list[str] = []

    def update_replica(self, replica_id: str, state: ReplicaState, now: float) -> None:
        if replica_id not in self.view.states:
            self._ids.append(replica_id)
        self.view.update(replica_id, state, now)

    def remove_replica(self, replica_id: str) -> None:
        if replica_id in self.view.states:
            self._ids.remove(replica_id)
        self.view.remove(replica_id)

    def route(self, request: RouteRequest, now: float) -> RoutingDecision:
        pair = self.rng.sample(self._ids, 2) if len(self._ids) > 1 else self._ids * 2
        pair.sort(key=self.view.queue_len)
        replica_id = pair[0]
        self.view.pending.add(replica_id, now, request.prompt_tokens, 0)
        return RoutingDecision(pair, LOAD)


class QueueKV:
    """Today's policy (`rank_replicas`) over reports plus this router's requests since them."""

    def __init__(
        self,
        weights: RoutingWeights | None = None,
        rng: random.Random | None = None,
        max_queue_len: int = 256,
        report_lag_s: float = 0.0,
    ):
        self.weights = weights or RoutingWeights()
        self.rng = rng or random.Random()
        self.max_queue_len = max_queue_len
        self.view = _Outstanding(PendingLoad(report_lag_s))

    def update_replica(self, replica_id: str, state: ReplicaState, now: float) -> None:
        self.view.update(replica_id, state, now)

    def remove_replica(self, replica_id: str) -> None:
        self.view.remove(replica_id)

    def loads(self) -> list[ReplicaLoad]:
        return [
            ReplicaLoad(
                replica_id,
                self.view.queue_len(replica_id),
                self.max_queue_len,
                state.free_blocks,
                state.total_blocks,
                state.block_size,
            )
            for replica_id, state in self.view.states.items()
        ]

    def route(self, request: RouteRequest, now: float) -> RoutingDecision:
        ranked = rank_replicas(self.loads(), request.prompt_tokens, self.weights, self.rng)
        self.view.pending.add(ranked[0], now, request.prompt_tokens, 0)
        return RoutingDecision(ranked[:4], LOAD)
