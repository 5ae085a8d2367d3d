"""CUDA-graph bookkeeping that needs no GPU: buckets, padding, static-buffer reuse, and a padded
decode step (what a graph replays) computing the same tokens as the eager path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicas import LLM, SamplingParams
from replicas.cuda_graphs import DecodeGraphs
from replicas.graph_buckets import choose_bucket, graph_batch_sizes, pad_decode_step
from replicas.kv_cache import PagedKVCache
from replicas.model_runner import ModelRunner
from replicas.step_inputs import StepInputs


def test_bucket_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(256) == [1, 2, 4, *range(8, 257, 8)]


@given(st.integers(1, 300), st.integers(1, 320))
def test_the_chosen_bucket_is_the_smallest_that_fits(max_num_seqs, num_seqs):
    sizes = graph_batch_sizes(max_num_seqs)
    bucket = choose_bucket(num_seqs, sizes)
    if num_seqs > max_num_seqs:
        assert bucket is None
    else:
        assert bucket >= num_seqs and all(s < num_seqs for s in sizes if s < bucket)


def decode_step(context_lens: list[int], block_size: int, seed: int = 0) -> StepInputs:
    rng = np.random.default_rng(seed)
    n = len(context_lens)
    width = max(-(-c // block_size) for c in context_lens)
    tables = rng.permutation(n * width).reshape(n, width).astype(np.int64)
    positions = np.array(context_lens) - 1
    slots = tables[np.arange(n), positions // block_size] * block_size + positions % block_size
    return StepInputs(
        input_ids=rng.integers(0, 100, n),
        positions=positions,
        slots=slots,
        tables=tables,
        starts=positions,
        lengths=np.ones(n, np.int64),
        offsets=np.arange(n),
    )


def test_padded_rows_write_to_the_scratch_block_and_read_nothing():
    step = decode_step([5, 9, 2], block_size=4)
    padded = pad_decode_step(step, bucket=8, table_width=6, scratch_block=50, block_size=4)
    assert padded.bucket == 8
    assert padded.input_ids[:3].tolist() == step.input_ids.tolist()
    assert padded.slot_mapping[:3].tolist() == step.slots.tolist()
    assert padded.seqused_k.tolist() == [5, 9, 2, 0, 0, 0, 0, 0]
    assert padded.cu_seqlens_k.tolist() == [0, 5, 14, 16, 16, 16, 16, 16, 16]
    scratch_slots = padded.slot_mapping[3:]
    assert (scratch_slots // 4 == 50).all() and len(set(scratch_slots % 4)) == 4
    assert (padded.block_table[3:] == 50).all()
    assert (padded.block_table[:3, :3] == step.tables).all()
    assert (padded.block_table[:3, 3:] == 50).all(), "unused entries must not keep stale blocks"
    assert padded.block_table.dtype == padded.seqused_k.dtype == np.int32


def test_padding_refuses_what_a_graph_cannot_run():
    step = decode_step([5, 9, 2], block_size=4)
    with pytest.raises(ValueError, match="do not fit"):
        pad_decode_step(step, bucket=2, table_width=6, scratch_block=50, block_size=4)
    with pytest.raises(ValueError, match="exceeds"):
        pad_decode_step(step, bucket=4, table_width=2, scratch_block=50, block_size=4)
    step.lengths[1] = 2
    with pytest.raises(ValueError, match="decode-only"):
        pad_decode_step(step, bucket=4, table_width=6, scratch_block=50, block_size=4)


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    return LLM(str(tiny_dir), dtype="float32", attention_backend="reference", block_size=4)


def with_decode_graphs(llm: LLM, max_num_seqs: int) -> DecodeGraphs:
    """Give an idle engine a cache with a scratch block and uncaptured decode graphs: on CPU
    `DecodeGraphs.run` executes the padded forward a graph would replay, eagerly."""
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    old = engine.runner.kv_cache
    kv_cache = PagedKVCache(
        old.shape, old.num_blocks, old.block_size, engine.device, scratch_block=True
    )
    engine.runner = ModelRunner(engine.model, kv_cache, engine.device, engine.attention)
    graphs = DecodeGraphs(
        engine.model, kv_cache, engine.attention, max_num_seqs, engine.max_model_len, engine.device
    )
    engine.runner.graphs = graphs
    return graphs


def test_static_buffers_are_reused_and_cleared_between_steps(tiny_llm):
    graphs = with_decode_graphs(tiny_llm, max_num_seqs=8)
    pointers = [t.data_ptr() for t in (graphs.input_ids, graphs.block_table, graphs.seqused_k)]
    assert graphs.load(decode_step([5, 9, 2, 7, 3, 3, 8], block_size=4)) == 8
    assert graphs.load(decode_step([6, 4, 11], block_size=4, seed=1)) == 4
    assert [t.data_ptr() for t in (graphs.input_ids, graphs.block_table, graphs.seqused_k)] == (
        pointers
    )
    assert graphs.seqused_k[:4].tolist() == [6, 4, 11, 0], "row 3 must be padding again"
    assert (graphs.block_table[3] == graphs.kv_cache.scratch_block).all()
    assert graphs.cu_seqlens_q[:5].tolist() == [0, 1, 2, 3, 4]


def test_padded_decode_steps_generate_what_the_eager_path_generates(tiny_llm, tiny_dir):
    """Every decode step below runs padded to its bucket (3 -> 4, 5 -> 8, ...); greedy tokens
    must equal the plain engine's, so padded rows neither disturbed nor leaked into real ones."""
    prompts = [[5 + i, 17, 300 + 7 * i] * (i + 1) for i in range(7)]
    params = [
        SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True) for i in range(7)
    ]
    eager = LLM(str(tiny_dir), dtype="float32", attention_backend="reference", block_size=4)
    expected = eager.generate(prompts, params, use_tqdm=False)
    with_decode_graphs(tiny_llm, max_num_seqs=8)
    kinds = []
    execute = tiny_llm.engine.runner.execute

    def recording_execute(batch, *args):
        logits = execute(batch, *args)
        kinds.append(tiny_llm.engine.runner.last_step_kind)
        return logits

    tiny_llm.engine.runner.execute = recording_execute
    outputs = tiny_llm.generate(prompts, params, use_tqdm=False)
    assert "graph" in kinds and "mixed" in kinds, kinds
    for i, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        assert got.token_ids == want.token_ids, f"request {i} changed when its decodes were padded"
    bm = tiny_llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert tiny_llm.engine.runner.kv_cache.scratch_block == bm.num_blocks, (
        "the scratch block must lie past every block the manager hands out"
    )


