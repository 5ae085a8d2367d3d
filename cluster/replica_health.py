"""Which engine replicas can serve, as this process's request routers see them.

Shared between the ingress and the router in its process. It is its own module because Serve
ships the request router's module by value (cloudpickle), so state defined there would be a
private copy; a module imported from it stays one object per process.
"""

from __future__ import annotations

import weakref
from typing import Protocol


class HealthAwareRouter(Protocol):
    app_name: str
    dead_replicas: set[str]

    def num_serving(self) -> int: ...


_routers: weakref.WeakSet = weakref.WeakSet()


def register(router: HealthAwareRouter) -> None:
    _routers.add(router)


def report_dead_engine(replica_id: str) -> None:
    """A request failed because `replica_id`'s engine is dead: stop routing to it now."""
    for router in list(_routers):
        router.dead_replicas.add(replica_id)


def serving_replicas(app_name: str) -> int | None:
    """Replicas of `app_name` that can serve now; None before the router exists (Serve makes
    it on the first request through the handle)."""
    counts = [r.num_serving() for r in list(_routers) if r.app_name == app_name]
    return max(counts) if counts else None
