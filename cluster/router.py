"""Serve's request router for engine replicas: shortest queue and most free KV blocks first.

Serve calls `choose_replicas` for each request with the live replicas (dead ones are already
gone); we return them ranked by the pure policy in `scheduler.routing`, one per rank, and Serve
sends the request to the first that accepts it (queue below `max_ongoing_requests`). When every
replica refuses, the request backs off instead of retrying in a tight loop.
"""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from replicas.deployment import GenerateRequest
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

    def replica_load(self, replica: RunningReplica) -> ReplicaLoad:
        stats = replica.routing_stats or {}
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        if queue_len is None:  # not yet probed: the replica's own last report
            queue_len = stats.get("num_waiting", 0) + stats.get("num_running", 0)
        return ReplicaLoad(
            replica_id=replica.replica_id.unique_id,
            queue_len=queue_len,
            max_queue_len=replica.max_ongoing_requests,
            free_blocks=stats.get("free_blocks"),
            total_blocks=stats.get("total_blocks"),
            block_size=stats.get("block_size", 16),
        )

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = [self.replica_load(r) for r in candidate_replicas]
        ranked = rank_replicas(loads, prompt_tokens(pending_request), self.weights, self.rng)
        if pending_request is not None:
            # All replicas are offered at once: if none accepts, wait before asking again.
            pending_request.routing_context.should_backoff = True
        return [[by_id[replica_id]] for replica_id in ranked]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        self.metrics.record(
            "continuum_router_decisions", 1, {"target_replica": replica_id.unique_id}
        )
