"""The paged KV cache's bookkeeping: block tables, reference counts and the prefix cache.

Every block is in exactly one state:
- free: ref count 0, no hash; reused first;
- cached: ref count 0, holds a hashed full block that a later prompt may reuse; evicted LRU;
- owned: ref count > 0, in the block table of that many sequences.
Only full blocks are hashed, and a full block is never written again, so sharing one needs no
copy. A partial block shared by `fork` is copied when one owner writes to it (copy-on-write).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from scheduler.sequence import Sequence

HASH_BYTES = 16


def _hash(parent_hash: bytes, block_bytes: bytes) -> bytes:
    return hashlib.blake2b(parent_hash + block_bytes, digest_size=HASH_BYTES).digest()


def hash_block(parent_hash: bytes, token_ids: Seq[int]) -> bytes:
    """Chained hash of a full block: equal hashes mean equal token prefixes (not just equal blocks).

    A cryptographic hash, so that one tenant cannot craft a prompt whose blocks collide with
    another's cached blocks.
    """
    return _hash(parent_hash, array("q", token_ids).tobytes())


def extend_block_hashes(hashes: list[bytes], token_ids: Seq[int], block_size: int) -> None:
    """Append to `hashes` (those of the first full blocks of `token_ids`) the chained hashes of
    the remaining full blocks: `hash_block` per block, with the tokens converted once."""
    first, last = len(hashes), len(token_ids) // block_size
    if first >= last:
        return
    data = array("q", token_ids[first * block_size : last * block_size]).tobytes()
    step = 8 * block_size  # bytes per block ("q": 8-byte ints)
    parent = hashes[-1] if hashes else b""
    for offset in range(0, len(data), step):
        parent = _hash(parent, data[offset : offset + step])
        hashes.append(parent)


def prompt_block_hashes(token_ids: Seq[int], block_size: int) -> list[bytes]:
    """The chained hashes of a prompt's full blocks, exactly as a replica's block manager computes
    them: what the ingress hands the router to look the prompt up in the prefix index."""
    hashes: list[bytes] = []
    extend_block_hashes(hashes, token_ids, block_size)
    return hashes


@dataclass(frozen=True, slots=True)
class CacheEvents:
    """What entered and left a replica's prefix cache since its previous report (`seq - 1`).

    A block hash is in at most one list: the net change over the interval. With `snapshot`,
    `stored` is the whole cache and replaces what the receiver knew of this replica.
    """

    seq: int
    stored: list[bytes]
    removed: list[bytes]
    snapshot: bool = False


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        record_cache_events: bool = False,
    ):
        """`record_cache_events`: keep what enters and leaves the prefix cache for
        `drain_cache_events` (a replica reporting to a prefix-aware router); off, it costs nothing.
        """
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        # Blocks with ref count 0, in eviction order (front is taken first).
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_blocks: dict[bytes, int] = {}
        # Block copies (src, dst) that must run before the next forward pass.
        self.pending_copies: list[tuple[int, int]] = []
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of those, tokens found cached
        # Net prefix-cache changes since the last drain (see `_cache_changed`).
        self._cache_changes: dict[bytes, bool] | None = {} if record_cache_events else None
        self._cache_events_seq = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache -------------------------------------------------------------------------

    def update_block_hashes(self, seq: Sequence) -> None:
        """Extend `seq.block_hashes` to cover every full block of its known tokens."""
        extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size)

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of `seq`'s tokens; changes nothing.

        At least one token is always left to compute, since the step that samples the next token
        needs the last position's logits.
        """
        if not self.enable_prefix_caching or not seq.use_prefix_cache:
            return []
        self.update_block_hashes(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block = self.cached_blocks.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def cache_full_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Publish the blocks that became full and computed since `num_computed_before`."""
        first = num_computed_before // self.block_size
        last = seq.num_computed_tokens // self.block_size
        if first >= last or not self.enable_prefix_caching:
            return
        self.update_block_hashes(seq)
        changes = self._cache_changes
        for i in range(first, last):
            block = seq.block_table[i]
            block_hash = seq.block_hashes[i]
            if self.block_hashes[block] is None and block_hash not in self.cached_blocks:
                self.block_hashes[block] = block_hash
                self.cached_blocks[block_hash] = block
                if changes is not None:
                    self._cache_changed(block_hash, True)

    def _cache_changed(self, block_hash: bytes, present: bool) -> None:
        """Record a hash entering (present) or leaving the cache, as a net change since the last
        drain: True = absent then, present now; False = the reverse; no entry = as it was."""
        changes = self._cache_changes
        if changes.get(block_hash) is (not present):
            del changes[block_hash]
        else:
            changes[block_hash] = present

    def drain_cache_events(self, snapshot: bool = False) -> CacheEvents:
        """The prefix cache's net changes since the last drain (or, with `snapshot`, all of it).

        Needs `record_cache_events`. Numbered, so a receiver can tell that it missed one.
        """
        if self._cache_changes is None:
            raise RuntimeError("this BlockManager does not record cache events")
        changes, self._cache_changes = self._cache_changes, {}
        self._cache_events_seq += 1
        if snapshot:
            return CacheEvents(self._cache_events_seq, list(self.cached_blocks), [], snapshot=True)
        stored = [h for h, present in changes.items() if present]
        removed = [h for h, present in changes.items() if not present]
        return CacheEvents(self._cache_events_seq, stored, removed)

    # --- allocation ---------------------------------------------------------------------------

    def num_blocks_needed(
        self, seq: Sequence, num_new_tokens: int, num_prefix_blocks: int = 0
    ) -> int:
        """Blocks `allocate` would take from the free pool for this request."""
        if num_prefix_blocks:
            total = num_prefix_blocks * self.block_size + num_new_tokens
            return self.blocks_for_tokens(total) - num_prefix_blocks
        return self._blocks_to_grow(seq, num_new_tokens) + self._needs_copy_on_write(seq)

    def _blocks_to_grow(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(needed - len(seq.block_table), 0)

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix_blocks: Seq[int] = ()) -> bool:
        """Give `seq` room for `num_new_tokens` more tokens; False, changing nothing, if no room.

        `prefix_blocks` (from `lookup_prefix`, for a sequence with no blocks yet) are shared
        instead of allocated; the caller then counts their tokens as computed.
        """
        if prefix_blocks:
            copy_on_write = False
            needed = self.num_blocks_needed(seq, num_new_tokens, len(prefix_blocks))
            reclaimed = sum(1 for b in prefix_blocks if self.ref_counts[b] == 0)
        else:  # the common case (every decode): one check each
            copy_on_write = self._needs_copy_on_write(seq)
            needed = self._blocks_to_grow(seq, num_new_tokens) + copy_on_write
            reclaimed = 0
        if needed > len(self.free_blocks) - reclaimed:
            return False
        if not seq.block_table and self.enable_prefix_caching and seq.use_prefix_cache:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += len(prefix_blocks) * self.block_size
        for block in prefix_blocks:
            self._acquire(block)
            seq.block_table.append(block)
        if copy_on_write:
            idx = seq.num_computed_tokens // self.block_size
            src = seq.block_table[idx]
            dst = self._take_free_block()
            self.ref_counts[src] -= 1
            seq.block_table[idx] = dst
            self.pending_copies.append((src, dst))
            needed -= 1
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share all of `parent`'s blocks (e.g. n samples of one prompt)."""
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; unshared hashed blocks stay cached until evicted."""
        # Tail blocks go first into the eviction order: a prompt's head is the likelier reuse.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if self.block_hashes[block] is None:
                    self.free_blocks.move_to_end(block, last=False)
        seq.block_table = []

    def _needs_copy_on_write(self, seq: Sequence) -> bool:
        idx = seq.num_computed_tokens // self.block_size
        return idx < len(seq.block_table) and self.ref_counts[seq.block_table[idx]] > 1

    def _acquire(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _take_free_block(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        block_hash = self.block_hashes[block]
        if block_hash is not None:
            del self.cached_blocks[block_hash]
            self.block_hashes[block] = None
            if self._cache_changes is not None:
                self._cache_changed(block_hash, False)
        self.ref_counts[block] = 1
        return block
