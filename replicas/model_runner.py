"""Turns a scheduled batch into one forward pass over the flat ragged batch and returns logits.

Step tensors are built with numpy over whole arrays (no Python loop per token), and logits are
computed only for the last token of each sequence that samples (`logits_to_keep`), plus the prompt
positions of requests that asked for prompt logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch.profiler import record_function

from replicas.attention import AttentionMetadata, PrefillChunk, StepMasks
from replicas.kv_cache import PagedKVCache
from scheduler import ScheduledBatch


@dataclass
class StepInputs:
    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T]
    tables: np.ndarray  # [S, max_blocks] block tables, zero-padded
    starts: np.ndarray  # [S] tokens already computed per sequence
    lengths: np.ndarray  # [S] tokens fed this step per sequence
    offsets: np.ndarray  # [S] first row of each sequence in the batch


def build_step_inputs(batch: ScheduledBatch, block_size: int) -> StepInputs:
    seqs = batch.seqs
    lengths = np.asarray(batch.num_tokens, dtype=np.int64)
    starts = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, len(seqs))
    ends = starts + lengths
    offsets = np.cumsum(lengths) - lengths
    total = int(lengths.sum())
    positions = np.arange(total, dtype=np.int64) - np.repeat(offsets - starts, lengths)
    input_ids = np.fromiter(
        chain.from_iterable(
            s.token_ids[a:b] for s, a, b in zip(seqs, starts.tolist(), ends.tolist(), strict=True)
        ),
        np.int64,
        total,
    )
    tables = np.zeros((len(seqs), max(len(s.block_table) for s in seqs)), dtype=np.int64)
    for i, seq in enumerate(seqs):
        tables[i, : len(seq.block_table)] = seq.block_table
    rows = np.repeat(np.arange(len(seqs)), lengths)
    slots = tables[rows, positions // block_size] * block_size + positions % block_size
    return StepInputs(input_ids, positions, slots, tables, starts, lengths, offsets)


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


class ModelRunner:
    """Runs the model over scheduled batches, reading and writing the paged KV cache."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: PagedKVCache,
        device: torch.device,
        native_decode: bool,
    ):
        """`native_decode`: decode with the native CPU kernel (see `replicas.kernels`)."""
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size
        config = model.config
        window = getattr(config, "sliding_window", None)
        uses_window = window is not None and (
            getattr(config, "use_sliding_window", True)
            or "sliding_attention" in (getattr(config, "layer_types", None) or ())
        )
        self.windows: tuple[int | None, ...] = (None, window) if uses_window else (None,)
        self.native_decode = native_decode

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def prepare(self, batch: ScheduledBatch) -> tuple[StepInputs, AttentionMetadata]:
        inputs = build_step_inputs(batch, self.block_size)
        nd = batch.num_decodes
        decode_tables = decode_lens = None
        if nd:
            blocks = -(-int(inputs.starts[:nd].max() + 1) // self.block_size)
            decode_tables = self._to_device(np.ascontiguousarray(inputs.tables[:nd, :blocks]))
            decode_lens = self._to_device(inputs.starts[:nd] + 1)
        prefills = []
        for i in range(nd, len(batch.seqs)):
            start, length = int(inputs.starts[i]), int(inputs.lengths[i])
            context_slots = None
            if start:
                pos = np.arange(start + length)
                table = inputs.tables[i]
                slots = table[pos // self.block_size] * self.block_size + pos % self.block_size
                context_slots = self._to_device(slots)
            prefills.append(PrefillChunk(int(inputs.offsets[i]), length, context_slots))
        masks = {}
        for window in self.windows:
            step_masks = build_masks(inputs, nd, self.block_size, window, not self.native_decode)
            if self.device.type != "cpu":
                step_masks = StepMasks(
                    None
                    if step_masks.decode_bias is None
                    else step_masks.decode_bias.to(self.device),
                    [None if m is None else m.to(self.device) for m in step_masks.prefill_masks],
                )
            masks[window] = step_masks
        meta = AttentionMetadata(
            kv_caches=self.kv_cache.layers,
            slot_mapping=self._to_device(inputs.slots),
            num_decodes=nd,
            decode_block_tables=decode_tables,
            decode_context_lens=decode_lens,
            native_decode=self.native_decode,
            prefills=prefills,
            masks=masks,
        )
        return inputs, meta

    @torch.inference_mode()
    def execute(
        self,
        batch: ScheduledBatch,
        sample_rows: list[int],
        extra_positions: np.ndarray | None = None,
    ) -> torch.Tensor:
        """Logits [len(sample_rows), vocab] at the last token of each sequence in `sample_rows`,
        then one row per `extra_positions` entry (indices into the step's flat tokens; prompt
        logprobs), all from the same forward pass."""
        with record_function("continuum.prepare"):
            self.kv_cache.copy_blocks(batch.block_copies)
            inputs, meta = self.prepare(batch)
            last_token = inputs.offsets + inputs.lengths - 1
            positions = last_token[np.asarray(sample_rows, dtype=np.int64)]
            if extra_positions is not None and len(extra_positions):
                positions = np.concatenate([positions, extra_positions.astype(np.int64)])
            keep = self._to_device(positions)
        with record_function("continuum.forward"):
            output = self.model(
                input_ids=self._to_device(inputs.input_ids)[None],
                position_ids=self._to_device(inputs.positions)[None],
                use_cache=False,
                logits_to_keep=keep,
                paged_metadata=meta,
            )
        return output.logits[0]
