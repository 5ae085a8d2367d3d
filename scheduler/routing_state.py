"""The router's bookkeeping between replica reports, for the routing policies (pure Python).

- `PendingLoad`: requests this router sent that a replica's reports do not show yet.
- `RoutedPrefixes`: prompts sent to each replica recently, whose blocks it will soon hold.
- `SessionTable`: the replica that served each session last.
- `LoadBoard`: each replica's load, which drains as time passes, for least-loaded queries in
  O(log n) at 1,024 replicas.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import OrderedDict, deque
from collections.abc import Sequence
from heapq import heappop, heappush
from operator import itemgetter


class PendingLoad:
    """Anti-herding: requests this router sent that a replica's reports do not show yet count
    against it at once, so a burst does not pile onto the replica that looked best a report ago.

    An entry is dropped by the first report taken `report_lag_s` after it was routed (the report
    then counts it in its queue), or after `ttl_s` whatever happens (a report lost or never sent).
    """

    def __init__(self, report_lag_s: float = 0.0, ttl_s: float = 30.0):
        self.report_lag_s = report_lag_s
        self.ttl_s = ttl_s
        self._entries: dict[str, deque[tuple[float, int, int]]] = {}
        self._sums: dict[str, list[int]] = {}  # replica -> [requests, tokens, blocks]

    def add(self, replica_id: str, now: float, tokens: int, blocks: int) -> None:
        self._entries.setdefault(replica_id, deque()).append((now, tokens, blocks))
        sums = self._sums.setdefault(replica_id, [0, 0, 0])
        sums[0] += 1
        sums[1] += tokens
        sums[2] += blocks

    def reflect(self, replica_id: str, report_time: float, now: float) -> None:
        """A report taken at `report_time` arrived: drop what it shows (and what expired)."""
        entries = self._entries.get(replica_id)
        if not entries:
            return
        cutoff = max(report_time - self.report_lag_s, now - self.ttl_s)
        sums = self._sums[replica_id]
        while entries and entries[0][0] <= cutoff:
            _, tokens, blocks = entries.popleft()
            sums[0] -= 1
            sums[1] -= tokens
            sums[2] -= blocks

    def entries(self, replica_id: str) -> Sequence[tuple[float, int, int]]:
        """(routed at, tokens, blocks) of each request not yet reported, oldest first."""
        return self._entries.get(replica_id, ())

    def get(self, replica_id: str) -> tuple[int, int, int]:
        """(requests, prompt tokens to prefill, KV blocks) routed and not yet reported."""
        sums = self._sums.get(replica_id)
        return (0, 0, 0) if sums is None else (sums[0], sums[1], sums[2])

    def drop(self, replica_id: str) -> None:
        self._entries.pop(replica_id, None)
        self._sums.pop(replica_id, None)


class RoutedPrefixes:
    """Prompts this router sent to each replica in the last `ttl_s`: the replica will hold their
    blocks once it prefills, seconds before its report says so. Matching against them sends a
    burst of one new prefix to one replica (which computes it once) instead of to every replica.
    A wrong guess (the request failed, the blocks were evicted) only costs a hit.

    Chained hashes make this cheap: two prompts share their first i blocks exactly when their
    i-th block hashes are equal, so the blocks two prompts share are found by binary search.
    Per replica and first block only the latest prompt is kept (prompts that start alike mostly
    share a long prefix), so a match costs a few searches per replica that got such a prompt.
    """

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._by_first: dict[bytes, dict[str, Sequence[bytes]]] = {}
        self._expiry: deque[tuple[float, str, Sequence[bytes]]] = deque()

    def add(self, replica_id: str, hashes: Sequence[bytes], now: float) -> None:
        """Remember a routed prompt (`hashes` is kept, not copied: append to it at most)."""
        if hashes:
            self._by_first.setdefault(hashes[0], {})[replica_id] = hashes
            self._expiry.append((now + self.ttl_s, replica_id, hashes))

    def match(self, hashes: Sequence[bytes]) -> dict[str, int]:
        """Per replica, how many leading blocks of `hashes` a prompt routed there shares."""
        matched: dict[str, int] = {}
        if not hashes:
            return matched
        for replica_id, routed in self._by_first.get(hashes[0], {}).items():
            low, high = 1, min(len(hashes), len(routed))  # blocks [0, low) are shared
            while low < high:
                mid = (low + high + 1) // 2
                if routed[mid - 1] == hashes[mid - 1]:
                    low = mid
                else:
                    high = mid - 1
            matched[replica_id] = low
        return matched

    def expire(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, replica_id, hashes = expiry.popleft()
            latest = self._by_first.get(hashes[0])
            if latest is not None and latest.get(replica_id) is hashes:
                del latest[replica_id]
                if not latest:
                    del self._by_first[hashes[0]]

    def drop(self, replica_id: str) -> None:
        for first in list(self._by_first):
            latest = self._by_first[first]
            latest.pop(replica_id, None)
            if not latest:
                del self._by_first[first]


class SessionTable:
    """Session id -> the replica that served it last; bounded, least recently used out."""

    def __init__(self, max_sessions: int = 100_000):
        self.max_sessions = max_sessions
        self._replica: OrderedDict[str, str] = OrderedDict()

    def get(self, session_id: str) -> str | None:
        replica_id = self._replica.get(session_id)
        if replica_id is not None:
            self._replica.move_to_end(session_id)
        return replica_id

    def set(self, session_id: str, replica_id: str) -> None:
        self._replica[session_id] = replica_id
        self._replica.move_to_end(session_id)
        if len(self._replica) > self.max_sessions:
            self._replica.popitem(last=False)

    def __len__(self) -> int:
        return len(self._replica)


class LoadBoard:
    """Replicas' loads for least-loaded queries: load = max(until - now, 0) + other, where
    `until` is when the replica's queued prefill will be done and `other` the rest of its load.

    A replica whose queued prefill is done ("idle") sits in a list sorted by `other`; one still
    prefilling sits in two heaps, by `until` (to move it to the sorted list when that passes)
    and by `until + other` (its load, less `now`). So the least load and every replica within a
    tolerance of it are found in O(log n + ties), not by computing every replica's load.
    Heap entries are invalidated by version, not removed. Times must not go backwards.
    """

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float, int]] = {}  # id -> (until, other, version)
        self._idle: list[tuple[float, str]] = []  # (other, id), sorted
        self._busy_until: list[tuple[float, int, str]] = []  # heap of (until, version, id)
        self._busy_load: list[tuple[float, int, str]] = []  # heap of (until + other, ...)
        self._now = float("-inf")
        self._version = 0

    def __len__(self) -> int:
        return len(self._state)

    def __contains__(self, replica_id: str) -> bool:
        return replica_id in self._state

    def set(self, replica_id: str, until: float, other: float, now: float) -> None:
        self.advance(now)
        self.remove(replica_id)
        self._version += 1
        self._state[replica_id] = (until, other, self._version)
        if until <= self._now:
            insort(self._idle, (other, replica_id))
        else:
            heappush(self._busy_until, (until, self._version, replica_id))
            heappush(self._busy_load, (until + other, self._version, replica_id))

    def remove(self, replica_id: str) -> None:
        state = self._state.pop(replica_id, None)
        if state is not None and state[0] <= self._now:  # idle: in the sorted list
            i = bisect_left(self._idle, (state[1], replica_id))
            del self._idle[i]
        # A busy replica's heap entries are stale now (no state, or a newer version).

    def load(self, replica_id: str, now: float) -> float:
        until, other, _ = self._state[replica_id]
        return (until - now if until > now else 0.0) + other

    def advance(self, now: float) -> None:
        """Move replicas whose queued prefill is done by `now` to the sorted list."""
        if now <= self._now:
            return
        self._now = now
        busy = self._busy_until
        while busy and busy[0][0] <= now:
            _, version, replica_id = heappop(busy)
            state = self._state.get(replica_id)
            if state is not None and state[2] == version:
                insort(self._idle, (state[1], replica_id))

    def least(self, now: float, tie: float) -> tuple[float, list[str] | None, int]:
        """(least load, busy replicas within `tie` of it, idle ones within it: a prefix of the
        sorted list of that length). Pick among both at random for a fair tie-break."""
        self.advance(now)
        heap = self._busy_load
        while heap and not self._is_busy(heap[0]):
            heappop(heap)
        lowest = min(
            self._idle[0][0] if self._idle else float("inf"),
            heap[0][0] - now if heap else float("inf"),
        )
        limit = lowest + tie
        idle_ties = bisect_right(self._idle, limit, key=itemgetter(0))
        busy_ties = None
        if heap and heap[0][0] - now <= limit:
            busy_ties = []
            frontier = [0]  # a walk down the heap, cut where keys pass the limit
            while frontier:
                i = frontier.pop()
                if i < len(heap) and heap[i][0] - now <= limit:
                    if self._is_busy(heap[i]):
                        busy_ties.append(heap[i][2])
                    frontier += (2 * i + 1, 2 * i + 2)
        return lowest, busy_ties, idle_ties

    def idle_at(self, i: int) -> str:
        return self._idle[i][1]

    def _is_busy(self, entry: tuple[float, int, str]) -> bool:
        state = self._state.get(entry[2])
        return state is not None and state[2] == entry[1] and state[0] > self._now
