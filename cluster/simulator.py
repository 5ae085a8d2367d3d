"""Discrete-event cluster simulator: the REAL scheduler, block manager and routing policies on a
virtual clock, with each step's duration from a `StepTimeModel` (`python -m cluster simulate`).

Every simulated replica is a `Scheduler` over a `BlockManager`, driven exactly like
`LLMEngine.step`: schedule, wait the step's modelled time, count the tokens computed, append one
token to each sequence that samples, finish what reached its length. Only busy replicas have
events, so 1,024 replicas cost what their work costs. Replicas report their load (and, for the
cache-aware policy, their prefix-cache changes) on a period, as Serve's routing stats do; each
of the `routers` router instances routes with its own policy object (its own pending counts),
over views that are as stale as the last report.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from cluster.sim_workloads import SimRequest, Workload, WorkloadShape, output_token
from scheduler import BlockManager, Scheduler, SchedulerConfig, Sequence, SequenceStatus
from scheduler.prefix_index import PrefixIndex
from scheduler.routing import (
    REASONS,
    CostPolicy,
    CostWeights,
    PowerOfTwo,
    QueueKV,
    ReplicaState,
    RoundRobin,
    RouteRequest,
)
from scheduler.step_time import StepTimeModel, step_shape

POLICIES = ("round_robin", "power_of_two", "queue_kv", "cost")
GC_EVERY_EVENTS = 1 << 16


@dataclass(frozen=True)
class ReplicaSpec:
    """One simulated replica's engine limits (as in EngineConfig)."""

    num_blocks: int = 16384
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int = 32_768


@dataclass(frozen=True)
class SimConfig:
    num_replicas: int
    policy: str
    step_model: StepTimeModel
    replica: ReplicaSpec = ReplicaSpec()
    stats_period_s: float = 0.5  # 0: routers see every change at once
    num_routers: int = 1
    cost_weights: CostWeights | None = None  # None: from the step model
    seed: int = 0
    warmup_fraction: float = 0.1  # requests left out of latency statistics (cold caches)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {POLICIES}")
        if self.num_replicas < 1 or self.num_routers < 1 or self.stats_period_s < 0:
            raise ValueError("need >= 1 replica and router, and stats_period_s >= 0")

    def weights(self) -> CostWeights:
        if self.cost_weights is not None:
            return self.cost_weights
        return CostWeights.from_step_model(
            self.step_model, self.replica.max_num_batched_tokens, report_lag_s=0.0
        )


def capacity_rps(
    shape: WorkloadShape, spec: ReplicaSpec, model: StepTimeModel, num_replicas: int = 1
) -> float:
    """Requests per second one replica sustains in an ideal cluster: every prompt token sent
    before is cached (only new tokens are prefilled), the shared prefixes are spread over the
    replicas without copies (each holds 1/N of them, at least one), and batches are as large as
    max_num_seqs and the KV cache left over allow. An upper bound: the reference that load
    fractions refer to."""
    chunk = spec.max_num_batched_tokens
    context = shape.prompt_tokens
    prefill_per_token = model.seconds(chunk, 1, chunk, int(chunk * context)) / chunk
    kv_tokens = spec.num_blocks * spec.block_size
    resident = 0.0
    if shape.shared_prefix_tokens:
        one_prefix = shape.prompt_tokens - shape.kv_tokens + shape.output_tokens
        resident = max(shape.shared_prefix_tokens / num_replicas, one_prefix)
    room = max(kv_tokens - resident, shape.kv_tokens)
    batch = max(1, min(spec.max_num_seqs, int(room / shape.kv_tokens)))
    mean_context = int(batch * (context + shape.output_tokens / 2))
    decode_step = model.seconds(batch, batch, mean_context, mean_context)
    per_request = (
        shape.unique_prompt_tokens * prefill_per_token + shape.output_tokens * decode_step / batch
    )
    return 1.0 / per_request


class _Done(NamedTuple):
    """A finished request's numbers (its tokens are let go)."""

    arrival: float
    ttft: float
    e2e: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int


@dataclass(eq=False)
class _Flight:
    """A request in a replica: its sequence and latency bookkeeping."""

    request: SimRequest
    seq: Sequence
    router: int
    first_token: float | None = None
    last_token: float = 0.0


