"""The native CPU decode kernel computes the same attention as the torch path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replicas.attention_backends.cpu import batched_decode, build_masks
from replicas.kernels import load_cpu_kernels
from replicas.step_inputs import StepInputs

pytestmark = pytest.mark.skipif(
    not load_cpu_kernels(), reason="no C++ compiler for the native kernel"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 32])
@pytest.mark.parametrize("window", [None, 7])
def test_native_decode_equals_torch_decode(dtype, head_dim, window):
    gen = torch.Generator().manual_seed(0)
    blocks, block_size, kv_heads, heads, seqs = 40, 4, 2, 6, 5
    k_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    lens = np.array([1, 5, 17, 30, 9])
    width = -(-lens.max() // block_size)
    tables = torch.randperm(blocks, generator=gen)[: seqs * width].view(seqs, width).contiguous()
    query = torch.randn(seqs, heads, head_dim, generator=gen).to(dtype)
    inputs = StepInputs(
        input_ids=np.zeros(seqs, np.int64),
        positions=lens - 1,
        slots=np.zeros(seqs, np.int64),
        tables=tables.numpy(),
        starts=lens - 1,
        lengths=np.ones(seqs, np.int64),
        offsets=np.arange(seqs),
    )
    masks = build_masks(inputs, seqs, block_size, window, decode_bias=True)
    expected = batched_decode(query, k_cache, v_cache, tables, masks, head_dim**-0.5)
    native = torch.ops.continuum.paged_decode_attention(
        query, k_cache, v_cache, tables, torch.from_numpy(lens), head_dim**-0.5, window or 0
    )
    tolerance = 1e-5 if dtype is torch.float32 else 2e-2
    torch.testing.assert_close(native.float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_kernel_rejects_bad_inputs():
    cache = torch.zeros(4, 4, 2, 8)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.continuum.paged_decode_attention(
            torch.zeros(1, 4, 8),
            cache,
            cache,
            torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, dtype=torch.long),
            1.0,
            0,
        )
