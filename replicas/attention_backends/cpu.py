"""The CPU backend: all decodes in one native-kernel call, each prefill chunk with SDPA.

On CPU the native kernel (replicas/kernels/) reads each decode's blocks in place; without a
compiler, or on another device, decodes run as one batched product over gathered, padded blocks.
A prefill chunk attends with SDPA to its sequence's own cached tokens (causal, bottom-right).
Masks are built once per step here (`prepare`), never as transformers' T x T mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from replicas.attention_backends.base import AttentionBackend, AttentionMetadata
from replicas.step_inputs import StepInputs


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
class CpuStepState:
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64
    decode_context_lens: torch.Tensor | None  # [num_decodes] int64
    prefills: list[PrefillChunk]
    masks: dict[int | None, StepMasks]  # keyed by sliding window (None: full attention)


def build_masks(
    inputs: StepInputs, num_decodes: int, block_size: int, window: int | None, decode_bias: bool
) -> StepMasks:
    """Prefill masks, and the decode bias if asked, for one attention window (None: full)."""
    bias_tensor = None
    if num_decodes and decode_bias:
        context = inputs.starts[:num_decodes] + 1
        span = -(-int(context.max()) // block_size) * block_size
        key_pos = np.arange(span)
        valid = key_pos[None, :] < context[:, None]
        if window is not None:
            valid &= key_pos[None, :] > (context - 1 - window)[:, None]
        bias = np.where(valid, np.float32(0), np.float32(-np.inf))
        bias_tensor = torch.from_numpy(bias[:, None, None, :])
    prefill_masks: list[torch.Tensor | None] = []
    for i in range(num_decodes, len(inputs.starts)):
        start, length = int(inputs.starts[i]), int(inputs.lengths[i])
        context = start + length
        if start == 0 and (window is None or window >= context):
            prefill_masks.append(None)
            continue
        query_pos = np.arange(start, context)[:, None]
        key_pos = np.arange(context)[None, :]
        allowed = key_pos <= query_pos
        if window is not None:
            allowed &= key_pos > query_pos - window
        prefill_masks.append(torch.from_numpy(allowed))
    return StepMasks(bias_tensor, prefill_masks)


def batched_decode(
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


class CpuBackend(AttentionBackend):
    name = "cpu"

    def __init__(self, block_size: int, windows: tuple[int | None, ...], native_decode: bool):
        """`native_decode`: decode with the native CPU kernel (see `replicas.kernels`)."""
        self.block_size = block_size
        self.windows = windows
        self.native_decode = native_decode
        # The torch decode path reads whole blocks, padding slots included (masked out).
        self.reads_unwritten_slots = not native_decode

    def prepare(self, inputs: StepInputs, num_decodes: int, device: torch.device) -> CpuStepState:
        def to_device(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(device, non_blocking=True)

        nd = num_decodes
        decode_tables = decode_lens = None
        if nd:
            blocks = -(-int(inputs.starts[:nd].max() + 1) // self.block_size)
            decode_tables = to_device(np.ascontiguousarray(inputs.tables[:nd, :blocks]))
            decode_lens = to_device(inputs.starts[:nd] + 1)
        prefills = []
        for i in range(nd, len(inputs.starts)):
            start, length = int(inputs.starts[i]), int(inputs.lengths[i])
            context_slots = None
            if start:
                pos = np.arange(start + length)
                table = inputs.tables[i]
                slots = table[pos // self.block_size] * self.block_size + pos % self.block_size
                context_slots = to_device(slots)
            prefills.append(PrefillChunk(int(inputs.offsets[i]), length, context_slots))
        masks = {}
        for window in self.windows:
            step_masks = build_masks(inputs, nd, self.block_size, window, not self.native_decode)
            if device.type != "cpu":
                step_masks = StepMasks(
                    None if step_masks.decode_bias is None else step_masks.decode_bias.to(device),
                    [None if m is None else m.to(device) for m in step_masks.prefill_masks],
                )
            masks[window] = step_masks
        return CpuStepState(decode_tables, decode_lens, prefills, masks)

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
        state: CpuStepState = meta.backend_state
        masks = state.masks[window]
        kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        groups = query.shape[1] // kv_heads
        out = query.new_empty(query.shape)
        nd = meta.num_decodes
        if nd:
            if self.native_decode:
                out[:nd] = torch.ops.continuum.paged_decode_attention(
                    query[:nd],
                    k_cache,
                    v_cache,
                    state.decode_block_tables,
                    state.decode_context_lens,
                    scale,
                    window or 0,
                )
            else:
                out[:nd] = batched_decode(
                    query[:nd], k_cache, v_cache, state.decode_block_tables, masks, scale
                )
        for chunk, mask in zip(state.prefills, masks.prefill_masks, strict=True):
            rows = slice(chunk.start, chunk.start + chunk.length)
            q = query[rows].transpose(0, 1).unsqueeze(0)  # [1, H, length, D]
            if chunk.context_slots is None:
                k, v = key[rows], value[rows]
            else:
                k = k_cache.view(-1, kv_heads, head_dim).index_select(0, chunk.context_slots)
                v = v_cache.view(-1, kv_heads, head_dim).index_select(0, chunk.context_slots)
            attn = F.scaled_dot_product_attention(
                q,
                k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=mask is None,
                scale=scale,
                enable_gqa=groups > 1,
            )
            out[rows] = attn[0].transpose(0, 1)
        return out