class _Replica:
    def __init__(self, index: int, spec: ReplicaSpec, record_events: bool):
        self.index = index
        self.replica_id = f"replica-{index}"
        self.block_manager = BlockManager(
            spec.num_blocks, spec.block_size, record_cache_events=record_events
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                spec.max_num_batched_tokens,
                spec.max_num_seqs,
                spec.max_model_len,
                max_waiting_seqs=1 << 30,
                max_queued_prompt_tokens=1 << 40,
            ),
            self.block_manager,
        )
        self.flights: dict[Sequence, _Flight] = {}
        self.batch = None  # the step in flight
        self.report_due = False
        self.busy_s = 0.0
        self.requests = 0

    def state(self, now: float) -> ReplicaState:
        bm, sched = self.block_manager, self.scheduler
        return ReplicaState(
            num_waiting=sched.num_waiting,
            num_running=sched.num_running,
            queued_prefill_tokens=sched.num_prefill_tokens_left,
            free_blocks=bm.num_free_blocks,
            total_blocks=bm.num_blocks,
            block_size=bm.block_size,
            time=now,
        )


class LogHistogram:
    """Latencies in log-spaced buckets (0.5% wide): percentiles of millions of inter-token gaps
    without keeping them."""

    SCALE = 1 / math.log(1.005)  # buckets per unit of ln(seconds)

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0

    def add(self, value: float) -> None:
        bucket = int(math.log(value) * self.SCALE) if value > 0 else -(1 << 20)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.n += 1

    def percentile(self, q: float) -> float:
        if not self.n:
            return float("nan")
        rank = q / 100 * (self.n - 1)
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen > rank:
                return math.exp((bucket + 0.5) / self.SCALE)
        return float("nan")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    return {"p50": at(50), "p90": at(90), "p99": at(99), "mean": statistics.fmean(ordered)}


@dataclass
class SimResult:
    config: dict
    workload: dict
    requests: int
    measured_requests: int
    ttft_s: dict
    itl_s: dict
    e2e_s: dict
    output_tokens_per_s: float
    requests_per_s: float
    prefix_hit_rate: float
    load_imbalance: dict
    decisions: dict
    matched_blocks_per_request: float
    decision_us: dict
    preemptions: int
    rejected: int
    index: dict | None
    sim_seconds: float
    wall_seconds: float
    steps: int
    per_request: list[dict] = field(default_factory=list)

    def as_dict(self, per_request: bool = False) -> dict:
        data = asdict(self)
        if not per_request:
            data.pop("per_request")
        return data


