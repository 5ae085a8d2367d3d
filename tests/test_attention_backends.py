"""Every attention backend computes the varlen contract (replicas/attention_backends/base.py).

The reference backend is the specification, so it is checked against an independent dense
computation on random ragged batches (decodes and prefill chunks, GQA, sliding windows, block
tables out of order with unused blocks between them, NaN wherever nothing was written). The
other backends are checked against the reference; the CUDA kernel in tests/test_gpu.py.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ragged_batches import RaggedBatch, make_batch

from replicas.attention_backends import (
    CpuBackend,
    ReferenceBackend,
    VarlenBackend,
    build_attention_metadata,
    reference_varlen_attention,
    resolve_attention,
    select_backend,
)
from replicas.attention_backends import varlen as varlen_module
from replicas.config import EngineConfig
from replicas.kernels import load_cpu_kernels
from replicas.step_inputs import context_slots


def naive_attention(batch: RaggedBatch, scale: float) -> torch.Tensor:
    """Per sequence, dense float64 softmax attention over its K/V in position order."""
    outs = []
    heads = batch.query.shape[1]
    for i, (k, v) in enumerate(zip(batch.logical_k, batch.logical_v, strict=True)):
        start, length = int(batch.inputs.starts[i]), int(batch.inputs.lengths[i])
        offset = int(batch.inputs.offsets[i])
        q = batch.query[offset : offset + length].double()  # [q, H, D]
        groups = heads // k.shape[1]
        k = k.double().repeat_interleave(groups, dim=1)  # [ctx, H, D]
        v = v.double().repeat_interleave(groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        for j in range(length):
            for key_pos in range(k.shape[0]):
                query_pos = start + j
                visible = key_pos <= query_pos and (
                    batch.window is None or query_pos - key_pos < batch.window
                )
                if not visible:
                    scores[:, j, key_pos] = -math.inf
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v))
    return torch.cat(outs).float()


@st.composite
def ragged_batches(draw, max_context: int = 40) -> RaggedBatch:
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    decodes = draw(st.lists(st.integers(1, max_context), max_size=4))
    prefills = draw(
        st.lists(
            st.integers(1, max_context).flatmap(lambda c: st.tuples(st.just(c), st.integers(1, c))),
            min_size=0 if decodes else 1,
            max_size=3,
        )
    )
    return make_batch(
        context_lens=decodes + [c for c, _ in prefills],
        query_lens=[1] * len(decodes) + [q for _, q in prefills],
        block_size=block_size,
        kv_heads=draw(st.sampled_from([1, 2])),
        groups=draw(st.sampled_from([1, 3])),
        head_dim=draw(st.sampled_from([8, 16])),
        window=draw(st.none() | st.integers(1, 12)),
        seed=draw(st.integers(0, 2**16)),
    )


def run_backend(backend, batch: RaggedBatch, scale: float) -> torch.Tensor:
    meta = build_attention_metadata(
        batch.inputs,
        batch.num_decodes,
        [(batch.k_cache, batch.v_cache)],
        backend,
        torch.device("cpu"),
    )
    return backend.forward(
        batch.query, batch.key, batch.value, batch.k_cache, batch.v_cache, meta, batch.window, scale
    )


@settings(max_examples=60, deadline=None)
@given(ragged_batches())
def test_reference_equals_naive_dense_attention(batch):
    scale = batch.query.shape[-1] ** -0.5
    got = run_backend(ReferenceBackend(), batch, scale)
    assert not got.isnan().any(), "the reference read a slot no token wrote"
    torch.testing.assert_close(got, naive_attention(batch, scale), atol=1e-5, rtol=1e-5)


def test_metadata_is_the_varlen_contract():
    batch = make_batch([5, 9, 7], [1, 4, 7], 4, 2, 1, 8, None, seed=0)
    meta = build_attention_metadata(
        batch.inputs, 1, [(batch.k_cache, batch.v_cache)], ReferenceBackend(), torch.device("cpu")
    )
    assert meta.cu_seqlens_q.tolist() == [0, 1, 5, 12]
    assert meta.seqused_k.tolist() == [5, 9, 7]
    assert meta.cu_seqlens_k.tolist() == [0, 5, 14, 21]
    assert (meta.max_seqlen_q, meta.max_seqlen_k) == (7, 9)
    for name in ("cu_seqlens_q", "cu_seqlens_k", "seqused_k", "block_table"):
        assert getattr(meta, name).dtype == torch.int32, f"{name} must be int32 for the kernel"
    assert meta.block_table.tolist() == batch.inputs.tables.tolist()


def test_reference_rows_of_empty_sequences_are_zero_and_bad_lengths_raise():
    batch = make_batch([6], [1], 4, 1, 2, 8, None, seed=1)
    query = torch.cat([batch.query, torch.randn(2, 2, 8)])
    table = torch.tensor([batch.inputs.tables[0].tolist(), [0, 0]], dtype=torch.int32)
    args = (batch.k_cache, batch.v_cache, torch.tensor([0, 1, 2], dtype=torch.int32))
    out = reference_varlen_attention(query, *args, torch.tensor([6, 0]), table, 0.3)
    assert out[1:].eq(0).all(), "a sequence with seqused_k 0 must read nothing"
    three_queries = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="last tokens"):  # 3 queries cannot end a 2-token context
        reference_varlen_attention(
            query, batch.k_cache, batch.v_cache, three_queries, torch.tensor([2]), table, 0.3
        )


NO_KERNEL = pytest.mark.skipif(not load_cpu_kernels(), reason="no C++ compiler for the kernel")


@pytest.mark.parametrize(
    "native",
    [pytest.param(True, marks=NO_KERNEL, id="native_kernel"), pytest.param(False, id="torch")],
)
@settings(max_examples=30, deadline=None)
@given(batch=ragged_batches())
def test_cpu_backend_equals_reference(native, batch):
    scale = batch.query.shape[-1] ** -0.5
    backend = CpuBackend(batch.block_size, (batch.window,), native)
    if backend.reads_unwritten_slots:  # the torch decode path masks padding it reads
        batch.k_cache.nan_to_num_(0.0)
        batch.v_cache.nan_to_num_(0.0)
    expected = run_backend(ReferenceBackend(), batch, scale)
    torch.testing.assert_close(run_backend(backend, batch, scale), expected, atol=1e-5, rtol=1e-5)


def flash_varlen_semantics(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    scale,
    window_size,
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
):
    """torch's `varlen_attn` as documented (FlashAttention semantics), in plain torch: keys
    from a contiguous varlen batch or from pages; query j of a sequence sits at key position
    j + k_len - q_len and sees keys in [pos - left, pos + right] (-1: unbounded)."""
    assert isinstance(window_size, tuple), "varlen_attn recognises causal only as a tuple"
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32
    left, right = window_size
    out = torch.zeros_like(query)
    heads = query.shape[1]
    for i in range(len(cu_seq_q) - 1):
        q0, q1 = int(cu_seq_q[i]), int(cu_seq_q[i + 1])
        if block_table is not None:
            assert block_table.dtype == torch.int32 and seqused_k is not None
            k_len = int(seqused_k[i])
            pages = block_table[i].long()
            k = key[pages].flatten(0, 1)[:k_len]
            v = value[pages].flatten(0, 1)[:k_len]
        else:
            k0 = int(cu_seq_k[i])
            k_len = int(seqused_k[i]) if seqused_k is not None else int(cu_seq_k[i + 1]) - k0
            k, v = key[k0 : k0 + k_len], value[k0 : k0 + k_len]
        assert k_len <= max_k and q1 - q0 <= max_q
        groups = heads // k.shape[1]
        assert groups == 1 or enable_gqa, "GQA without enable_gqa is refused by varlen_attn"
        k = k.float().repeat_interleave(groups, dim=1)
        v = v.float().repeat_interleave(groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[q0:q1].float(), k) * scale
        pos = torch.arange(q1 - q0)[:, None] + k_len - (q1 - q0)
        key_pos = torch.arange(k_len)[None, :]
        visible = torch.ones_like(key_pos >= pos)
        if left >= 0:
            visible &= key_pos >= pos - left
        if right >= 0:
            visible &= key_pos <= pos + right
        scores = scores.masked_fill(~visible, -math.inf)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v).to(out.dtype)
    return out


@pytest.mark.parametrize("mode", ["paged", "gathered"])
@settings(max_examples=30, deadline=None)
@given(batch=ragged_batches())
def test_varlen_backend_passes_the_kernel_what_the_reference_computes(mode, batch):
    """The CUDA backend's arguments (window conversion, causal flag, gather index, int32
    metadata) through a CPU model of the kernel's documented semantics."""
    backend = VarlenBackend(mode, batch.block_size)
    backend._varlen_attn = flash_varlen_semantics
    scale = batch.query.shape[-1] ** -0.5
    got = run_backend(backend, batch, scale)
    torch.testing.assert_close(got, run_backend(ReferenceBackend(), batch, scale))


