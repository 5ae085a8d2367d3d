"""Prompt logprobs (how evaluation harnesses score text): every prompt token's logprob equals HF's
own log-softmax of the same tokens, however the prefill is chunked, cached or preempted."""

from __future__ import annotations

import random

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from replicas import LLM, SamplingParams
from replicas.engine import LLMEngine
from replicas.output_processor import OutputProcessor
from replicas.outputs import merge_deltas
from replicas.sampling_params import OutputKind

TOLERANCE = 1e-4


def hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """Row j: log-softmax of the logits after token j (float32)."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def check_prompt_logprobs(output, model, num_top: int, decode) -> None:
    prompt = output.prompt_token_ids
    entries = output.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt), "one entry per prompt token"
    assert entries[0] is None, "the first prompt token has no logprob"
    expected = hf_logprobs(model, prompt)
    for j in range(1, len(prompt)):
        row, token, entry = expected[j - 1], prompt[j], entries[j]
        got = entry[token]
        want = row[token].item()
        assert abs(got.logprob - want) < TOLERANCE, f"token {j}: {got.logprob} vs HF {want}"
        # The rank is HF's, up to values within the tolerance of the token's own.
        assert (row > want + TOLERANCE).sum() + 1 <= got.rank <= (row > want - TOLERANCE).sum() + 1
        top = sorted(
            (lp for tid, lp in entry.items() if tid != token or lp.rank <= num_top),
            key=lambda lp: lp.rank,
        )
        assert [lp.rank for lp in top][:num_top] == list(range(1, num_top + 1))
        for tid, lp in entry.items():
            assert abs(lp.logprob - row[tid].item()) < TOLERANCE
            assert lp.decoded_token == decode(tid), "offline outputs carry each token's text"
        if num_top:
            assert abs(top[0].logprob - row.max().item()) < TOLERANCE


def decode_with(llm):
    return lambda token_id: llm.get_tokenizer().decode([token_id])


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def prompts(seed: int, n: int, shared_len: int = 21) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randint(3, 49000) for _ in range(shared_len)]
    return [shared + [rng.randint(3, 49000) for _ in range(rng.randint(2, 15))] for _ in range(n)]


def test_equal_hf_with_chunked_prefill_and_prefix_caching(tiny_dir, tiny_model):
    llm = LLM(
        str(tiny_dir),
        dtype="float32",
        block_size=4,
        max_num_batched_tokens=8,  # every prompt is prefilled in several chunks
        max_num_seqs=4,
        enable_prefix_caching=True,
    )
    first, second, third = prompts(seed=0, n=3)
    generate = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    warm = llm.generate(first, generate, use_tqdm=False)[0]  # caches the shared prefix
    mixed = llm.generate(
        [second, first, third],
        [
            SamplingParams(max_tokens=0, prompt_logprobs=3),
            generate,
            SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=0, ignore_eos=True),
        ],
        use_tqdm=False,
    )
    scored, regenerated, both = mixed
    assert regenerated.num_cached_tokens > 0, "the shared prefix should come from the cache"
    assert scored.num_cached_tokens == 0 and both.num_cached_tokens == 0
    assert regenerated.token_ids == warm.token_ids, "scoring rows changed a neighbour"
    assert regenerated.prompt_logprobs is None
    check_prompt_logprobs(scored, tiny_model, 3, decode_with(llm))
    check_prompt_logprobs(both, tiny_model, 0, decode_with(llm))
    assert scored.token_ids == [] and scored.text == "" and scored.finish_reason == "length"
    assert len(both.token_ids) == 5
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "leaked blocks"


def test_preempted_prefills_still_return_every_prompt_logprob(tiny_dir, tiny_model):
    llm = LLM(
        str(tiny_dir),
        dtype="float32",
        block_size=4,
        num_blocks=20,
        max_num_batched_tokens=12,
        max_num_seqs=4,
    )
    work = prompts(seed=1, n=4, shared_len=30)
    params = SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=1, ignore_eos=True)
    outputs = llm.generate(work, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0, "the config did not force preemption"
    for output in outputs:
        check_prompt_logprobs(output, tiny_model, 1, decode_with(llm))
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_streams_carry_prompt_logprobs_once(tiny_dir):
    """The engine sends them once, as ids and floats; the output processor adds the text and
    puts them in a stream's first delta only."""
    engine = LLMEngine(model=str(tiny_dir), dtype="float32", block_size=4)
    processor = OutputProcessor(engine.tokenizer)
    params = SamplingParams(
        temperature=0, max_tokens=3, prompt_logprobs=2, output_kind=OutputKind.DELTA
    )
    engine.add_request("r", [5, 6, 7, 8, 9], params)
    processor.add_request("r", [5, 6, 7, 8, 9], params)
    engine_outputs, deltas = [], []
    while engine.has_unfinished_requests():
        step = engine.step()
        engine_outputs += step
        deltas += processor.process(step).request_outputs
    assert len(engine_outputs[0].prompt_logprobs) == 4, "one per prompt token after the first"
    assert all(o.prompt_logprobs is None for o in engine_outputs[1:])
    assert len(deltas) == 3
    assert len(deltas[0].prompt_logprobs) == 5 and deltas[0].prompt_logprobs[0] is None
    assert deltas[0].prompt_logprobs[1][6].decoded_token == engine.tokenizer.decode([6])
    assert all(d.prompt_logprobs is None for d in deltas[1:])
    first = deltas[0].prompt_logprobs
    assert merge_deltas(deltas[0], deltas[1]).prompt_logprobs == first


def test_scoring_only_needs_one_stream():
    with pytest.raises(ValidationError):
        SamplingParams(max_tokens=0, n=2)
    with pytest.raises(ValidationError):
        SamplingParams(prompt_logprobs=21)
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0


@pytest.mark.real_model
def test_smollm2_prompt_logprobs_equal_hf(smol_dir):
    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    llm = LLM(dtype="float32", max_num_batched_tokens=32)
    tokenizer = llm.get_tokenizer()
    texts = [
        "The capital of France is Paris. The capital of Germany is Berlin.",
        "The capital of France is Paris. The capital of Italy is Rome, a city with a long past.",
    ]
    outputs = llm.generate(
        [tokenizer.encode(t) for t in texts],
        SamplingParams(max_tokens=1, prompt_logprobs=2, temperature=0),
        use_tqdm=False,
    )
    for output in outputs:
        check_prompt_logprobs(output, model, 2, decode_with(llm))
