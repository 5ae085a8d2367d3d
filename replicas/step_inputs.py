"""A scheduled batch as flat host arrays: the one description of a step every backend reads.

Built with numpy over whole arrays (no Python loop per token). The batch is ragged and flat:
sequence i feeds rows [offsets[i], offsets[i] + lengths[i]) of the step, decodes first.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from scheduler import ScheduledBatch


@dataclass
class StepInputs:
    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T] cache slot (block * block_size + offset) each token writes
    tables: np.ndarray  # [S, max_blocks] block tables, zero-padded
    starts: np.ndarray  # [S] tokens already computed per sequence
    lengths: np.ndarray  # [S] tokens fed this step per sequence
    offsets: np.ndarray  # [S] first row of each sequence in the batch

    @property
    def context_lens(self) -> np.ndarray:
        """[S] tokens each sequence attends to: its cached tokens and this step's."""
        return self.starts + self.lengths


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


def context_slots(inputs: StepInputs, block_size: int, seqs: slice = slice(None)) -> np.ndarray:
    """Cache slots of every token the sequences in `seqs` attend to, sequence after sequence."""
    tables = inputs.tables[seqs]
    used = inputs.context_lens[seqs]
    rows = np.repeat(np.arange(len(used)), used)
    pos = np.arange(int(used.sum()), dtype=np.int64) - np.repeat(np.cumsum(used) - used, used)
    return tables[rows, pos // block_size] * block_size + pos % block_size
