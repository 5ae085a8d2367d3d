"""The paged KV tensors: per layer, K and V of [num_blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

import logging
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


def num_blocks_for_budget(
    shape: KVCacheShape,
    block_size: int,
    device: torch.device,
    memory_gib: float | None,
    gpu_memory_utilization: float,
) -> int:
    """Blocks that fit the budget. On CUDA without a budget: what `gpu_memory_utilization` of the
    device leaves after the model and a forward pass's peak (measured before this call)."""
    if memory_gib is None:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            used = total - free
            budget = gpu_memory_utilization * total - used
        else:
            budget = DEFAULT_CPU_CACHE_GIB * 2**30
    else:
        budget = memory_gib * 2**30
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
    ) -> None:
        """`zeroed`: required when attention reads padding slots (a NaN bit pattern there would
        poison the masked sum); without it, memory is only touched as blocks get used."""
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        dims = (num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
        alloc = torch.zeros if zeroed else torch.empty
        self.layers = [
            (
                alloc(dims, dtype=shape.dtype, device=device),
                alloc(dims, dtype=shape.dtype, device=device),
            )
            for _ in range(shape.num_layers)
        ]
        logger.info(
            "KV cache: %d blocks x %d tokens (%.2f GiB)",
            num_blocks,
            block_size,
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