class Simulator:
    def __init__(self, config: SimConfig):
        self.config = config
        self.rng = random.Random(config.seed)
        uses_index = config.policy == "cost"
        self.index = PrefixIndex() if uses_index else None
        self.replicas = [
            _Replica(i, config.replica, uses_index) for i in range(config.num_replicas)
        ]
        self.by_id = {r.replica_id: r for r in self.replicas}
        self.routers = [self._make_policy(k) for k in range(config.num_routers)]
        self.phase = [self.rng.uniform(0, config.stats_period_s) for _ in self.replicas]
        self._events: list = []
        self._order = itertools.count()
        self.model = config.step_model

    def _make_policy(self, k: int):
        rng = random.Random(self.config.seed * 1000 + k)
        name = self.config.policy
        if name == "round_robin":
            return RoundRobin(rng)
        if name == "power_of_two":
            return PowerOfTwo(rng)
        if name == "queue_kv":
            return QueueKV(rng=rng)
        return CostPolicy(self.config.weights(), self.index, rng)

    # --- the event loop ---------------------------------------------------------------------------

    def run(self, workload: Workload, num_requests: int) -> SimResult:
        start_wall = time.perf_counter()
        for replica in self.replicas:
            self._report(replica, 0.0)
        arrivals = workload.arrivals(num_requests)
        self._push_next_arrival(arrivals)
        results: list[_Done] = []
        itl = LogHistogram()
        decision_s: list[float] = []
        reasons = dict.fromkeys(REASONS, 0)
        matched_blocks = 0
        admitted = rejected = steps = 0
        events = self._events
        # Python's cyclic GC runs here only between events, never inside a timed routing call:
        # a collection of the simulator's millions of objects (every replica's sequences) is
        # not the router's cost, and in a router process it has little to scan.
        gc_enabled = gc.isenabled()
        gc.disable()
        handled = 0
        try:
            while events:
                handled += 1
                if not handled % GC_EVERY_EVENTS:
                    gc.collect(1)
                now, _, kind, payload = heapq.heappop(events)
                if kind == 0:  # a request arrives
                    request, from_stream = payload
                    if admitted + rejected >= num_requests:
                        continue
                    if from_stream:
                        self._push_next_arrival(arrivals)
                    k = self.rng.randrange(len(self.routers))
                    route_request = RouteRequest(
                        request.prompt_tokens, request.block_hashes, request.session_id
                    )
                    t0 = time.perf_counter()
                    decision = self.routers[k].route(route_request, now)
                    decision_s.append(time.perf_counter() - t0)
                    reasons[decision.reason] += 1
                    matched_blocks += decision.matched_blocks
                    replica = self.by_id[decision.replica_id]
                    if self._admit(replica, request, k, now):
                        admitted += 1
                    else:
                        rejected += 1
                elif kind == 1:  # a step ends
                    steps += 1
                    self._end_step(payload, now, results, itl, workload)
                else:  # a report is due
                    self._report(payload, now)
        finally:
            if gc_enabled:
                gc.enable()
        wall = time.perf_counter() - start_wall
        return self._result(
            workload, results, itl, decision_s, reasons, matched_blocks, rejected, steps, wall
        )

    def _push(self, when: float, kind: int, payload) -> None:
        heapq.heappush(self._events, (when, next(self._order), kind, payload))

    def _push_next_arrival(self, arrivals) -> None:
        request = next(arrivals, None)
        if request is not None:
            self._push(request.arrival, 0, (request, True))

    def _admit(self, replica: _Replica, request: SimRequest, router: int, now: float) -> bool:
        seq = Sequence(str(request.request_id), request.token_ids, request.max_tokens)
        seq.block_hashes = request.block_hashes  # the same hashes the block manager would compute
        try:
            replica.scheduler.add(seq)
        except ValueError:  # too long for this replica (RequestTooLongError)
            return False
        replica.flights[seq] = _Flight(request, seq, router)
        replica.requests += 1
        if replica.batch is None:
            self._start_step(replica, now)
        self._changed(replica, now)
        return True

    def _start_step(self, replica: _Replica, now: float) -> None:
        batch = replica.scheduler.schedule()
        if not batch:
            replica.batch = None
            return
        replica.batch = batch
        duration = self.model.seconds(*step_shape(batch))
        replica.busy_s += duration
        self._push(now + duration, 1, replica)

    def _end_step(self, replica: _Replica, now: float, results, itl, workload) -> None:
        batch = replica.batch
        sched = replica.scheduler
        # The sequences that sample this step (as LLMEngine._run), before counting tokens.
        due = [
            seq
            for seq, n in zip(batch.seqs, batch.num_tokens, strict=True)
            if seq.num_computed_tokens + n == len(seq.token_ids)
        ]
        sched.update_computed(batch)
        flights = replica.flights
        for seq in due:
            flight = flights[seq]
            produced = len(seq.token_ids) - seq.num_prompt_tokens
            seq.append_token(output_token(flight.request.request_id, produced))
            if flight.first_token is None:
                flight.first_token = now
            else:
                itl.add(now - flight.last_token)
            flight.last_token = now
            if produced + 1 >= seq.max_tokens:
                sched.finish(seq, SequenceStatus.FINISHED_LENGTH)
                del replica.flights[seq]
                request = flight.request
                results.append(
                    _Done(
                        request.arrival,
                        flight.first_token - request.arrival,
                        now - request.arrival,
                        request.prompt_tokens,
                        seq.num_output_tokens,
                        seq.num_cached_tokens,
                    )
                )
                follow_up = workload.follow_up(request, seq.token_ids, seq.block_hashes, now)
                if follow_up is not None:
                    self._push(follow_up.arrival, 0, (follow_up, False))
        replica.batch = None
        if sched.has_unfinished():
            self._start_step(replica, now)
        self._changed(replica, now)

    def _changed(self, replica: _Replica, now: float) -> None:
        """Schedule the replica's next report (at its next stats tick) if none is due."""
        period = self.config.stats_period_s
        if period == 0:
            self._report(replica, now)
        elif not replica.report_due:
            phase = self.phase[replica.index]
            tick = phase + period * math.ceil((now - phase) / period)
            replica.report_due = True
            self._push(tick, 2, replica)

    def _report(self, replica: _Replica, now: float) -> None:
        replica.report_due = False
        state = replica.state(now)
        if self.index is not None:
            self.index.apply(replica.replica_id, replica.block_manager.drain_cache_events())
        for router in self.routers:
            router.update_replica(replica.replica_id, state, now)

    # --- results ----------------------------------------------------------------------------------

    def _result(
        self, workload, results, itl, decision_s, reasons, matched_blocks, rejected, steps, wall
    ):
        config = self.config
        results.sort(key=lambda done: done.arrival)
        skip = int(len(results) * config.warmup_fraction)
        measured = results[skip:]
        ttft = [done.ttft for done in measured]
        e2e = [done.e2e for done in measured]
        output_tokens = sum(done.output_tokens for done in results)
        first = min((done.arrival for done in results), default=0.0)
        last = max((done.arrival + done.e2e for done in results), default=0.0)
        makespan = max(last - first, 1e-9)
        queries = sum(r.block_manager.prefix_cache_queries for r in self.replicas)
        hits = sum(r.block_manager.prefix_cache_hits for r in self.replicas)
        busy = [r.busy_s for r in self.replicas]
        mean_busy = statistics.fmean(busy) or 1e-9
        routed = sum(reasons.values()) or 1
        index = None
        if self.index is not None:
            stats = self.index.stats()
            index = {**asdict(stats), "bytes_per_entry": round(stats.bytes_per_entry, 1)}
        return SimResult(
            config={
                "num_replicas": config.num_replicas,
                "policy": config.policy,
                "stats_period_s": config.stats_period_s,
                "num_routers": config.num_routers,
                "seed": config.seed,
                "replica": asdict(config.replica),
                "step_model": config.step_model.to_dict(),
                "cost_weights": asdict(config.weights()) if config.policy == "cost" else None,
            },
            workload={"kind": type(workload).__name__, "rate": workload.rate},
            requests=len(results),
            measured_requests=len(measured),
            ttft_s=percentiles(ttft),
            itl_s={q: itl.percentile(float(q[1:])) for q in ("p50", "p90", "p99")},
            e2e_s=percentiles(e2e),
            output_tokens_per_s=output_tokens / makespan,
            requests_per_s=len(results) / makespan,
            prefix_hit_rate=hits / queries if queries else 0.0,
            load_imbalance={
                "busy_max_over_mean": max(busy) / mean_busy,
                "busy_cv": statistics.pstdev(busy) / mean_busy,
            },
            decisions={reason: count / routed for reason, count in reasons.items()},
            matched_blocks_per_request=matched_blocks / routed,
            decision_us=percentiles([s * 1e6 for s in decision_s]),
            preemptions=sum(r.scheduler.num_preemptions for r in self.replicas),
            rejected=rejected,
            index=index,
            sim_seconds=last,
            wall_seconds=wall,
            steps=steps,
            per_request=[done._asdict() for done in results],
        )


