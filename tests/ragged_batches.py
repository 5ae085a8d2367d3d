"""Random ragged batches over a paged cache, for the attention-backend tests (CPU and GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from replicas.step_inputs import StepInputs


@dataclass
class RaggedBatch:
    """A step of sequences over a paged cache, with each sequence's K/V also kept in order."""

    inputs: StepInputs
    num_decodes: int
    block_size: int
    query: torch.Tensor  # [T, H, D]
    key: torch.Tensor  # [T, Hkv, D]: this step's keys (also in the cache)
    value: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    logical_k: list[torch.Tensor]  # per sequence [context, Hkv, D], position order
    logical_v: list[torch.Tensor]
    window: int | None


def make_batch(
    context_lens: list[int],
    query_lens: list[int],
    block_size: int,
    kv_heads: int,
    groups: int,
    head_dim: int,
    window: int | None,
    seed: int,
    unwritten: float = float("nan"),
) -> RaggedBatch:
    """The leading sequences with one query are the decodes (a one-token prefill chunk may come
    later); `unwritten` fills every slot no token wrote (NaN: reading one fails loudly)."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 3  # unused blocks sit between the used ones
    order = rng.permutation(num_blocks)
    tables = np.zeros((len(context_lens), max(blocks_per_seq)), np.int64)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, unwritten)
    v_cache = torch.full(shape, unwritten)
    logical_k, logical_v = [], []
    taken = 0
    for i, (context, n) in enumerate(zip(context_lens, blocks_per_seq, strict=True)):
        tables[i, :n] = order[taken : taken + n]
        taken += n
        k = torch.randn(context, kv_heads, head_dim, generator=gen)
        v = torch.randn(context, kv_heads, head_dim, generator=gen)
        for pos in range(context):  # the definition of a block table, token by token
            block, offset = tables[i, pos // block_size], pos % block_size
            k_cache[block, offset] = k[pos]
            v_cache[block, offset] = v[pos]
        logical_k.append(k)
        logical_v.append(v)
    lengths = np.array(query_lens, np.int64)
    starts = np.array(context_lens, np.int64) - lengths
    total = int(lengths.sum())
    inputs = StepInputs(
        input_ids=np.zeros(total, np.int64),
        positions=np.concatenate(
            [np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)]
        ),
        slots=np.zeros(total, np.int64),  # nothing is written in these tests
        tables=tables,
        starts=starts,
        lengths=lengths,
        offsets=np.cumsum(lengths) - lengths,
    )
    key = torch.cat([k[s:] for k, s in zip(logical_k, starts, strict=True)])
    value = torch.cat([v[s:] for v, s in zip(logical_v, starts, strict=True)])
    query = torch.randn(total, kv_heads * groups, head_dim, generator=gen)
    leading_decodes = len(lengths) if (lengths == 1).all() else int(np.argmin(lengths == 1))
    return RaggedBatch(
        inputs,
        leading_decodes,
        block_size,
        query,
        key,
        value,
        k_cache,
        v_cache,
        logical_k,
        logical_v,
        window,
    )
