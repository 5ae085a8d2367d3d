"""What a replica tells the router about its prefix cache: numbered net changes, and now and then
the whole cache.

The engine process drains its block manager's changes with every step; they collect here, in
the replica process, until Serve asks for routing stats (`record_routing_stats`, every
`router.stats_period_s`). Serve hands the router only the latest stats of each replica, so a
router can miss a report: the numbering lets it notice (`PrefixIndex.apply`), and a full snapshot
every `SNAPSHOT_EVERY` reports repairs what it lost. A lost report only costs cache hits.
"""

from __future__ import annotations

from dataclasses import asdict

from scheduler.block_manager import CacheEvents

SNAPSHOT_EVERY = 20  # reports


class CacheReporter:
    def __init__(self) -> None:
        self._cached: set[bytes] = set()  # the engine's prefix cache, as last drained
        self._changes: dict[bytes, bool] = {}  # since the last report: hash -> now cached
        self._reports = 0

    def absorb(self, stored: list[bytes], removed: list[bytes]) -> None:
        """Changes drained from the engine's block manager (in order)."""
        for block_hash in removed:
            self._cached.discard(block_hash)
            self._changes[block_hash] = False
        for block_hash in stored:
            self._cached.add(block_hash)
            self._changes[block_hash] = True

    def report(self) -> dict:
        """The next numbered report, as a plain dict (what Serve carries to the router)."""
        self._reports += 1
        changes, self._changes = self._changes, {}
        if self._reports % SNAPSHOT_EVERY == 1:  # the first report, then every SNAPSHOT_EVERY
            events = CacheEvents(self._reports, list(self._cached), [], snapshot=True)
        else:
            stored = [h for h, present in changes.items() if present]
            removed = [h for h, present in changes.items() if not present]
            events = CacheEvents(self._reports, stored, removed)
        return asdict(events)
