"""Serve's request router for engine replicas: cache-aware, by estimated time to first token.

Serve calls `choose_replicas` for each request with the live replicas. The decision is made by a
pure policy (`scheduler.routing`): `CostPolicy` by default (each replica's queued prefill and
running work, plus the prompt's tokens it does not hold in its prefix cache, per this router's
`PrefixIndex`), or the queue + KV baseline (`router.policy: queue_kv`). Replicas report their
load and their prefix cache's changes in their routing stats; Serve hands this router the latest
report of each replica with every replica update (`update_replicas`), where they are applied:
no remote call is made per request. We return the choice first and fallbacks after, one per
rank; Serve sends the request to the first that accepts it.

A replica whose engine died is dropped at the first sign of it (its own report, or a request
that failed on it: `replica_health.report_dead_engine`), not at Serve's next health check; it
ranks last until Serve replaces it. The ingress in the same process reads that view for /health.
"""

from __future__ import annotations

import random
import time

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from cluster import replica_health
from replicas.deployment import GenerateRequest
from replicas.messages import ReplicaStats
from replicas.metrics import RaySink
from scheduler.block_manager import CacheEvents
from scheduler.prefix_index import PrefixIndex
from scheduler.routing import (
    CostPolicy,
    CostWeights,
    QueueKV,
    ReplicaState,
    RouteRequest,
    RoutingWeights,
)

ROUTER_METRICS = [
    "continuum_router_requests",
    "continuum_router_decisions",
    "continuum_router_prefix_blocks_matched",
    "continuum_router_decision_seconds",
    "continuum_router_index_entries",
    "continuum_router_index_bytes",
]


def generate_request(pending_request: PendingRequest | None) -> GenerateRequest | None:
    if pending_request is None:
        return None
    for arg in pending_request.args:
        if isinstance(arg, GenerateRequest):
            return arg
    return None


def replica_state(stats: ReplicaStats) -> ReplicaState:
    return ReplicaState(
        num_waiting=stats.num_waiting,
        num_running=stats.num_running,
        queued_prefill_tokens=stats.queued_prompt_tokens,
        free_blocks=stats.free_blocks,
        total_blocks=stats.total_blocks,
        block_size=stats.block_size,
        time=stats.time,
    )


class KVAwareRequestRouter(FIFOMixin, RequestRouter):
    def initialize_state(
        self,
        policy: str = "cost",
        cost_weights: dict | None = None,
        queue_weight: float = 1.0,
        kv_cache_weight: float = 1.0,
        index_max_entries: int = 4_000_000,
    ) -> None:
        self.index = PrefixIndex(index_max_entries)
        rng = random.Random()
        if policy == "cost":
            self.policy = CostPolicy(CostWeights(**(cost_weights or {})), self.index, rng)
        else:
            self.policy = QueueKV(RoutingWeights(queue_weight, kv_cache_weight), rng)
        self.metrics = RaySink(ROUTER_METRICS)
        self.dead_replicas: set[str] = set()
        self._last_report: dict[str, float] = {}  # replica -> `time` of the report applied
        replica_health.register(self)

    # --- replica reports ----------------------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._apply_reports()

    def _apply_reports(self) -> None:
        """Feed the policy and the index every report it has not seen; forget replicas that
        left or whose engine died (their index entries only ever cost hits, but are noise)."""
        now = time.time()
        live = set()
        for replica in self.curr_replicas.values():
            replica_id = replica.replica_id.unique_id
            stats = ReplicaStats.from_dict(replica.routing_stats)
            if stats is not None and not stats.engine_alive:
                self.dead_replicas.add(replica_id)
            if stats is None or replica_id in self.dead_replicas:
                continue
            live.add(replica_id)
            if self._last_report.get(replica_id) == stats.time:
                continue
            self._last_report[replica_id] = stats.time
            self.policy.update_replica(replica_id, replica_state(stats), now)
            if (events := replica.routing_stats.get("cache_events")) is not None:
                self.index.apply(replica_id, CacheEvents(**events))
        for replica_id in set(self._last_report) - live:
            del self._last_report[replica_id]
            self.policy.remove_replica(replica_id)
            self.index.drop_replica(replica_id)
        stats = self.index.stats()
        self.metrics.record("continuum_router_index_entries", stats.entries)
        self.metrics.record("continuum_router_index_bytes", stats.approx_bytes)

    # --- health -------------------------------------------------------------------------------

    def is_serving(self, replica: RunningReplica) -> bool:
        """Not known dead: by a failed request, or by its own last report (`_apply_reports`)."""
        return replica.replica_id.unique_id not in self.dead_replicas

    def num_serving(self) -> int:
        live = {r.replica_id.unique_id for r in self.curr_replicas.values()}
        self.dead_replicas &= live  # replaced replicas never come back
        return sum(self.is_serving(r) for r in self.curr_replicas.values())

    # --- routing ------------------------------------------------------------------------------

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        serving = [r for r in candidate_replicas if self.is_serving(r)]
        for replica in serving:  # new, not yet reported: known to the policy, with no load
            replica_id = replica.replica_id.unique_id
            if replica_id not in self._last_report:
                self._last_report[replica_id] = float("-inf")
                self.policy.update_replica(replica_id, ReplicaState(time=time.time()), time.time())
        ranked: list[str] = []
        if serving:
            request = generate_request(pending_request)
            route = RouteRequest(
                prompt_tokens=0 if request is None else len(request.prompt_token_ids),
                block_hashes=() if request is None else request.block_hashes,
                session_id=None if request is None else request.session_id,
            )
            start = time.perf_counter()
            decision = self.policy.route(route, time.time())
            elapsed = time.perf_counter() - start
            ranked = [r for r in decision.replica_ids if r in by_id]
            if request is not None:
                self.metrics.record("continuum_router_decision_seconds", elapsed)
                self.metrics.record("continuum_router_decisions", 1, {"reason": decision.reason})
                self.metrics.record(
                    "continuum_router_prefix_blocks_matched", decision.matched_blocks
                )
        # Every other replica after the policy's picks; dead engines last: with no live
        # replica the request fails fast (503), never hangs.
        picked = set(ranked)
        ranked += [rid for r in serving if (rid := r.replica_id.unique_id) not in picked]
        ranked += [rid for rid in by_id if rid in self.dead_replicas]
        if pending_request is not None:
            # All replicas are offered at once: if none accepts, wait before asking again.
            pending_request.routing_context.should_backoff = True
        return [[by_id[replica_id]] for replica_id in ranked]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        self.metrics.record(
            "continuum_router_requests", 1, {"target_replica": replica_id.unique_id}
        )