def test_context_slots_follow_the_block_tables():
    batch = make_batch([5, 3], [1, 3], 2, 1, 1, 8, None, seed=3)
    tables = batch.inputs.tables
    expected = [tables[i, p // 2] * 2 + p % 2 for i, n in enumerate([5, 3]) for p in range(n)]
    assert context_slots(batch.inputs, 2).tolist() == expected


def test_varlen_modes_follow_the_torch_api(monkeypatch):
    assert varlen_module.detect_varlen_modes()[0] == ["paged", "gathered"], "torch 2.13 pages"

    def old_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                        window_size=(-1, -1)):  # fmt: skip
        raise AssertionError("not called")

    import torch.nn.attention.varlen as torch_varlen

    monkeypatch.setattr(torch_varlen, "varlen_attn", old_varlen_attn)
    modes, why = varlen_module.detect_varlen_modes()
    assert modes == ["gathered"] and "block_table" in why

    def oldest_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
        raise AssertionError("not called")

    monkeypatch.setattr(torch_varlen, "varlen_attn", oldest_varlen_attn)
    assert varlen_module.detect_varlen_modes()[0] == []


def test_cuda_without_a_usable_kernel_falls_back_to_the_reference(caplog, tiny_dir):
    """Here no GPU runs FlashAttention, so every varlen mode fails its self-test: the engine
    must get the reference backend and a warning, never an exception."""
    from transformers import AutoConfig

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the kernel may be usable")
    model_config = AutoConfig.from_pretrained(tiny_dir)
    with caplog.at_level(logging.WARNING):
        backend, block_size = select_backend(
            EngineConfig(), torch.device("cuda"), torch.bfloat16, model_config
        )
    assert isinstance(backend, ReferenceBackend) and block_size == 256
    assert "unusable here" in caplog.text and "reference backend" in caplog.text


def test_block_size_defaults_and_the_varlen_rule():
    assert resolve_attention(EngineConfig(), torch.device("cpu")) == ("cpu", 16)
    assert resolve_attention(EngineConfig(), torch.device("cuda")) == ("varlen", 256)
    assert resolve_attention(EngineConfig(block_size=512), torch.device("cuda"))[1] == 512
    config = EngineConfig(attention_backend="reference", block_size=16)
    assert resolve_attention(config, torch.device("cuda")) == ("reference", 16)
    with pytest.raises(ValueError, match=r"block_size 16 .* multiple of 256"):
        resolve_attention(EngineConfig(block_size=16), torch.device("cuda"))
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(attention_backend="varlen", block_size=16)
    with pytest.raises(ValueError, match="CUDA only"):
        resolve_attention(EngineConfig(attention_backend="varlen"), torch.device("cpu"))
