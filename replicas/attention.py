"""Paged attention, plugged into transformers' `AttentionInterface`: the one entry point.

A step is one forward over a flat ragged batch ([1, T] tokens: decodes first, then prefill chunks).
For each layer, transformers calls `paged_attention_forward`, which writes the step's K/V into
the paged cache at each token's slot, then hands the layer to the step's attention backend
(`replicas.attention_backends`) with the metadata the model runner built once for the step.
transformers builds no T x T mask for it: `AttentionMaskInterface` has no entry for this name.
"""

from __future__ import annotations

import torch
from torch.profiler import record_function
from transformers import AttentionInterface

from replicas.attention_backends import AttentionMetadata

ATTENTION_NAME = "continuum_paged"


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
        if paged_metadata is None:
            raise RuntimeError(
                f"{ATTENTION_NAME} attention needs `paged_metadata` (use the engine)"
            )
        for name in ("softcap", "s_aux", "sinks"):
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"attention with {name!r} is not supported")
        meta = paged_metadata
        k_cache, v_cache = meta.kv_caches[module.layer_idx]
        kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        # [T, heads, D] views; the projections wrote them token-major, so no copy.
        q = query[0].transpose(0, 1)
        k = key[0].transpose(0, 1)
        v = value[0].transpose(0, 1)
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        scale = scaling if scaling is not None else head_dim**-0.5
        out = meta.backend.forward(q, k, v, k_cache, v_cache, meta, sliding_window, scale)
        return out.unsqueeze(0), None


def register_paged_attention() -> None:
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
