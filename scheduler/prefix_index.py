"""The router's map of the cluster's prefix caches: block hash -> the replicas that hold it.

Replicas report what enters and leaves their prefix cache (`BlockManager.drain_cache_events`); the
router applies those reports here and, per request, asks how many LEADING blocks of the prompt
each replica holds (`match`, over `prompt_block_hashes`). Nothing here is trusted for
correctness: a replica looks its own cache up again when the request arrives, so an entry that is
stale, lost or wrong only costs a cache hit.

Layout, for speed at 1,024 replicas: each replica gets a slot; a block hash maps to the bitmask of
the slots that hold it (or, held by one slot only, to ~slot: a small int instead of a 1,024-bit
mask), so walking a prompt is one dict lookup and one integer AND per block. Each slot also keeps
the set of hashes it holds, so that a replica that dies or resyncs is removed without a scan.
Bounded: beyond `max_entries` (block, replica) pairs, the least recently used hashes go.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scheduler.block_manager import CacheEvents

# Memory, measured with tracemalloc on CPython 3.11 (tests/test_prefix_index.py keeps the
# estimate honest): per distinct block, its LRU dict entry (~105 B), 16-byte digest (49 B) and
# holder int (~32 B); per (block, replica) entry, a slot in the replica's set (~42 B); per block
# held by two or more replicas, a bitmask as wide as the slots (4 B per 30 slots).
BYTES_PER_BLOCK = 190
BYTES_PER_ENTRY = 42


@dataclass(frozen=True)
class IndexStats:
    replicas: int
    blocks: int  # distinct block hashes
    entries: int  # (block, replica) pairs
    shared_blocks: int  # blocks held by two or more replicas
    approx_bytes: int
    evicted_blocks: int  # dropped to stay under max_entries
    missed_reports: int  # gaps in a replica's numbered reports: entries may be stale

    @property
    def bytes_per_entry(self) -> float:
        return self.approx_bytes / self.entries if self.entries else 0.0


class PrefixIndex:
    def __init__(self, max_entries: int = 4_000_000):
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        # hash -> bitmask of holder slots, or ~slot (negative) when one slot holds it. Oldest
        # (least recently stored or matched) first.
        self._holders: OrderedDict[bytes, int] = OrderedDict()
        self._held: list[set[bytes]] = []  # slot -> hashes it holds
        self._slot_of: dict[str, int] = {}
        self._replica_of: list[str | None] = []
        self._free_slots: list[int] = []
        self._last_seq: dict[str, int] = {}
        self._num_entries = 0
        self._num_shared = 0
        self.evicted_blocks = 0
        self.missed_reports = 0

    # --- updates --------------------------------------------------------------------------------

    def apply(self, replica_id: str, events: CacheEvents) -> None:
        """Apply one numbered report of a replica's cache changes (or a full snapshot).

        A report older than one already applied is ignored; a gap (a lost report) is counted and
        the deltas applied anyway: lost removals leave stale entries, which only cost hits, until
        the replica's next snapshot replaces what is known of it. A report numbered 1 comes from
        a fresh block manager (a restarted engine): what was known of the replica is dropped.
        """
        last = self._last_seq.get(replica_id)
        if events.seq == 1 or events.snapshot:
            if replica_id in self._slot_of and not events.snapshot:
                self.drop_replica(replica_id)
        elif last is not None:
            if events.seq <= last:
                return
            if events.seq > last + 1:
                self.missed_reports += 1
        self._last_seq[replica_id] = events.seq
        if events.snapshot:
            self.resync(replica_id, events.stored)
            return
        self.discard(replica_id, events.removed)
        self.add(replica_id, events.stored)

    def add(self, replica_id: str, hashes: Iterable[bytes]) -> None:
        """Record that the replica holds these blocks (most recently used: the first of them,
        a prompt's head, is evicted last)."""
        slot = self._slot(replica_id)
        held = self._held[slot]
        holders = self._holders
        bit = 1 << slot
        new = 0
        for block_hash in reversed(list(hashes)):
            if block_hash in held:
                holders.move_to_end(block_hash)
                continue
            held.add(block_hash)
            new += 1
            value = holders.pop(block_hash, None)
            if value is None:
                holders[block_hash] = ~slot
            elif value < 0:
                holders[block_hash] = 1 << ~value | bit
                self._num_shared += 1
            else:
                holders[block_hash] = value | bit
        self._num_entries += new
        if self._num_entries > self.max_entries:
            self._evict()

    def discard(self, replica_id: str, hashes: Iterable[bytes]) -> None:
        """Record that the replica no longer holds these blocks (unknown ones are ignored)."""
        slot = self._slot_of.get(replica_id)
        if slot is None:
            return
        held = self._held[slot]
        for block_hash in hashes:
            if block_hash in held:
                held.discard(block_hash)
                self._num_entries -= 1
                self._remove_holder(block_hash, slot)

    def resync(self, replica_id: str, hashes: Iterable[bytes]) -> None:
        """Replace what is known of the replica with a full snapshot of its cache."""
        snapshot = set(hashes)
        slot = self._slot(replica_id)
        self.discard(replica_id, self._held[slot] - snapshot)
        self.add(replica_id, snapshot - self._held[slot])

    def drop_replica(self, replica_id: str) -> None:
        """Forget a replica that died, restarted or left; its slot is reused."""
        slot = self._slot_of.pop(replica_id, None)
        self._last_seq.pop(replica_id, None)
        if slot is None:
            return
        held = self._held[slot]
        self._num_entries -= len(held)
        for block_hash in held:
            self._remove_holder(block_hash, slot)
        self._held[slot] = set()
        self._replica_of[slot] = None
        self._free_slots.append(slot)

    def retain(self, replica_ids: Iterable[str]) -> None:
        """Drop every replica not in `replica_ids` (the live set)."""
        live = set(replica_ids)
        for replica_id in [r for r in self._slot_of if r not in live]:
            self.drop_replica(replica_id)

    # --- queries --------------------------------------------------------------------------------

    def match(self, hashes: Sequence[bytes]) -> dict[str, int]:
        """For each replica holding the prompt's first block: how many leading blocks it holds.

        A replica's prefix cache evicts a block no earlier than the blocks after it in any
        prompt (a block is only ever used with its whole prefix, and a finished sequence frees
        its tail first), so along a prompt the sets of holders only shrink. That makes the
        answer a bisection: find where the holder set changes, a few lookups per distinct
        answer instead of one per block (16 for a 6k-token prompt instead of 375). An index
        made stale by lost reports may break the order; then the answer is approximate, which
        only costs hits.
        """
        if not hashes:
            return {}
        holders = self._holders

        def holders_of(i: int) -> int:
            value = holders.get(hashes[i], 0)
            return 1 << ~value if value < 0 else value

        matched: dict[str, int] = {}
        replica_of = self._replica_of
        first = holders_of(0)
        if not first:
            return matched
        end = len(hashes) - 1
        last = holders_of(end) & first if end else first
        _record(last, len(hashes), matched, replica_of)
        # Intervals (lo, hi) with known holder sets at both ends; between them the set only
        # shrinks, and a replica in lo's set but not hi's holds exactly the blocks up to a
        # change point inside.
        stack = [(0, first, end, last)] if end else []
        while stack:
            lo, lo_set, hi, hi_set = stack.pop()
            if lo_set == hi_set:
                continue
            if hi == lo + 1:
                _record(lo_set & ~hi_set, hi, matched, replica_of)
                continue
            mid = (lo + hi) // 2
            mid_set = holders_of(mid) & lo_set
            hi_set &= mid_set
            stack.append((mid, mid_set, hi, hi_set))
            stack.append((lo, lo_set, mid, mid_set))
        return matched

    def touch(self, hashes: Sequence[bytes]) -> None:
        """Mark a routed prompt's blocks as recently used, its head last (evicted last). Only
        near the bound, where the order decides what goes: below it, touching is wasted work."""
        if self._num_entries < self.max_entries * 0.9:
            return
        holders = self._holders
        for block_hash in reversed(hashes):
            if block_hash in holders:
                holders.move_to_end(block_hash)

    def holders(self, block_hash: bytes) -> set[str]:
        value = self._holders.get(block_hash, 0)
        mask = 1 << ~value if value < 0 else value
        return {self._replica_of[slot] for slot in _bits(mask)}

    def blocks_of(self, replica_id: str) -> set[bytes]:
        slot = self._slot_of.get(replica_id)
        return set() if slot is None else set(self._held[slot])

    @property
    def replicas(self) -> list[str]:
        return list(self._slot_of)

    def stats(self) -> IndexStats:
        blocks = len(self._holders)
        mask_bytes = 4 * -(-len(self._held) // 30)
        return IndexStats(
            replicas=len(self._slot_of),
            blocks=blocks,
            entries=self._num_entries,
            shared_blocks=self._num_shared,
            approx_bytes=blocks * BYTES_PER_BLOCK
            + self._num_entries * BYTES_PER_ENTRY
            + self._num_shared * mask_bytes,
            evicted_blocks=self.evicted_blocks,
            missed_reports=self.missed_reports,
        )

    # --- internals ------------------------------------------------------------------------------

    def _slot(self, replica_id: str) -> int:
        slot = self._slot_of.get(replica_id)
        if slot is None:
            if self._free_slots:
                slot = self._free_slots.pop()
                self._replica_of[slot] = replica_id
            else:
                slot = len(self._held)
                self._held.append(set())
                self._replica_of.append(replica_id)
            self._slot_of[replica_id] = slot
        return slot

    def _remove_holder(self, block_hash: bytes, slot: int) -> None:
        value = self._holders[block_hash]
        if value < 0:
            del self._holders[block_hash]
            return
        mask = value & ~(1 << slot)
        if mask & (mask - 1):  # still two or more holders
            self._holders[block_hash] = mask
        else:
            self._holders[block_hash] = ~(mask.bit_length() - 1)
            self._num_shared -= 1

    def _evict(self) -> None:
        """Drop least recently used hashes (all their holders) until under `max_entries`."""
        holders = self._holders
        while self._num_entries > self.max_entries and holders:
            block_hash, value = holders.popitem(last=False)
            if value >= 0:
                self._num_shared -= 1
            mask = 1 << ~value if value < 0 else value
            for slot in _bits(mask):
                self._held[slot].discard(block_hash)
                self._num_entries -= 1
            self.evicted_blocks += 1


def _record(mask: int, count: int, matched: dict[str, int], replica_of: list) -> None:
    for slot in _bits(mask):
        matched[replica_of[slot]] = count


def _bits(mask: int):
    """Slots set in `mask`, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low
