"""What a replica tells the router about its prefix cache: numbered net changes, and now and then
the whole cache.

The engine process drains its block manager's changes with every step; they collect here, in
the replica process, until Serve asks for routing stats (`record_routing_stats`, every
`router.stats_period_s`). Serve hands the router only the latest stats of each replica, so a
router can miss a report: the numbering lets it notice (`PrefixIndex.apply`), and a full snapshot
every `SNAPSHOT_EVERY` reports repairs what it lost. A lost report only costs cache hits.
"""

from __future__ import annotations

import threading
from dataclasses import asdict

from scheduler.block_manager import CacheEvents

SNAPSHOT_EVERY = 20  # reports


class CacheReporter:
    """Fed by the replica's pipe reader thread, read by Serve on the event loop: one lock."""

    def __init__(self) -> None:
        self._cached: set[bytes] = set()  # the engine's prefix cache, as last drained
        self._changes: dict[bytes, bool] = {}  # since the last report: hash -> now cached
        self._reports = 0
        self._lock = threading.Lock()

    def absorb(self, stored: list[bytes], removed: list[bytes]) -> None:
        """Changes drained from the engine's block manager (in order)."""
        with self._lock:
            for block_hash in removed:
                self._cached.discard(block_hash)
                self._changes[block_hash] = False
            for block_hash in stored:
                self._cached.add(block_hash)
                self._changes[block_hash] = True

    def report(self) -> dict:
        """The next numbered report, as a plain dict (what Serve carries to the router)."""
        with self._lock:
            self._reports += 1
            number = self._reports
            changes, self._changes = self._changes, {}
            if number % SNAPSHOT_EVERY == 1:  # the first report, then every SNAPSHOT_EVERY
                return asdict(CacheEvents(number, list(self._cached), [], snapshot=True))
        # `changes` is ours alone now: the reader thread writes into the new dict.
        stored = [h for h, present in changes.items() if present]
        removed = [h for h, present in changes.items() if not present]
        return asdict(CacheEvents(number, stored, removed))