def simulate(config: SimConfig, workload: Workload, num_requests: int) -> SimResult:
    return Simulator(config).run(workload, num_requests)


def sweep(
    workload: str,
    workload_options: dict,
    replica_counts: list[int],
    loads: list[float],
    policies: list[str],
    num_requests: int,
    progress=None,
    requests_per_replica: int | None = None,
    **config,
) -> list[dict]:
    """Every (replicas, load, policy) combination on the same seeded workload. A load is a
    fraction of `capacity_rps` (the same offered rate for every policy). With
    `requests_per_replica`, each replica count gets that many requests per replica (at most
    `num_requests`)."""
    from cluster.sim_workloads import make_workload

    runs = []
    for count in replica_counts:
        for load in loads:
            for policy in policies:
                sim_config = SimConfig(count, policy, **config)
                spec, seed = sim_config.replica, sim_config.seed
                probe = make_workload(workload, 1.0, spec.block_size, seed, **workload_options)
                capacity = capacity_rps(probe.shape(), spec, sim_config.step_model, count)
                rate = load * capacity * count
                trace = make_workload(workload, rate, spec.block_size, seed, **workload_options)
                requests = num_requests
                if requests_per_replica:
                    requests = min(num_requests, requests_per_replica * count)
                result = simulate(sim_config, trace, requests).as_dict()
                result["load"] = load
                result["capacity_rps_per_replica"] = capacity
                result["workload"]["options"] = workload_options
                runs.append(result)
                if progress is not None:
                    progress(result)
    return runs
