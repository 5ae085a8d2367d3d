"""Live load of each engine replica, read from the replicas themselves (what the router sees)."""

from __future__ import annotations

import ray

REPLICA_PREFIX = "SERVE_REPLICA::{app}#{deployment}#"


def replica_stats(
    app_name: str = "continuum", deployment: str = "LLMServer", timeout_s: float = 10
) -> list[dict]:
    """One dict per live replica: its id and the routing stats it reports to the router."""
    prefix = REPLICA_PREFIX.format(app=app_name, deployment=deployment)
    actors = [
        a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    ]
    results = []
    for actor in sorted(actors, key=lambda a: a["name"]):
        replica = actor["name"].removeprefix(prefix)
        try:
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            stats = ray.get(handle.record_routing_stats.remote(), timeout=timeout_s)
        except Exception as exc:  # a replica that is starting or dying: report, don't fail
            results.append({"replica": replica, "error": repr(exc)})
            continue
        results.append({"replica": replica, **stats})
    return results
