"""What every attention backend receives: one metadata object per step, in the varlen contract.

The contract is FlashAttention's varlen one, so the CUDA kernel takes it as is and the reference
backend (which runs on CPU in the test suite) checks exactly what the kernel is given:

- sequence i owns query rows [cu_seqlens_q[i], cu_seqlens_q[i + 1]) of the flat batch;
- it attends to the first seqused_k[i] tokens of its cache, found through block_table[i]
  (int32, token p lives in block block_table[i][p // block_size] at offset p % block_size);
- its queries are the last tokens of those (causal, aligned bottom-right); a layer with a
  sliding window W lets the query at position p read positions (p - W, p];
- seqused_k[i] == 0 means the rows read nothing and come out as zeros (padded graph rows).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from replicas.step_inputs import StepInputs


@dataclass
class AttentionMetadata:
    """Where a step's tokens write their K/V and which cached tokens each of them reads."""

    backend: AttentionBackend
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor  # [T] int64 cache slot each token's K/V is written to
    cu_seqlens_q: torch.Tensor  # [S + 1] int32
    cu_seqlens_k: torch.Tensor  # [S + 1] int32, cumulative seqused_k
    seqused_k: torch.Tensor  # [S] int32 tokens each sequence attends to, this step's included
    max_seqlen_q: int  # an upper bound is allowed (CUDA graphs use one)
    max_seqlen_k: int
    block_table: torch.Tensor  # [S, max_blocks] int32; entries past a sequence's blocks unused
    num_decodes: int  # the first num_decodes sequences feed one token each
    backend_state: Any = None  # what the backend's `prepare` built for this step


class AttentionBackend(ABC):
    """Computes each layer's attention for a step's flat ragged batch over the paged cache."""

    name: str
    # Runs inside a captured CUDA graph: no host syncs, every per-step input a device tensor.
    graph_safe: bool = False
    # Reads (masked) cache slots that no token wrote, so the cache must start zeroed.
    reads_unwritten_slots: bool = False

    @property
    def label(self) -> str:
        """The backend as logs and reports name it."""
        return self.name

    def prepare(self, inputs: StepInputs, num_decodes: int, device: torch.device) -> Any:
        """Per-step host work (masks, gather indices), once per step rather than per layer."""
        return None

    @abstractmethod
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
        """query [T, H, D]; key/value [T, Hkv, D], this step's (already written to the cache)
        -> [T, H, D]."""


def build_attention_metadata(
    inputs: StepInputs,
    num_decodes: int,
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    backend: AttentionBackend,
    device: torch.device,
) -> AttentionMetadata:
    """The step's varlen metadata, from host arrays, moved to `device` once."""
    used = inputs.context_lens
    cu_q = np.zeros(len(used) + 1, dtype=np.int32)
    np.cumsum(inputs.lengths, out=cu_q[1:])
    cu_k = np.zeros(len(used) + 1, dtype=np.int32)
    np.cumsum(used, out=cu_k[1:])

    def to_device(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device, non_blocking=True)

    return AttentionMetadata(
        backend=backend,
        kv_caches=kv_caches,
        slot_mapping=to_device(inputs.slots),
        cu_seqlens_q=to_device(cu_q),
        cu_seqlens_k=to_device(cu_k),
        seqused_k=to_device(used.astype(np.int32)),
        max_seqlen_q=int(inputs.lengths.max()),
        max_seqlen_k=int(used.max()),
        block_table=to_device(inputs.tables.astype(np.int32)),
        num_decodes=num_decodes,
        backend_state=backend.prepare(inputs, num_decodes, device),
    )


def attention_windows(model_config) -> tuple[int | None, ...]:
    """The sliding windows a model's layers use (None: full attention)."""
    window = getattr(model_config, "sliding_window", None)
    uses_window = window is not None and (
        getattr(model_config, "use_sliding_window", True)
        or "sliding_attention" in (getattr(model_config, "layer_types", None) or ())
    )
    return (None, window) if uses_window else (None,)
