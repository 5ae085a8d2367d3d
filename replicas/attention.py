"""Paged attention, plugged into transformers' `AttentionInterface`.

A step is one forward over a flat ragged batch ([1, T] tokens: decodes first, then prefill chunks).
For each layer, the function writes the step's K/V into the paged cache, then computes each
sequence's attention over its own blocks only: all decodes at once (on CPU with the native kernel
that reads blocks in place, elsewhere as one batched product over gathered blocks), each prefill
chunk with SDPA. Masks are built once per step by the model runner (`AttentionMetadata`), never as
transformers' T x T mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function
from transformers import AttentionInterface

ATTENTION_NAME = "continuum_paged"


@dataclass
class PrefillChunk:
    """One sequence's prefill tokens in the step: rows [start, start + length) of the batch."""

    start: int
    length: int
    # Cache slots of all the sequence's tokens so far, this chunk's included; None when the chunk
    # starts the sequence, so its own K/V are all it attends to.
    context_slots: torch.Tensor | None


@dataclass
class StepMasks:
    """Which cached tokens each token of the step may read, for one attention window."""

    # [num_decodes, 1, 1, max_blocks * block_size], 0 or -inf; only for the torch decode path.
    decode_bias: torch.Tensor | None
    # Per prefill chunk, [length, context_len] (True = attend); None means plain causal.
    prefill_masks: list[torch.Tensor | None]


@dataclass
class AttentionMetadata:
    """Where a step's tokens write their K/V and which cached tokens each of them reads."""

    kv_caches: list[
        tuple[torch.Tensor, torch.Tensor]
    ]  # per layer: [blocks, block_size, kv_heads, dim]
    slot_mapping: torch.Tensor  # [T] cache slot of each token
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor | None  # [num_decodes] tokens each decode attends to
    native_decode: bool  # decodes run in the native CPU kernel
    prefills: list[PrefillChunk]
    # Keyed by sliding window (None: full attention); a layer passes its window as `sliding_window`.
    masks: dict[int | None, StepMasks]


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    paged_metadata: AttentionMetadata | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None)."""
    with record_function("continuum.attention"):
        return _paged_attention(
            module, query, key, value, scaling, paged_metadata, sliding_window, kwargs
        )


def _paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    paged_metadata: AttentionMetadata | None,
    sliding_window: int | None,
    kwargs: dict,
) -> tuple[torch.Tensor, None]:
    if paged_metadata is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention needs `paged_metadata` (use the engine)")
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attention with {name!r} is not supported")
    meta = paged_metadata
    masks = meta.masks[sliding_window]
    k_cache, v_cache = meta.kv_caches[module.layer_idx]
    *_, kv_heads, head_dim = k_cache.shape
    _, heads, num_tokens, _ = query.shape
    groups = heads // kv_heads
    scale = scaling if scaling is not None else head_dim**-0.5

    k_new = key[0].transpose(0, 1)  # [T, Hkv, D]
    v_new = value[0].transpose(0, 1)
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k_new)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v_new)

    out = query.new_empty(num_tokens, heads, head_dim)
    nd = meta.num_decodes
    if nd:
        q = query[0, :, :nd].transpose(0, 1)  # [nd, H, D]
        if meta.native_decode:
            out[:nd] = torch.ops.continuum.paged_decode_attention(
                q,
                k_cache,
                v_cache,
                meta.decode_block_tables,
                meta.decode_context_lens,
                scale,
                sliding_window or 0,
            )
        else:
            out[:nd] = _batched_decode(q, k_cache, v_cache, meta.decode_block_tables, masks, scale)
    for chunk, mask in zip(meta.prefills, masks.prefill_masks, strict=True):
        rows = slice(chunk.start, chunk.start + chunk.length)
        q = query[:, :, rows]
        if chunk.context_slots is None:
            k, v = key[:, :, rows], value[:, :, rows]
        else:
            k = k_cache.view(-1, kv_heads, head_dim).index_select(0, chunk.context_slots)
            v = v_cache.view(-1, kv_heads, head_dim).index_select(0, chunk.context_slots)
            k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        attn = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=groups > 1,
        )
        out[rows] = attn[0].transpose(0, 1)
    return out.unsqueeze(0), None


def _batched_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    masks: StepMasks,
    scale: float,
) -> torch.Tensor:
    """Decode attention with torch ops: gather each sequence's blocks, padded to the longest."""
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    nd, heads, _ = q.shape
    q = q.reshape(nd, kv_heads, heads // kv_heads, head_dim)
    span = tables.shape[1] * block_size
    k = k_cache.view(num_blocks, -1).index_select(0, tables.view(-1))
    v = v_cache.view(num_blocks, -1).index_select(0, tables.view(-1))
    k = k.view(nd, span, kv_heads, head_dim).transpose(1, 2)
    v = v.view(nd, span, kv_heads, head_dim).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale + masks.decode_bias
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(nd, heads, head_dim)


def register_paged_attention() -> None:
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
