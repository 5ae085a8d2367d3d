"""Structured outputs: whatever the weights, a constrained output follows its grammar, and a
constraint changes nothing for the other requests in the batch.

The tiny random Llama is the hardest case: its distribution knows nothing of JSON, so every
structural token it emits is the grammar's doing.
"""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
from pydantic import ValidationError

from replicas import LLM, SamplingParams
from replicas.sampler import apply_token_bitmask, forbidden_by_shifts, forbidden_tokens
from replicas.sampling_params import StructuredOutputsParams
from replicas.structured_output import GrammarCompiler, GrammarError


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), dtype="float32", block_size=4, max_num_seqs=48)


def test_bitmask_unpacking_matches_llguidance():
    """Our two unpackings (numpy on the CPU, bit shifts on accelerators) against llguidance's
    reference; only the masked rows change."""
    import llguidance.numpy
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    vocab = 1000  # not a multiple of 32
    bitmask = rng.integers(-(2**31), 2**31, size=(3, 32), dtype=np.int32)
    logits = rng.standard_normal((5, vocab)).astype(np.float32)
    expected = logits[[1, 4]].copy()
    llguidance.numpy.apply_token_bitmask_inplace(expected, bitmask[:2])
    reference = np.isneginf(expected)
    mask = torch.from_numpy(bitmask[:2])
    assert (forbidden_tokens(mask, vocab, torch.device("cpu")).numpy() == reference).all()
    assert (forbidden_by_shifts(mask, vocab).numpy() == reference).all()
    applied = torch.from_numpy(logits.copy())
    apply_token_bitmask(applied, [1, 4], mask)
    assert torch.equal(torch.isneginf(applied[[1, 4]]), torch.from_numpy(reference))
    assert torch.equal(applied[[0, 2, 3]], torch.from_numpy(logits[[0, 2, 3]]))


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema drawn from the shapes applications send: objects with required and
    optional properties, arrays, enums, consts, bounded numbers, strings with lengths or
    patterns, booleans, nulls, anyOf, nested up to three levels."""
    leaves = ["integer", "number", "string", "pattern", "enum", "const", "boolean", "null"]
    kinds = leaves + (["object", "object", "array", "anyOf"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "object":
        names = rng.sample(["id", "name", "age", "tags", "ok", "score", "kind", "meta"], 3)
        props = {n: random_schema(rng, depth + 1) for n in names[: rng.randint(1, 3)]}
        return {
            "type": "object",
            "properties": props,
            "required": [n for n in props if rng.random() < 0.7],
            "additionalProperties": False,
        }
    if kind == "array":
        low = rng.randint(0, 2)
        return {
            "type": "array",
            "items": random_schema(rng, depth + 1),
            "minItems": low,
            "maxItems": low + rng.randint(0, 2),
        }
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1), random_schema(rng, depth + 1)]}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": -10.5, "maximum": 1e6}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 12)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice([r"^[a-z]{2,6}$", r"^\d{3}-\d{2}$"])}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", 7, 2.5, True, None, "blue sky"], 3)}
    if kind == "const":
        return {"const": rng.choice(["fixed", 42, False])}
    return {"type": kind}


def test_every_output_of_every_generated_schema_validates(llm):
    rng = random.Random(13)
    schemas = [
        {
            "type": "object",
            "properties": {f"p{i}": random_schema(rng, 1) for i in range(rng.randint(1, 4))},
            "required": ["p0"],
            "additionalProperties": False,
        }
        if k % 3
        else random_schema(rng)
        for k in range(48)
    ]
    params = [
        SamplingParams(
            temperature=0 if k % 4 == 0 else 1.0,
            seed=k,
            max_tokens=120,
            structured_outputs=StructuredOutputsParams(
                json=s if k % 2 else json.dumps(s), disable_any_whitespace=k % 5 != 0
            ),
        )
        for k, s in enumerate(schemas)
    ]
    outputs = llm.generate(["Answer in JSON:"] * len(schemas), params, use_tqdm=False)
    finished = 0
    for schema, out in zip(schemas, outputs, strict=True):
        if out.finish_reason == "length":
            continue
        assert out.finish_reason == "stop", out.finish_reason
        finished += 1
        try:
            jsonschema.validate(json.loads(out.text), schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            pytest.fail(f"output {out.text!r} does not follow {schema}: {exc}")
    assert finished >= len(schemas) * 3 // 4, f"only {finished} of {len(schemas)} finished"
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_json_object_regex_and_choice(llm):
    regex = r"(\d{3}-[a-z]{2,5}|none)"
    choices = ["yes", "no", "maybe not"]
    specs = [
        StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
        StructuredOutputsParams(regex=regex),
        StructuredOutputsParams(choice=choices),
    ]
    params = [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=80, structured_outputs=spec)
        for seed in range(6)
        for spec in specs
    ]
    outputs = llm.generate(["Hi"] * len(params), params, use_tqdm=False)
    for i, out in enumerate(outputs):
        kind = i % 3
        if kind == 0:
            if out.finish_reason == "stop":
                assert isinstance(json.loads(out.text), dict), out.text
        else:
            assert out.finish_reason == "stop", (out.text, out.finish_reason)
            if kind == 1:
                assert re.fullmatch(regex, out.text), out.text
            else:
                assert out.text in choices


def test_a_constraint_never_changes_its_neighbours(llm):
    """An unconstrained request decodes the same tokens alone and beside constrained ones."""
    free = [
        SamplingParams(temperature=0, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=5, max_tokens=25, ignore_eos=True),
    ]
    alone = llm.generate(["The weather", "Once upon"], free, use_tqdm=False)
    constrained = SamplingParams(
        temperature=0, max_tokens=25, structured_outputs=StructuredOutputsParams(regex="[0-9]+")
    )
    mixed = llm.generate(
        ["The weather", "Count:", "Once upon", "Count:"],
        [free[0], constrained, free[1], constrained],
        use_tqdm=False,
    )
    assert mixed[0].token_ids == alone[0].token_ids, "a constrained neighbour changed a greedy row"
    assert mixed[2].token_ids == alone[1].token_ids, "a constrained neighbour changed a seeded row"
    assert mixed[1].text.isdigit() and mixed[3].text == mixed[1].text


def test_seeded_sampling_under_a_grammar_repeats_in_any_batch(llm):
    spec = StructuredOutputsParams(json={"type": "array", "items": {"type": "integer"}})
    params = SamplingParams(temperature=1.0, seed=21, max_tokens=40, structured_outputs=spec)
    alone = llm.generate("List:", params, use_tqdm=False)[0]
    others = [SamplingParams(temperature=1.0, max_tokens=30, structured_outputs=spec)] * 3
    batched = llm.generate(
        ["a", "b", "List:", "c"], [*others[:2], params, others[2]], use_tqdm=False
    )
    assert batched[2].token_ids == alone.token_ids


def test_n_forks_copy_the_grammar_state(llm):
    spec = StructuredOutputsParams(
        json={
            "type": "object",
            "properties": {"v": {"type": "integer"}, "w": {"enum": ["a", "b", "c"]}},
            "required": ["v", "w"],
            "additionalProperties": False,
        },
        disable_any_whitespace=True,
    )
    out = llm.generate(
        "x", SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=60, structured_outputs=spec)
    )[0]
    texts = [c.text for c in out.outputs]
    for text, completion in zip(texts, out.outputs, strict=True):
        assert completion.finish_reason == "stop", text
        assert set(json.loads(text)) == {"v", "w"}
    assert len(set(texts)) > 1, "forks should sample differently"


def test_preemption_and_recompute_keep_the_grammar_in_step(tiny_dir, llm):
    """Under a cache too small for the batch, sequences are preempted and recomputed; each
    constrained output must equal the one from an engine that never preempts."""
    pattern = r"[a-z]{1,3}( [a-z]{1,3}){20,30}\."  # at least 21 tokens
    spec = StructuredOutputsParams(regex=pattern)
    params = [
        SamplingParams(temperature=0.8, seed=i, max_tokens=40, structured_outputs=spec)
        for i in range(6)
    ]
    prompts = [f"Word number {i} of the list:" for i in range(6)]
    expected = llm.generate(prompts, params, use_tqdm=False)
    small = LLM(
        str(tiny_dir),
        dtype="float32",
        block_size=4,
        num_blocks=24,
        max_num_batched_tokens=32,
        max_num_seqs=6,
    )
    outputs = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0, "the config did not force preemption"
    for out, ref in zip(outputs, expected, strict=True):
        assert out.token_ids == ref.token_ids
        assert out.finish_reason == ref.finish_reason
        if out.finish_reason == "stop":
            assert re.fullmatch(pattern, out.text), out.text
    bm = small.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_a_finished_grammar_stops_the_request_even_with_ignore_eos(llm):
    spec = StructuredOutputsParams(choice=["alpha", "beta"])
    out = llm.generate(
        "Pick:",
        SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, structured_outputs=spec),
    )[0]
    assert out.finish_reason == "stop" and out.text in ("alpha", "beta")


def test_stop_strings_and_max_tokens_still_end_constrained_requests(llm):
    spec = StructuredOutputsParams(regex="(ab){5,}c")
    cut = llm.generate(
        "x", SamplingParams(temperature=0, max_tokens=2, structured_outputs=spec), use_tqdm=False
    )[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 2
    stopped = llm.generate(
        "x",
        SamplingParams(temperature=0, max_tokens=50, stop=["ba"], structured_outputs=spec),
        use_tqdm=False,
    )[0]
    assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason == "ba"
    assert stopped.text == "a"


def test_constrained_logprobs_are_of_the_raw_distribution(llm):
    """A constrained request's logprobs are the model's own (before the mask): they equal the
    prompt logprobs of the same tokens, which no grammar touches."""
    spec = StructuredOutputsParams(regex="[0-9]{6}")
    out = llm.generate(
        "Number:",
        SamplingParams(temperature=0, max_tokens=10, logprobs=2, structured_outputs=spec),
        use_tqdm=False,
    )[0]
    tokens = out.token_ids
    scored = llm.generate(
        out.prompt_token_ids + tokens,
        SamplingParams(max_tokens=0, prompt_logprobs=0),
        use_tqdm=False,
    )[0]
    start = len(out.prompt_token_ids)
    for i, (token, entry) in enumerate(zip(tokens, out.outputs[0].logprobs, strict=True)):
        assert entry[token].logprob == pytest.approx(
            scored.prompt_logprobs[start + i][token].logprob, abs=1e-4
        )
    ranks = [
        entry[token].rank for token, entry in zip(tokens, out.outputs[0].logprobs, strict=True)
    ]
    assert max(ranks) > 1, "the random model would not pick digits unmasked: some ranks must be > 1"


def test_bad_specs_are_refused_with_llguidance_message(llm, tiny_dir):
    from transformers import AutoTokenizer

    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(tiny_dir))  # as the ingress has it
    bad = {
        "schema type": StructuredOutputsParams(json={"type": "no-such-type"}),
        "schema text": StructuredOutputsParams(json="{not json"),
        "regex": StructuredOutputsParams(regex="a(b"),
        "grammar": StructuredOutputsParams(grammar="start: undefined_rule"),
        "empty choice": StructuredOutputsParams(choice=["a", ""]),
    }
    for name, spec in bad.items():
        with pytest.raises(GrammarError) as info:
            compiler.compile(spec)
        assert str(info.value), f"{name}: no message"
    with pytest.raises(GrammarError, match="no-such-type"):
        compiler.compile(bad["schema type"])
    # The engine refuses the same specs at admission, holding nothing.
    with pytest.raises(GrammarError):
        llm.engine.add_request("bad", [1, 2], SamplingParams(structured_outputs=bad["regex"]))
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValidationError):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValidationError):
        StructuredOutputsParams()


def enum_object(num_properties: int) -> StructuredOutputsParams:
    """An object of `num_properties` enums of 300 values: heavy to build."""
    props = {f"k{i}": {"enum": [f"v{j}x{i}" for j in range(300)]} for i in range(num_properties)}
    return StructuredOutputsParams(json={"type": "object", "properties": props})


def test_a_grammar_too_slow_or_too_big_is_refused_in_bounded_time(tiny_dir):
    import time

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    # ~35 ms to build here: far over a 1 ms bound.
    impatient = GrammarCompiler(tokenizer, 49152, [2], timeout_s=0.001)
    start = time.monotonic()
    with pytest.raises(GrammarError, match="did not compile within"):
        impatient.compile(enum_object(60))
    assert time.monotonic() - start < 0.5
    # llguidance's own fuel bound stops a grammar whose lexer would be too big, whatever the time.
    with pytest.raises(GrammarError, match="too big"):
        GrammarCompiler(tokenizer, 49152, [2]).compile(enum_object(300))
