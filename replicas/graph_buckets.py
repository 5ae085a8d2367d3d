"""Which CUDA graph a decode step replays, and the step's inputs padded to that graph's size.

Pure bookkeeping (numpy, no CUDA), unit-tested on CPU; `replicas/cuda_graphs.py` captures and
replays. A padded row is a one-token sequence that writes its K/V into a reserved scratch block
(never in any block table) and reads nothing (seqused_k 0), so the real rows compute exactly what
they would alone.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import numpy as np

from replicas.step_inputs import StepInputs


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 below max_num_seqs, and max_num_seqs itself."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be positive, not {max_num_seqs}")
    sizes = {s for s in (1, 2, 4) if s < max_num_seqs} | set(range(8, max_num_seqs, 8))
    return sorted(sizes | {max_num_seqs})


def choose_bucket(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest graph size that holds `num_seqs` sequences (None: none does)."""
    i = bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


@dataclass
class PaddedDecode:
    """A decode step's inputs for a graph of `bucket` rows (the first rows are the real ones)."""

    input_ids: np.ndarray  # [bucket] int64
    positions: np.ndarray  # [bucket] int64
    slot_mapping: np.ndarray  # [bucket] int64
    seqused_k: np.ndarray  # [bucket] int32
    cu_seqlens_k: np.ndarray  # [bucket + 1] int32
    block_table: np.ndarray  # [bucket, table_width] int32

    @property
    def bucket(self) -> int:
        return len(self.input_ids)


def pad_decode_step(
    inputs: StepInputs, bucket: int, table_width: int, scratch_block: int, block_size: int
) -> PaddedDecode:
    """Pad a decode-only step to `bucket` rows: padded rows write to the scratch block's slots
    (one each, so no two collide while they fit) and read nothing; every block-table entry that
    is not a real sequence's is the scratch block, so nothing stale from an earlier step stays."""
    n = len(inputs.lengths)
    if not (inputs.lengths == 1).all():
        raise ValueError("only decode-only steps (one token per sequence) replay a graph")
    if n > bucket:
        raise ValueError(f"{n} sequences do not fit a graph of {bucket}")
    if inputs.tables.shape[1] > table_width:
        raise ValueError(
            f"a block table of {inputs.tables.shape[1]} blocks exceeds the graphs' {table_width}"
        )
    input_ids = np.zeros(bucket, np.int64)
    input_ids[:n] = inputs.input_ids
    positions = np.zeros(bucket, np.int64)
    positions[:n] = inputs.positions
    slot_mapping = scratch_block * block_size + np.arange(bucket, dtype=np.int64) % block_size
    slot_mapping[:n] = inputs.slots
    seqused_k = np.zeros(bucket, np.int32)
    seqused_k[:n] = inputs.context_lens
    cu_seqlens_k = np.zeros(bucket + 1, np.int32)
    np.cumsum(seqused_k, out=cu_seqlens_k[1:])
    block_table = np.full((bucket, table_width), scratch_block, np.int32)
    block_table[:n, : inputs.tables.shape[1]] = inputs.tables
    return PaddedDecode(input_ids, positions, slot_mapping, seqused_k, cu_seqlens_k, block_table)
