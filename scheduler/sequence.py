"""One sequence's scheduling state: the tokens it holds and how many of them are in the KV cache."""

from __future__ import annotations

import enum
from dataclasses import KW_ONLY, dataclass, field


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


@dataclass(eq=False)
class Sequence:
    """Tokens of one generation stream and the KV blocks that hold them.

    `token_ids` is prompt + output. `num_computed_tokens` of them have their K/V in the cache; the
    scheduler feeds the rest to the model (one token when decoding, a chunk when prefilling, all of
    them again after a preemption: prefill and decode are the same operation here).
    """

    seq_id: str
    token_ids: list[int]
    max_tokens: int
    _: KW_ONLY
    num_prompt_tokens: int = field(init=False)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    # Chained hashes of the full blocks of `token_ids`, filled lazily by the block manager.
    block_hashes: list[bytes] = field(default_factory=list)
    # Prompt tokens found in the prefix cache when the sequence was first scheduled.
    num_cached_tokens: int = 0
    # Prompt tokens the prefix cache held when the sequence was queued: what it will likely not
    # have to prefill (an estimate for routing; the blocks may be evicted before it runs).
    num_expected_cached_tokens: int = 0
    num_preemptions: int = 0
    # False: compute the whole prompt, skipping the prefix cache (its logits are wanted, e.g.
    # prompt logprobs); the sequence's own full blocks are still published for others.
    use_prefix_cache: bool = True

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
