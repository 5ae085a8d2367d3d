"""Sampling parameters and stop conditions, on the real model where behaviour depends on it."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pydantic import ValidationError

from replicas import LLM, SamplingParams
from replicas.sampler import Sampler, SamplingRow, apply_penalties, apply_top_k_top_p

CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def greedy(llm):
    return llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]


def run(llm, **params):
    return llm.chat(CHAT, SamplingParams(**params), use_tqdm=False)[0]


@pytest.mark.real_model
def test_same_seed_same_text_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=30)
    alone = llm.chat(CHAT, params, use_tqdm=False)[0]
    others = [[{"role": "user", "content": f"Count to {i}."}] for i in range(5)]
    batched = llm.chat(
        [*others, CHAT],
        [SamplingParams(temperature=1.0, max_tokens=20)] * 5 + [params],
        use_tqdm=False,
    )
    assert batched[-1].token_ids == alone.token_ids, "a seeded request depends on its batch"
    other_seed = llm.chat(CHAT, params.model_copy(update={"seed": 99}), use_tqdm=False)[0]
    assert other_seed.token_ids != alone.token_ids


@pytest.mark.real_model
def test_top_k_1_equals_greedy(llm, greedy):
    assert run(llm, temperature=1.0, top_k=1, max_tokens=40).token_ids == greedy.token_ids


@pytest.mark.real_model
def test_stop_string_is_cut_from_the_text(llm, greedy):
    text = greedy.text
    stop = text[len(text) // 2 : len(text) // 2 + 5]
    out = run(llm, temperature=0, max_tokens=40, stop=[stop])
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    kept = run(llm, temperature=0, max_tokens=40, stop=[stop], include_stop_str_in_output=True)
    assert kept.text == text[: text.index(stop) + len(stop)]


@pytest.mark.real_model
def test_stop_token_id_and_length(llm, greedy):
    token = greedy.token_ids[5]
    out = run(llm, temperature=0, max_tokens=40, stop_token_ids=[token])
    assert out.token_ids == greedy.token_ids[: greedy.token_ids.index(token) + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == token
    short = run(llm, temperature=0, max_tokens=7)
    assert short.token_ids == greedy.token_ids[:7] and short.finish_reason == "length"


@pytest.mark.real_model
def test_min_tokens_holds_back_eos(llm):
    natural = llm.chat(
        [{"role": "user", "content": "Say hi."}],
        SamplingParams(temperature=0, max_tokens=60),
        use_tqdm=False,
    )[0]
    assert natural.finish_reason == "stop"
    n = len(natural.token_ids) + 5
    longer = llm.chat(
        [{"role": "user", "content": "Say hi."}],
        SamplingParams(temperature=0, max_tokens=60, min_tokens=n),
        use_tqdm=False,
    )[0]
    assert len(longer.token_ids) >= n
    assert llm.engine.eos_token_ids[0] not in longer.token_ids[: n - 1]


@pytest.mark.real_model
def test_logprobs_match_the_model_distribution(llm, greedy, smol_dir):
    from transformers import AutoModelForCausalLM

    out = run(llm, temperature=0, max_tokens=5, logprobs=3).outputs[0]
    assert len(out.logprobs) == 5
    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    ids = torch.tensor([greedy.prompt_token_ids + out.token_ids])
    with torch.no_grad():
        expected = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    start = len(greedy.prompt_token_ids) - 1
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert entry[token].rank == 1, "greedy picks the most likely token"
        assert math.isclose(
            entry[token].logprob, expected[start + step, token].item(), abs_tol=1e-3
        )
        top = sorted(entry.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == [1, 2, 3]
        assert all(a.logprob >= b.logprob for a, b in itertools.pairwise(top))
    assert math.isclose(
        out.cumulative_logprob,
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs, strict=True)),
        abs_tol=1e-4,
    )


@pytest.mark.real_model
def test_n_samples_fork_one_prefill(llm):
    out = run(llm, temperature=1.0, seed=7, n=3, max_tokens=15)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "n samples should differ"
    again = run(llm, temperature=1.0, seed=7, n=3, max_tokens=15)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    greedy_pair = run(llm, temperature=0, n=2, max_tokens=15)
    assert greedy_pair.outputs[0].token_ids == greedy_pair.outputs[1].token_ids
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_penalties_follow_hf_and_openai_definitions():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    row = SamplingRow(
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        None,
        token_ids=[0, 1, 2, 2],  # prompt [0, 1], output [2, 2]
        num_prompt_tokens=2,
    )
    apply_penalties(logits, [row])
    # token 0, 1: repetition only (prompt); token 2: repetition, presence and 2x frequency; 3: none.
    assert torch.allclose(logits, torch.tensor([[1.0, -4.0, 0.5 - 0.5 - 0.5, 0.5]]))


def test_top_k_and_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = apply_top_k_top_p(logits.clone(), torch.tensor([0]), torch.tensor([0.7]))
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    kept = apply_top_k_top_p(logits.clone(), torch.tensor([3]), torch.tensor([1.0]))
    assert torch.isfinite(kept).tolist() == [[True, True, True, False]]


def test_min_p_and_temperature_sampling_distribution():
    """With min_p, tokens below min_p * max never appear; the rest follow softmax(logits / T)."""
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.09, 0.01]])).repeat(4000, 1)
    params = SamplingParams(temperature=1.0, min_p=0.2)
    rows = [SamplingRow(params, None, [1], 1) for _ in range(4000)]
    counts = torch.bincount(
        torch.tensor(Sampler(torch.Generator().manual_seed(0))(logits, rows).token_ids), minlength=4
    )
    assert counts[3] == 0 and counts[2] == 0, "tokens under min_p were sampled"
    assert abs(counts[0] / 4000 - 0.6667) < 0.03


def test_invalid_sampling_params_are_refused():
    for bad in [
        dict(temperature=-1),
        dict(top_p=0),
        dict(max_tokens=-1),
        dict(max_tokens=0, n=2),  # scoring a prompt is one stream
        dict(n=0),
        dict(logprobs=99),
        dict(stop=[""]),
    ]:
        with pytest.raises(ValidationError):
            SamplingParams(**bad)
