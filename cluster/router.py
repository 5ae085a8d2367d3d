"""Serve's request router for engine replicas: shortest queue and most free KV blocks first.

Serve calls `choose_replicas` for each request with the live replicas; we return them ranked by
the pure policy in `scheduler.routing`, one per rank, and Serve sends the request to the first
that accepts it (queue below `max_ongoing_requests`). When every replica refuses, the request
backs off instead of retrying in a tight loop.

A replica whose engine died is dropped at the first sign of it (its own report, or a request
that failed on it: `report_dead_engine`), not at Serve's next health check; it ranks last
until Serve replaces it. The ingress in the same process reads that view for /health
(cluster/replica_health.py).
"""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from cluster import replica_health
from replicas.deployment import GenerateRequest
from replicas.messages import ReplicaStats
from replicas.metrics import RaySink
from scheduler.routing import ReplicaLoad, RoutingWeights, rank_replicas


def prompt_tokens(pending_request: PendingRequest | None) -> int | None:
    if pending_request is None:
        return None
    for arg in pending_request.args:
        if isinstance(arg, GenerateRequest):
            return len(arg.prompt_token_ids)
    return None


class KVAwareRequestRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, queue_weight: float = 1.0, kv_cache_weight: float = 1.0) -> None:
        self.weights = RoutingWeights(queue=queue_weight, kv_cache=kv_cache_weight)
        self.rng = random.Random()
        self.metrics = RaySink(["continuum_router_decisions"])
        self.dead_replicas: set[str] = set()
        replica_health.register(self)

    def is_serving(self, replica: RunningReplica) -> bool:
        if replica.replica_id.unique_id in self.dead_replicas:
            return False
        stats = ReplicaStats.from_dict(replica.routing_stats)
        return stats is None or stats.engine_alive

    def num_serving(self) -> int:
        live = {r.replica_id.unique_id for r in self.curr_replicas.values()}
        self.dead_replicas &= live  # replaced replicas never come back
        return sum(self.is_serving(r) for r in self.curr_replicas.values())

    def replica_load(self, replica: RunningReplica) -> ReplicaLoad:
        stats = ReplicaStats.from_dict(replica.routing_stats)
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        if queue_len is None:  # not yet probed: the replica's own last report
            queue_len = 0 if stats is None else stats.num_waiting + stats.num_running
        return ReplicaLoad(
            replica_id=replica.replica_id.unique_id,
            queue_len=queue_len,
            max_queue_len=replica.max_ongoing_requests,
            free_blocks=None if stats is None else stats.free_blocks,
            total_blocks=None if stats is None else stats.total_blocks,
            block_size=16 if stats is None else stats.block_size,
        )

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        serving = [r for r in candidate_replicas if self.is_serving(r)]
        loads = [self.replica_load(r) for r in serving]
        ranked = rank_replicas(loads, prompt_tokens(pending_request), self.weights, self.rng)
        # Dead engines last: with no live replica the request fails fast (503), never hangs.
        ranked += [r.replica_id.unique_id for r in candidate_replicas if r not in serving]
        if pending_request is not None:
            # All replicas are offered at once: if none accepts, wait before asking again.
            pending_request.routing_context.should_backoff = True
        return [[by_id[replica_id]] for replica_id in ranked]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        self.metrics.record(
            "continuum_router_decisions", 1, {"target_replica": replica_id.unique_id}
        )
