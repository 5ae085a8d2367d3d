"""Routing policy: which replica should take a new request. A pure function over load reports.

A replica's score adds its queue depth and its KV-cache occupancy, each scaled to [0, 1] and
weighted; lower is better. A replica whose free blocks cannot hold the request's prompt ranks
after every replica that can: it would only queue the request until blocks free up. Equal scores
are ordered randomly, so equally loaded replicas share the work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


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
