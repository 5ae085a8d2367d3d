"""Attention backends behind one interface, chosen once per engine from the config and device.

| backend | device | how |
|---|---|---|
| `cpu` | CPU (runs anywhere) | native paged decode kernel + SDPA per prefill chunk |
| `varlen` | CUDA | one FlashAttention call per layer over the paged cache |
| `reference` | any | the contract in plain torch, one sequence at a time (the spec) |

Every backend receives the same `AttentionMetadata` (base.py); `replicas/attention.py` is the
one entry point transformers calls, and it hands each layer to the step's backend.
"""

from __future__ import annotations

import logging

import torch

from replicas.attention_backends.base import (
    AttentionBackend,
    AttentionMetadata,
    attention_windows,
    build_attention_metadata,
)
from replicas.attention_backends.cpu import CpuBackend
from replicas.attention_backends.reference import ReferenceBackend, reference_varlen_attention
from replicas.attention_backends.varlen import VarlenBackend, detect_varlen_modes
from replicas.config import DEFAULT_BLOCK_SIZE, EngineConfig, check_varlen_block_size
from replicas.kernels import load_cpu_kernels

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "CpuBackend",
    "ReferenceBackend",
    "VarlenBackend",
    "attention_windows",
    "build_attention_metadata",
    "reference_varlen_attention",
    "resolve_attention",
    "select_backend",
]


def resolve_attention(config: EngineConfig, device: torch.device) -> tuple[str, int]:
    """The backend name (`auto` resolved by device) and the KV block size it will run with."""
    name = config.attention_backend
    if name == "auto":
        name = "varlen" if device.type == "cuda" else "cpu"
    if name == "varlen" and device.type != "cuda":
        raise ValueError(f"attention_backend varlen runs on CUDA only, not on {device}")
    block_size = config.block_size or DEFAULT_BLOCK_SIZE.get(device.type, DEFAULT_BLOCK_SIZE["cpu"])
    if name == "varlen":
        check_varlen_block_size(block_size)
    return name, block_size


def select_backend(
    config: EngineConfig, device: torch.device, dtype: torch.dtype, model_config
) -> tuple[AttentionBackend, int]:
    """The engine's attention backend and KV block size; falls back (with a warning) where the
    device or torch version lacks what the chosen backend needs."""
    name, block_size = resolve_attention(config, device)
    windows = attention_windows(model_config)
    if name == "cpu":
        native = config.native_kernels and device.type == "cpu" and load_cpu_kernels()
        return CpuBackend(block_size, windows, native), block_size
    if name == "reference":
        return ReferenceBackend(), block_size
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    modes, limitation = detect_varlen_modes()
    if limitation:
        logger.warning("varlen attention: %s", limitation)
    for mode in modes:
        backend = VarlenBackend(mode, block_size)
        problem = backend.self_test(heads, kv_heads, head_dim, dtype, windows, device)
        if problem is None:
            logger.info("attention: %s with %d-token blocks", backend.label, block_size)
            return backend, block_size
        logger.warning("varlen attention (%s) unusable here: %s", mode, problem)
    logger.warning(
        "attention: no usable FlashAttention path in torch %s; using the reference backend "
        "(correct but slow)",
        torch.__version__,
    )
    return ReferenceBackend(), block_size
