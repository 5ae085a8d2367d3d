"""The product's promise: batching never changes a request's tokens.

With many concurrent requests of different lengths, every request's greedy tokens equal
`model.generate` run on that request alone (float32), however the engine batches, chunks, caches
or preempts. The tiny-model tests run with the CPU backend and with the reference backend, the
specification of the varlen metadata the CUDA kernel receives.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from replicas import LLM, SamplingParams

# Engine settings that force each mechanism; block_size is small so requests span many blocks.
TINY_CONFIGS = {
    "default": dict(block_size=4),
    "chunked_prefill": dict(block_size=4, max_num_batched_tokens=8, max_num_seqs=8),
    "prefix_caching_off": dict(
        block_size=4, max_num_batched_tokens=16, max_num_seqs=4, enable_prefix_caching=False
    ),
    "prefix_caching_on": dict(
        block_size=4, max_num_batched_tokens=16, max_num_seqs=4, enable_prefix_caching=True
    ),
    "preemption": dict(block_size=4, num_blocks=24, max_num_batched_tokens=32, max_num_seqs=8),
}


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def tiny_workload(seed: int = 0, n: int = 10) -> list[tuple[list[int], int]]:
    """Prompts of 3-40 tokens (half share a 9-token prefix) with 4-30 output tokens each."""
    rng = random.Random(seed)
    shared = [rng.randint(3, 49000) for _ in range(9)]
    work = []
    for i in range(n):
        tail = [rng.randint(3, 49000) for _ in range(rng.randint(3, 31))]
        work.append(((shared if i % 2 else []) + tail, rng.randint(4, 30)))
    return work


@pytest.fixture(scope="module")
def tiny_reference(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    work = tiny_workload()
    return work, [hf_greedy(model, p, m) for p, m in work]


BACKENDS = ["cpu", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_greedy_equals_hf_generate_alone(tiny_dir, tiny_reference, name, backend):
    work, expected = tiny_reference
    llm = LLM(str(tiny_dir), dtype="float32", attention_backend=backend, **TINY_CONFIGS[name])
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in work]
    outputs = llm.generate([p for p, _ in work], params, use_tqdm=False)
    for i, (output, reference) in enumerate(zip(outputs, expected, strict=True)):
        assert output.token_ids == reference, (
            f"request {i} ({name}, {backend} backend) diverged from model.generate"
        )
        assert output.finish_reason == "length"
    engine = llm.engine
    if name == "preemption":
        assert engine.scheduler.num_preemptions > 0, "the config did not force preemption"
    if name == "prefix_caching_on":
        assert engine.block_manager.prefix_cache_hits > 0, "the config did not hit the prefix cache"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks, "leaked blocks"


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory, smol_dir):
    from conftest import build_tiny_model

    path = tmp_path_factory.mktemp("mistral")
    return build_tiny_model(path, smol_dir, "mistral", sliding_window=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window_model_equals_hf_generate(mistral_dir, backend):
    """A Mistral with a window shorter than its prompts: the paged path must apply the window."""
    model = AutoModelForCausalLM.from_pretrained(mistral_dir, dtype=torch.float32).eval()
    work = tiny_workload(seed=1, n=6)
    llm = LLM(
        str(mistral_dir),
        dtype="float32",
        attention_backend=backend,
        block_size=4,
        max_num_batched_tokens=12,
        max_num_seqs=6,
    )
    outputs = llm.generate(
        [p for p, _ in work],
        [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in work],
        use_tqdm=False,
    )
    for i, ((prompt, max_tokens), output) in enumerate(zip(work, outputs, strict=True)):
        assert output.token_ids == hf_greedy(model, prompt, max_tokens), (
            f"request {i} ({backend} backend) diverged"
        )


@pytest.mark.parametrize(
    "settings",
    [
        dict(attention_backend="cpu", native_kernels=True),
        dict(attention_backend="cpu", native_kernels=False),
        dict(attention_backend="reference"),
    ],
    ids=["native_kernel", "torch_decode", "reference"],
)
def test_changing_one_prompt_never_changes_another_output(tiny_dir, settings):
    work = tiny_workload(seed=2, n=8)
    llm = LLM(str(tiny_dir), dtype="float32", block_size=4, max_num_batched_tokens=24, **settings)
    # Sampled with per-request seeds: stricter than greedy, since any leak shifts the draws.
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=m, ignore_eos=True)
        for i, (_, m) in enumerate(work)
    ]
    before = llm.generate([p for p, _ in work], params, use_tqdm=False)
    changed = [p for p, _ in work]
    changed[3] = [7] * 37
    after = llm.generate(changed, params, use_tqdm=False)
    for i in range(len(work)):
        if i != 3:
            assert after[i].token_ids == before[i].token_ids, (
                f"request {i} changed with request 3's prompt"
            )
    assert after[3].token_ids != before[3].token_ids


# --- the real model ---------------------------------------------------------------------------

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child in two sentences.",
    "List three colors.",
    "What is 2+2?",
    "Tell me a joke about computers.",
    "Translate 'good morning' to Spanish.",
    "Why is the sky blue? Answer in detail, with the physics of scattering.",
]
MAX_TOKENS = [12, 40, 33, 20, 8, 50, 25, 45]

SMOL_CONFIGS = {
    "default": dict(),
    "chunked_prefill_prefix_caching": dict(max_num_batched_tokens=24, max_num_seqs=8),
    "prefix_caching_off": dict(
        max_num_batched_tokens=48, max_num_seqs=8, enable_prefix_caching=False
    ),
    "preemption": dict(num_blocks=10, max_num_batched_tokens=64, max_num_seqs=8),
}


def chat_prompts(tokenizer) -> list[list[int]]:
    """QUESTIONS as token ids through the model's chat template, as `LLM.chat` renders them."""
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def smol_reference(smol_dir):
    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    prompts = chat_prompts(tokenizer)
    return prompts, [hf_greedy(model, p, m) for p, m in zip(prompts, MAX_TOKENS, strict=True)]