def test_capture_starts_from_all_rows_padded(tiny_llm):
    graphs = with_decode_graphs(tiny_llm, max_num_seqs=8)
    graphs.load(decode_step([5, 9, 2], block_size=4))
    empty = StepInputs(
        *(np.zeros(0, np.int64),) * 3, np.zeros((0, 0), np.int64), *(np.zeros(0, np.int64),) * 3
    )
    assert graphs.load(empty, bucket=8) == 8
    scratch = graphs.kv_cache.scratch_block
    assert graphs.seqused_k.tolist() == [0] * 8
    assert (graphs.slot_mapping // 4 == scratch).all(), "a padded row must write only scratch"
    assert (graphs.block_table == scratch).all()


def test_only_decode_steps_that_fit_replay_a_graph(tiny_llm):
    from scheduler import ScheduledBatch, Sequence

    graphs = with_decode_graphs(tiny_llm, max_num_seqs=4)

    def seq(blocks: int) -> Sequence:
        s = Sequence("s", [1, 2, 3], max_tokens=4)
        s.block_table = list(range(blocks))
        return s

    def batch(seqs, num_decodes=None) -> ScheduledBatch:
        n = len(seqs) if num_decodes is None else num_decodes
        return ScheduledBatch(seqs=seqs, num_tokens=[1] * len(seqs), num_decodes=n)

    assert graphs.can_run(batch([seq(1), seq(2)]))
    assert not graphs.can_run(batch([seq(1), seq(2)], num_decodes=1)), "a mixed step"
    assert not graphs.can_run(batch([seq(1)] * 5)), "more sequences than the largest graph"
    assert not graphs.can_run(batch([seq(graphs.table_width + 1)])), "a wider block table"
