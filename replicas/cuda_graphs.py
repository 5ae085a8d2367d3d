"""Decode-only steps replayed as CUDA graphs, one per batch-size bucket.

Small decode batches are bound by kernel launches (a few hundred a step); a graph replays them
all in one call. The graphs read static buffers sized for the largest bucket (graph b reads the
first b rows), are captured at start-up after a warm-up, largest first, in one shared memory pool,
and write their logits into one shared output buffer. Which bucket and how rows are padded is
decided in `replicas/graph_buckets.py`. Mixed steps (any prefill) run eagerly.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from replicas.attention_backends import AttentionBackend, AttentionMetadata
from replicas.graph_buckets import choose_bucket, graph_batch_sizes, pad_decode_step
from replicas.kv_cache import PagedKVCache
from replicas.step_inputs import StepInputs
from scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: PagedKVCache,
        backend: AttentionBackend,
        max_num_seqs: int,
        max_model_len: int,
        device: torch.device,
    ):
        if kv_cache.scratch_block is None:
            raise ValueError("decode graphs need a KV cache with a scratch block")
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.device = device
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.block_size = kv_cache.block_size
        self.table_width = -(-max_model_len // self.block_size)
        # An upper bound suits FlashAttention: sequences stop at their own seqused_k.
        self.max_seqlen_k = max_model_len
        rows = self.sizes[-1]

        def buffer(size, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(size, dtype=dtype, device=device)

        self.input_ids = buffer(rows, torch.int64)
        self.positions = buffer(rows, torch.int64)
        self.slot_mapping = buffer(rows, torch.int64)
        self.seqused_k = buffer(rows, torch.int32)
        self.cu_seqlens_k = buffer(rows + 1, torch.int32)
        self.block_table = buffer((rows, self.table_width), torch.int32)
        # One query per row, always; every row's logits are kept.
        self.cu_seqlens_q = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.logit_rows = torch.arange(rows, dtype=torch.int64, device=device)
        self.logits: torch.Tensor | None = None  # [rows, vocab], written by every graph
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0

    def can_run(self, batch: ScheduledBatch) -> bool:
        """A decode-only step that fits the largest graph and the static block table."""
        return (
            batch.num_decodes == len(batch.seqs)
            and len(batch.seqs) <= self.sizes[-1]
            and max(len(seq.block_table) for seq in batch.seqs) <= self.table_width
        )

    def load(self, inputs: StepInputs, bucket: int | None = None) -> int:
        """Copy a decode step into the static buffers, padded to `bucket` rows (default: the
        smallest graph that holds it); returns the bucket."""
        bucket = bucket or choose_bucket(len(inputs.lengths), self.sizes)
        if bucket is None:
            raise ValueError(f"{len(inputs.lengths)} sequences exceed the largest decode graph")
        padded = pad_decode_step(
            inputs, bucket, self.table_width, self.kv_cache.scratch_block, self.block_size
        )
        for static, host in (
            (self.input_ids, padded.input_ids),
            (self.positions, padded.positions),
            (self.slot_mapping, padded.slot_mapping),
            (self.seqused_k, padded.seqused_k),
            (self.cu_seqlens_k, padded.cu_seqlens_k),
            (self.block_table, padded.block_table),
        ):
            static[: len(host)].copy_(torch.from_numpy(host), non_blocking=True)
        return bucket

    def forward_padded(self, bucket: int) -> torch.Tensor:
        """The model over the first `bucket` rows of the static buffers (what a graph captures)
        -> logits [bucket, vocab]."""
        meta = AttentionMetadata(
            backend=self.backend,
            kv_caches=self.kv_cache.layers,
            slot_mapping=self.slot_mapping[:bucket],
            cu_seqlens_q=self.cu_seqlens_q[: bucket + 1],
            cu_seqlens_k=self.cu_seqlens_k[: bucket + 1],
            seqused_k=self.seqused_k[:bucket],
            max_seqlen_q=1,
            max_seqlen_k=self.max_seqlen_k,
            block_table=self.block_table[:bucket],
            num_decodes=bucket,
        )
        output = self.model(
            input_ids=self.input_ids[None, :bucket],
            position_ids=self.positions[None, :bucket],
            use_cache=False,
            logits_to_keep=self.logit_rows[:bucket],
            paged_metadata=meta,
        )
        return output.logits[0]

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture one graph per bucket, largest first, sharing one memory pool."""
        start = time.perf_counter()
        self.load(_empty_decode_step(), self.sizes[-1])  # every row a padded one while capturing
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.sizes):
            # Lazy initialisation (cuBLAS handles, kernel selection) must not happen in capture.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    logits = self.forward_padded(bucket)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self.logits is None:
                self.logits = torch.empty_like(logits)
            del logits
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                # Into the shared buffer, so each graph's own logits return to the pool.
                self.logits[:bucket].copy_(self.forward_padded(bucket))
            self.graphs[bucket] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %d-%d) in %.2f s",
            len(self.graphs),
            self.sizes[0],
            self.sizes[-1],
            self.capture_seconds,
        )

    def run(self, inputs: StepInputs, sample_rows: list[int]) -> torch.Tensor:
        """Logits [len(sample_rows), vocab] of a decode step: replayed if captured, else the
        same padded forward run eagerly."""
        bucket = self.load(inputs)
        graph = self.graphs.get(bucket)
        if graph is None:
            logits = self.forward_padded(bucket)
        else:
            graph.replay()
            logits = self.logits
        rows = torch.as_tensor(sample_rows, dtype=torch.int64).to(self.device, non_blocking=True)
        return logits.index_select(0, rows)  # a copy: the next replay overwrites the buffer


def _empty_decode_step() -> StepInputs:
    empty = np.zeros(0, np.int64)
    return StepInputs(empty, empty, empty, np.zeros((0, 0), np.int64), empty, empty, empty)
