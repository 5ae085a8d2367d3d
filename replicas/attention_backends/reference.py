"""The specification of the varlen contract in plain torch: exact, readable, slow.

Every other backend must compute what this one computes (tests compare them on random ragged
batches); the engine's equivalence tests run with it on CPU, so the metadata the CUDA kernel gets
is checked against `model.generate` without a GPU. It is also the last resort on CUDA when
torch has no usable FlashAttention entry point.
"""

from __future__ import annotations

import torch

from replicas.attention_backends.base import AttentionBackend, AttentionMetadata


def reference_varlen_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqused_k: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """query [T, H, D] over caches [blocks, block_size, Hkv, D] -> [T, H, D] (see base.py).

    One sequence at a time: gather its first seqused_k tokens through its block table, then a
    float32 softmax over causal (bottom-right) and window-masked scores. Rows of no sequence, and
    sequences with seqused_k == 0, come out as zeros.
    """
    _, heads, head_dim = query.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads is not a multiple of {kv_heads} kv heads")
    groups = heads // kv_heads
    out = torch.zeros_like(query)
    bounds = cu_seqlens_q.tolist()
    for i, k_len in enumerate(seqused_k.tolist()):
        q_start, q_end = bounds[i], bounds[i + 1]
        q_len = q_end - q_start
        if q_len == 0 or k_len == 0:
            continue
        if q_len > k_len:
            raise ValueError(
                f"sequence {i} has {q_len} queries but attends to {k_len} tokens; its queries "
                "must be the last tokens of what it attends to"
            )
        blocks = block_table[i, : -(-k_len // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:k_len].float()  # [k_len, Hkv, D]
        v = v_cache[blocks].flatten(0, 1)[:k_len].float()
        q = query[q_start:q_end].float().view(q_len, kv_heads, groups, head_dim)
        scores = torch.einsum("qhgd,khd->hgqk", q, k) * scale
        q_pos = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]
        k_pos = torch.arange(k_len, device=query.device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        attended = torch.einsum("hgqk,khd->qhgd", probs, v)
        out[q_start:q_end] = attended.reshape(q_len, heads, head_dim).to(out.dtype)
    return out


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        window: int | None,
        scale: float,
    ) -> torch.Tensor:
        return reference_varlen_attention(
            query,
            k_cache,
            v_cache,
            meta.cu_seqlens_q,
            meta.seqused_k,
            meta.block_table,
            scale,
            window,
        )