@pytest.mark.real_model
@pytest.mark.parametrize("name", list(SMOL_CONFIGS))
def test_smollm2_greedy_equals_hf_generate_alone(smol_reference, name):
    prompts, expected = smol_reference
    llm = LLM(dtype="float32", **SMOL_CONFIGS[name])
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outputs = llm.chat(
        conversations,
        [SamplingParams(temperature=0, max_tokens=m) for m in MAX_TOKENS],
        use_tqdm=False,
    )
    for i, (output, reference) in enumerate(zip(outputs, expected, strict=True)):
        assert output.prompt_token_ids == prompts[i]
        assert output.token_ids == reference, f"request {i} ({name}) diverged from model.generate"
    engine = llm.engine
    if name == "preemption":
        assert engine.scheduler.num_preemptions > 0, "the config did not force preemption"
    if name == "chunked_prefill_prefix_caching":
        assert engine.block_manager.prefix_cache_hits > 0, "the shared system prompt was not reused"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.real_model
def test_smollm2_bf16_greedy_mostly_matches_hf_bf16(smol_dir):
    """bfloat16 sums in a different order in a batch than alone, so a near-tie can flip a token
    and the two greedy continuations part from there. Tolerance: every request agrees on its
    first 4 tokens, and on average on at least half of its tokens before they part."""
    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    prompts = chat_prompts(tokenizer)
    expected = [hf_greedy(model, p, m) for p, m in zip(prompts, MAX_TOKENS, strict=True)]
    llm = LLM(dtype="bfloat16", max_num_batched_tokens=64, max_num_seqs=8)
    outputs = llm.generate(
        prompts,
        [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS],
        use_tqdm=False,
    )
    agreed = [
        common_prefix(o.token_ids, e) / len(e) for o, e in zip(outputs, expected, strict=True)
    ]
    report = ", ".join(f"{a:.2f}" for a in agreed)
    print(f"bf16 greedy agreement with HF per request: {report}")
    for i, (o, e) in enumerate(zip(outputs, expected, strict=True)):
        assert common_prefix(o.token_ids, e) >= min(4, len(e)), (
            f"request {i} parted early: {report}"
        )
    assert sum(agreed) / len(agreed) >= 0.5, f"agreement per request: {report}"
