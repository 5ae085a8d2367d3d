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
from collections.abc import Sequence
from dataclasses import dataclass, field

from scheduler.prefix_index import PrefixIndex
from scheduler.routing_state import LoadBoard, PendingLoad, RoutedPrefixes, SessionTable

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
TIE_SAMPLES = 4  # least-loaded candidates drawn per decision
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


# --- the cache-aware policy ----------------------------------------------------------------------


@dataclass(frozen=True)
class CostWeights:
    """The cache-aware policy's settings; every cost is in seconds of estimated TTFT.

    Set `prefill_s_per_token` from the engine's step model (`from_step_model`): it converts the
    prompt tokens a cache hit saves into time, against the time a request waits behind others.
    """

    prefill_s_per_token: float = 1e-4  # prefilling one prompt token (queued, or this prompt's)
    request_s: float = 0.005  # each request a replica runs or queues: it slows every step
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
        cls,
        model,
        max_num_batched_tokens: int,
        typical_context: int = 2048,
        decode_steps: int = 32,
        **overrides,
    ) -> CostWeights:
        """Weights from a `StepTimeModel`: a full prefill step's time per token; one running
        request's share of a step (its token, sequence and KV read) over the new request's first
        `decode_steps` tokens; one small step as the tie tolerance (twice that for a full KV
        cache); a few full prefill steps as the load guard."""
        chunk = max_num_batched_tokens
        per_token = model.seconds(chunk, 1, chunk, chunk * typical_context) / chunk
        running = decode_steps * (
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
            "load_guard_s": 4 * chunk * per_token,
            **overrides,
        }
        return cls(**values)


