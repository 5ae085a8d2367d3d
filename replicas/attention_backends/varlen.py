"""The CUDA backend: one FlashAttention call per layer for the whole flat batch.

`torch.nn.attention.varlen.varlen_attn` runs the FlashAttention-2 kernels built into torch's CUDA
wheels. What it can do depends on the torch version, so it is detected, not assumed:

- `paged` (torch >= 2.12: `block_table`, `seqused_k`): the kernel reads the cache
  `[num_blocks, block_size, Hkv, D]` in place through the int32 block table; pages must be a
  multiple of 256 tokens. No host work per step, so decode steps can be CUDA graphs.
- `gathered` (torch 2.10-2.11: `scale`, `window_size` only): each layer gathers the step's
  context K/V into a contiguous varlen batch (one index_select), then one kernel call. Sizes
  change every step, so no CUDA graphs.

A mode is used only after it matched the reference backend on a small ragged batch on this GPU,
with this model's head layout, dtype and windows; otherwise the next mode is tried, and the
last resort is the reference backend, with a warning, never a crash.
"""

from __future__ import annotations

import inspect
import logging

import numpy as np
import torch

from replicas.attention_backends.base import (
    AttentionBackend,
    AttentionMetadata,
    build_attention_metadata,
)
from replicas.attention_backends.reference import reference_varlen_attention
from replicas.step_inputs import StepInputs, context_slots

logger = logging.getLogger(__name__)

MODES = ("paged", "gathered")
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def detect_varlen_modes() -> tuple[list[str], str]:
    """The modes this torch supports, best first, and a sentence saying why not more."""
    version = torch.__version__
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return [], f"torch {version} has no torch.nn.attention.varlen (2.10 or newer has it)"
    params = inspect.signature(varlen_attn).parameters.keys()
    if not {"scale", "window_size"} <= params:
        return [], f"torch {version}'s varlen_attn takes no scale/window_size (2.10 or newer)"
    if {"block_table", "seqused_k"} <= params:
        return ["paged", "gathered"], ""
    return ["gathered"], (
        f"torch {version}'s varlen_attn takes no block_table (2.12 or newer): K/V are gathered "
        "per layer and decode steps run without CUDA graphs"
    )


class VarlenBackend(AttentionBackend):
    name = "varlen"

    def __init__(self, mode: str, block_size: int):
        from torch.nn.attention.varlen import varlen_attn

        if mode not in MODES:
            raise ValueError(f"unknown varlen mode {mode!r}; choose from {MODES}")
        self.mode = mode
        self.block_size = block_size
        self.graph_safe = mode == "paged"
        self._varlen_attn = varlen_attn
        self._takes_gqa_flag = "enable_gqa" in inspect.signature(varlen_attn).parameters

    @property
    def label(self) -> str:
        return f"varlen ({self.mode})"

    def prepare(
        self, inputs: StepInputs, num_decodes: int, device: torch.device
    ) -> torch.Tensor | None:
        if self.mode == "paged":
            return None
        # The gather index: the cache slots of each sequence's context, sequence after sequence.
        return torch.from_numpy(context_slots(inputs, self.block_size)).to(
            device, non_blocking=True
        )

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
        # FlashAttention's window counts the query's own position apart: W keys = (W - 1, 0).
        # One query per sequence needs no causal mask, and without one FlashAttention folds the
        # GQA groups of a decode batch into its query tile.
        left = -1 if window is None else window - 1
        right = -1 if meta.max_seqlen_q == 1 else 0
        kwargs = {"scale": scale, "window_size": (left, right)}
        kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        if self._takes_gqa_flag:
            kwargs["enable_gqa"] = query.shape[1] != kv_heads
        if self.mode == "paged":
            k, v = k_cache, v_cache
            kwargs.update(seqused_k=meta.seqused_k, block_table=meta.block_table)
        else:
            slots = meta.backend_state
            k = k_cache.view(-1, kv_heads, head_dim).index_select(0, slots)
            v = v_cache.view(-1, kv_heads, head_dim).index_select(0, slots)
        return self._varlen_attn(
            query,
            k,
            v,
            meta.cu_seqlens_q,
            meta.cu_seqlens_k,
            meta.max_seqlen_q,
            meta.max_seqlen_k,
            **kwargs,
        )

    def self_test(
        self,
        heads: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        windows: tuple[int | None, ...],
        device: torch.device,
    ) -> str | None:
        """None if this mode matches the reference on this device, else what went wrong."""
        if dtype not in FLASH_DTYPES:
            return f"FlashAttention computes in float16/bfloat16, not {dtype}"
        try:
            for decode_only in (False, True):
                for window in windows:
                    error = self._compare(
                        heads, kv_heads, head_dim, dtype, window, device, decode_only
                    )
                    if error:
                        return error
        except Exception as exc:  # an unsupported GPU, head size, ...: any failure means "no"
            return f"{type(exc).__name__}: {exc}"
        return None

    def _compare(
        self,
        heads: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        window: int | None,
        device: torch.device,
        decode_only: bool,
    ) -> str | None:
        bs = self.block_size
        # A decode crossing a block boundary, a chunk continuing a prefill, a fresh prompt;
        # blocks out of order, with unused ones between them.
        starts = np.array([bs + 4, bs // 2, 0])
        lengths = np.array([1, 40, 30])
        tables = np.array([[4, 1], [3, 0], [0, 0]])
        if decode_only:
            starts, lengths, tables = np.array([bs + 4, 9]), np.array([1, 1]), tables[[0, 2]]
        inputs = StepInputs(
            input_ids=np.zeros(int(lengths.sum()), np.int64),
            positions=np.zeros(int(lengths.sum()), np.int64),
            slots=np.zeros(int(lengths.sum()), np.int64),
            tables=tables.astype(np.int64),
            starts=starts,
            lengths=lengths,
            offsets=np.cumsum(lengths) - lengths,
        )
        gen = torch.Generator().manual_seed(0)
        shape = (6, bs, kv_heads, head_dim)
        k_cache = torch.randn(shape, generator=gen).to(device, dtype)
        v_cache = torch.randn(shape, generator=gen).to(device, dtype)
        query = torch.randn(int(lengths.sum()), heads, head_dim, generator=gen).to(device, dtype)
        num_decodes = int((lengths == 1).sum()) if decode_only else 1
        meta = build_attention_metadata(inputs, num_decodes, [(k_cache, v_cache)], self, device)
        scale = head_dim**-0.5
        got = self.forward(query, query, query, k_cache, v_cache, meta, window, scale)
        want = reference_varlen_attention(
            query,
            k_cache,
            v_cache,
            meta.cu_seqlens_q,
            meta.seqused_k,
            meta.block_table,
            scale,
            window,
        )
        error = (got.float() - want.float()).abs().max().item()
        if not error <= 2e-2:
            return (
                f"differs from the reference by {error:.3g} (window {window}, "
                f"{'decode-only' if decode_only else 'mixed'} batch)"
            )
        return None
