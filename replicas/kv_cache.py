"""The paged KV tensors: per layer, K and V of [num_blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DEFAULT_CPU_CACHE_GIB = 2.0


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_model_config(cls, config, dtype: torch.dtype) -> KVCacheShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, dtype)

    def bytes_per_block(self, block_size: int) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element


@dataclass(frozen=True)
class CudaMemoryProfile:
    """Device memory (bytes) measured around a forward pass at the full token budget."""

    total: int
    free: int  # after the forward, with torch's cache emptied
    reserved: int  # what torch's allocator still holds then (the weights, mostly)
    peak_allocated: int  # torch's peak during the forward: weights and activations

    @property
    def non_torch(self) -> int:
        """Used memory torch's allocator does not hold: CUDA context, library workspaces."""
        return max(self.total - self.free - self.reserved, 0)

    def kv_budget(self, utilization: float) -> float:
        """What the KV cache may take so the replica stays under `utilization` of the device."""
        return utilization * self.total - self.peak_allocated - self.non_torch


def profile_cuda_memory(run: Callable[[], object], device: torch.device) -> CudaMemoryProfile:
    """Run `run` (which must free what it allocates) and measure its peak, as vLLM does."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return CudaMemoryProfile(total, free, torch.cuda.memory_reserved(device), peak)


def kv_cache_budget(
    device: torch.device,
    memory_gib: float | None,
    gpu_memory_utilization: float,
    profile: CudaMemoryProfile | None,
) -> float:
    """Bytes for the KV cache: `memory_gib` if set; on CUDA what `gpu_memory_utilization` of the
    device leaves after the profiled peak; on CPU a fixed default."""
    if memory_gib is not None:
        return memory_gib * 2**30
    if device.type == "cuda":
        if profile is None:
            raise ValueError("sizing the KV cache on CUDA needs a memory profile")
        budget = profile.kv_budget(gpu_memory_utilization)
        logger.info(
            "KV budget %.2f GiB = %.2f x %.2f GiB - peak %.2f GiB (weights + activations at the "
            "token budget) - %.2f GiB outside torch",
            budget / 2**30,
            gpu_memory_utilization,
            profile.total / 2**30,
            profile.peak_allocated / 2**30,
            profile.non_torch / 2**30,
        )
        return budget
    return DEFAULT_CPU_CACHE_GIB * 2**30


def num_blocks_for_budget(shape: KVCacheShape, block_size: int, budget: float) -> int:
    """Blocks of `block_size` tokens that fit `budget` bytes."""
    num_blocks = int(budget // shape.bytes_per_block(block_size))
    if num_blocks <= 0:
        raise RuntimeError(
            f"no memory left for the KV cache (budget {budget / 2**30:.2f} GiB); "
            "lower the model size "
            "or raise gpu_memory_utilization / kv_cache_memory_gib"
        )
    return num_blocks


class PagedKVCache:
    def __init__(
        self,
        shape: KVCacheShape,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        zeroed: bool = True,
        scratch_block: bool = False,
    ) -> None:
        """`zeroed`: required when attention reads padding slots (a NaN bit pattern there would
        poison the masked sum); without it, memory is only touched as blocks get used.
        `scratch_block`: one more block, past the `num_blocks` the block manager hands out, where
        the padded rows of a CUDA-graph step write their K/V."""
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks if scratch_block else None
        dims = (num_blocks + scratch_block, block_size, shape.num_kv_heads, shape.head_dim)
        alloc = torch.zeros if zeroed else torch.empty
        self.layers = [
            (
                alloc(dims, dtype=shape.dtype, device=device),
                alloc(dims, dtype=shape.dtype, device=device),
            )
            for _ in range(shape.num_layers)
        ]
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB)",
            num_blocks,
            block_size,
            num_blocks * block_size,
            num_blocks * shape.bytes_per_block(block_size) / 2**30,
        )

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Run copy-on-write block copies (src -> dst) in every layer."""
        if not copies:
            return
        device = self.layers[0][0].device
        src = torch.tensor([s for s, _ in copies], device=device)
        dst = torch.tensor([d for _, d in copies], device=device)
        for k_cache, v_cache in self.layers:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))