@dataclass
class _Replica:
    state: ReplicaState
    free_blocks: float = float("inf")  # after what was routed and not reported
    block_size: int = 16
    requests: int = 0  # running or queued, reported plus routed since
    routed_at: float = float("-inf")  # when this router last sent it a request


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
    and `load_guard_ratio` times it), take the least loaded instead. Nothing fits: the same
    choice without the room check (it queues there). Loads within `tie_s` are equal; ties are
    broken at random.
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
        self._replicas: dict[str, _Replica] = {}
        self._loads = LoadBoard()

    # --- replica reports ------------------------------------------------------------------------

    def update_replica(self, replica_id: str, state: ReplicaState, now: float) -> None:
        """A replica's new report (a new replica joins with its first)."""
        replica = self._replicas.get(replica_id)
        if replica is None:
            replica = self._replicas[replica_id] = _Replica(state)
        replica.state = state
        self.pending.reflect(replica_id, state.time, now)
        self._refresh(replica_id, now)

    def remove_replica(self, replica_id: str) -> None:
        """Forget a replica (dead or scaled down). The router also drops it from the index."""
        if self._replicas.pop(replica_id, None) is not None:
            self._loads.remove(replica_id)
            self.pending.drop(replica_id)
            self.routed.drop(replica_id)

    @property
    def replica_ids(self) -> list[str]:
        return list(self._replicas)

    def load_of(self, replica_id: str, now: float) -> float:
        """The estimated seconds a new request would wait there, before its own prefill."""
        return self._loads.load(replica_id, now) + self.weights.request_s * (
            self._replicas[replica_id].requests
        )

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
        chosen, reason, others = self._choose(request, matched, now)
        replica = self._replicas[chosen]
        hit = matched.get(chosen, 0)
        decision = RoutingDecision(self._ranked(chosen, others), reason, hit)
        # Count the request against its replica at once (anti-herding) and remember its blocks.
        uncached = max(request.prompt_tokens - hit * replica.block_size, 1)
        self.pending.add(chosen, now, uncached, -(-uncached // replica.block_size))
        replica.routed_at = now
        self._refresh(chosen, now)
        if request.block_hashes:
            self.routed.add(chosen, request.block_hashes, now)
            if self.index is not None:
                self.index.touch(request.block_hashes[:hit])
        if request.session_id is not None and w.session_affinity:
            self.sessions.set(request.session_id, chosen)
        return decision

    def _choose(
        self, request: RouteRequest, matched: dict[str, int], now: float
    ) -> tuple[str, str, list[tuple[float, str]]]:
        """The choice, its reason, and the other replicas considered as (cost, id)."""
        w = self.weights
        p = w.prefill_s_per_token
        load = self.load_of
        replicas = self._replicas
        prompt = request.prompt_tokens
        matched = {r: blocks for r, blocks in matched.items() if r in replicas}
        fitting = {r for r in matched if self._fits(r, prompt, matched)}
        least = self._least_loaded(now, prompt)
        # Room nowhere for the uncached prompt: it will queue wherever it goes, so still go
        # where the estimated TTFT is lowest (the cached prefix may well still be there).
        fallback = least is None and not fitting
        if least is None:
            least = self._least_loaded(now, None)
        min_load = load(least, now)

        def guard_ok(replica_id: str) -> bool:
            extra = load(replica_id, now)
            return extra - min_load <= w.load_guard_s or extra <= w.load_guard_ratio * min_load

        if request.session_id is not None and w.session_affinity:
            replica_id = self.sessions.get(request.session_id)
            if (
                replica_id in replicas
                and guard_ok(replica_id)
                and (fallback or self._fits(replica_id, prompt, matched))
            ):
                return replica_id, SESSION, []
        considered: list[tuple[float, str]] = []
        best, best_cost = None, float("inf")
        for replica_id, blocks in matched.items():
            if not (fallback or replica_id in fitting):
                continue
            uncached = max(prompt - blocks * replicas[replica_id].block_size, 1)
            cost = load(replica_id, now) + p * uncached
            considered.append((cost, replica_id))
            if cost < best_cost:
                best, best_cost = replica_id, cost
        least_cost = min_load + p * prompt
        considered.append((least_cost, least))
        room_least = fallback or self._has_room(least, prompt)
        # A cache hit that is as fast as recomputing elsewhere (within the tie) still wins: it
        # saves the cluster the prefill.
        if best is None or (room_least and least_cost < best_cost - w.tie_s):
            best = least
        if best != least and not guard_ok(best):
            best = least
        if fallback:
            return best, FALLBACK, considered
        return best, (PREFIX_HIT if matched.get(best) else LOAD), considered

    def _fits(self, replica_id: str, prompt: int, matched: dict[str, int]) -> bool:
        replica = self._replicas[replica_id]
        needed = -(-prompt // replica.block_size) - matched.get(replica_id, 0)
        return replica.free_blocks >= needed

    def _has_room(self, replica_id: str, prompt: int) -> bool:
        replica = self._replicas[replica_id]
        return replica.free_blocks * replica.block_size >= prompt

    def _least_loaded(self, now: float, prompt: int | None) -> str | None:
        """A replica with the least queued prefill and KV fill (within `tie_s`), with room for
        the whole prompt unless `prompt` is None: of `TIE_SAMPLES` drawn at random among them,
        the one this router sent a request to longest ago.

        Not the fewest requests: counts from reports of different ages would send every request
        to whichever replica happened to report last. Least recently used spaces requests out
        like round-robin does (a replica that just got one is likely still prefilling it), and
        sampling keeps it O(1) at 1,024 replicas. The queued prefill needs no such care: it is
        estimated at routing time, draining as time passes.
        """
        _, busy, idle = self._loads.least(now, self.weights.tie_s)
        busy = busy or []
        count = idle + len(busy)
        picks = self.rng.sample(range(count), min(count, TIE_SAMPLES))
        candidates = [self._loads.idle_at(k) if k < idle else busy[k - idle] for k in picks]
        choice = min(candidates, key=lambda r: self._replicas[r].routed_at)
        if prompt is None or self._has_room(choice, prompt):
            return choice
        # Rare: the least loaded replica is full; look at every replica with room.
        room = [r for r in self._replicas if self._has_room(r, prompt)]
        if not room:
            return None
        loads = [self.load_of(r, now) for r in room]
        limit = min(loads) + self.weights.tie_s
        return self.rng.choice([r for r, load in zip(room, loads, strict=True) if load <= limit])

    def _ranked(self, chosen: str, considered: list[tuple[float, str]]) -> list[str]:
        """The choice, then the other replicas it was weighed against, cheapest first (then, if
        too few, random others): Serve tries them in turn if the choice refuses."""
        k = self.weights.fallbacks
        ranked = [chosen]
        for _, other in sorted(considered):
            if other not in ranked:
                ranked.append(other)
        if len(ranked) < k + 1:
            ids = list(self._replicas)
            for other in self.rng.sample(ids, min(len(ids), k + 1)):
                if other not in ranked:
                    ranked.append(other)
        return ranked[: k + 1]

    def _refresh(self, replica_id: str, now: float) -> None:
        """Recompute one replica's load from its last report plus what was routed since: the
        queued prefill as a fluid queue that drains a second per second."""
        w = self.weights
        p = w.prefill_s_per_token
        replica = self._replicas[replica_id]
        state = replica.state
        until = state.time + p * state.queued_prefill_tokens
        for routed_at, tokens, _ in self.pending.entries(replica_id):
            until = max(until, routed_at) + p * tokens
        requests, _, blocks = self.pending.get(replica_id)
        replica.requests = state.outstanding + requests
        other = 0.0
        replica.block_size = state.block_size
        if state.free_blocks is not None and state.total_blocks:
            free = state.free_blocks - blocks
            replica.free_blocks = free
            other += w.kv_fill_s * min(max(1.0 - free / state.total_blocks, 0.0), 1.0)
        else:
            replica.free_blocks = float("inf")
        self._loads.set(replica_id, until, other, now)


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
