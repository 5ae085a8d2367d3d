"""Turns a scheduled batch into one forward pass over the flat ragged batch and returns logits.

Step inputs are built with numpy over whole arrays (`replicas.step_inputs`), the attention
metadata once per step for every layer (`replicas.attention_backends`), and logits only for the
last token of each sequence that samples (`logits_to_keep`), plus the prompt positions of
requests that asked for prompt logprobs. On CUDA, decode-only steps replay a captured graph
(`replicas.cuda_graphs`) when one was captured.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.profiler import record_function

from replicas.attention_backends import (
    AttentionBackend,
    AttentionMetadata,
    build_attention_metadata,
)
from replicas.cuda_graphs import DecodeGraphs
from replicas.kv_cache import PagedKVCache
from replicas.step_inputs import StepInputs, build_step_inputs
from scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


class ModelRunner:
    """Runs the model over scheduled batches, reading and writing the paged KV cache."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: PagedKVCache,
        device: torch.device,
        backend: AttentionBackend,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.backend = backend
        self.block_size = kv_cache.block_size
        self.graphs: DecodeGraphs | None = None
        self.last_step_kind = ""  # "graph", "decode" or "mixed": what the last execute ran

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """From now on, decode-only steps of up to `max_num_seqs` sequences replay CUDA graphs."""
        graphs = DecodeGraphs(
            self.model, self.kv_cache, self.backend, max_num_seqs, max_model_len, self.device
        )
        try:
            graphs.capture()
        except Exception:  # e.g. a model whose forward syncs with the host: run it eagerly
            logger.warning("capturing decode CUDA graphs failed; decoding eagerly", exc_info=True)
            torch.cuda.synchronize(self.device)
            return
        self.graphs = graphs

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def prepare(self, batch: ScheduledBatch) -> tuple[StepInputs, AttentionMetadata]:
        inputs = build_step_inputs(batch, self.block_size)
        meta = build_attention_metadata(
            inputs, batch.num_decodes, self.kv_cache.layers, self.backend, self.device
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
        decode_only = batch.num_decodes == len(batch.seqs)
        if self.graphs is not None and extra_positions is None and self.graphs.can_run(batch):
            self.last_step_kind = "graph"
            with record_function("continuum.prepare"):
                self.kv_cache.copy_blocks(batch.block_copies)
                inputs = build_step_inputs(batch, self.block_size)
            with record_function("continuum.forward"):
                return self.graphs.run(inputs, sample_rows)
        self.last_step_kind = "decode" if decode_only else "mixed"
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
