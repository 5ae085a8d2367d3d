"""Benchmark tooling: seeded workloads, latency statistics, goodput, plots."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from cluster.bench_client import RequestResult, parse_goodput, per_request, summarize
from cluster.bench_plot import plot_results
from cluster.workloads import WORKLOADS, make_workload


@pytest.fixture(scope="module")
def tokenizer(smol_dir):
    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.mark.parametrize("kind", WORKLOADS)
def test_workloads_are_seeded_and_sized(tokenizer, kind):
    first = make_workload(tokenizer, kind, 20, (40, 300), (16, 64), seed=1)
    again = make_workload(tokenizer, kind, 20, (40, 300), (16, 64), seed=1)
    other = make_workload(tokenizer, kind, 20, (40, 300), (16, 64), seed=2)
    assert [r.prompt_token_ids for r in first] == [r.prompt_token_ids for r in again]
    assert [r.prompt_token_ids for r in first] != [r.prompt_token_ids for r in other]
    assert all(16 <= r.max_tokens <= 64 for r in first)
    for r in first:
        rendered = tokenizer.apply_chat_template(
            r.messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert list(rendered) == r.prompt_token_ids, "token ids must be the rendered messages"
        if kind != "documents":
            assert 20 <= len(r.prompt_token_ids) <= 330
    if kind == "shared-prefix":
        assert len({r.messages[0]["content"] for r in first}) == 1
    if kind == "documents":
        documents = [r.messages[0]["content"] for r in first]
        assert len(set(documents)) == 5 and documents[:5] * 4 == documents, "4 rounds of 5"
        for i, r in enumerate(first):
            earlier = first[i % 5].prompt_token_ids
            shared = r.repeated_prefix_tokens
            assert (shared == 0) == (i < 5), "only repeats resend a prefix"
            assert r.prompt_token_ids[:shared] == earlier[:shared]
            assert i < 5 or r.prompt_token_ids[shared] != earlier[shared]
            assert i < 5 or shared >= len(tokenizer(documents[i])["input_ids"])


def test_summary_statistics_and_goodput():
    results = [
        RequestResult(
            ok=True,
            prompt_tokens=10,
            output_tokens=11,
            ttft=0.1 * (i + 1),
            e2e=1.1 * (i + 1),
            itls=[0.1] * 10,
        )
        for i in range(10)
    ] + [RequestResult(ok=False, error="HTTP 500")]
    summary = summarize(results, wall=10.0, goodput=parse_goodput(["ttft:500", "tpot:150"]))
    assert summary["completed"] == 10 and summary["errors"] == 1
    assert summary["output_token_throughput"] == 11.0
    assert summary["ttft"]["p50_ms"] == pytest.approx(550.0)
    assert summary["tpot"]["mean_ms"] == pytest.approx(100 * 5.5)
    # ttft <= 500 ms: requests 1-5; tpot = (e2e - ttft) / 10 = 0.1 * (i + 1) <= 0.15: only 1.
    assert summary["goodput"]["met"] == 1
    with pytest.raises(ValueError):
        parse_goodput(["latency:5"])
    assert "repeats" not in summary, "only a workload that resends prefixes reports repeats"


def test_repeats_count_as_cached_when_the_server_served_their_prefix():
    first = RequestResult(ok=True, prompt_tokens=500, ttft=0.5, e2e=1.0)
    hit = RequestResult(ok=True, prompt_tokens=510, cached_tokens=496, ttft=0.05, e2e=0.5)
    miss = RequestResult(ok=True, prompt_tokens=510, cached_tokens=16, ttft=0.45, e2e=0.9)
    hit.repeated_prefix_tokens = miss.repeated_prefix_tokens = 500
    repeats = summarize([first, hit, miss], wall=1.0)["repeats"]
    assert repeats["requests"] == 2 and repeats["served_from_cache"] == 1
    assert repeats["ttft_repeats"]["p50_ms"] == pytest.approx(250.0)
    assert repeats["ttft_first_sends"]["p50_ms"] == pytest.approx(500.0)


def test_plot_from_result_files(tmp_path):
    files = []
    for rate in (1.0, 2.0):
        results = [RequestResult(ok=True, output_tokens=5, ttft=0.2, e2e=1.0) for _ in range(4)]
        report = {
            "server": "x",
            "request_rate": rate,
            "summary": summarize(results, 2.0),
            "per_request": per_request(results),
        }
        path = tmp_path / f"run{rate}.json"
        path.write_text(json.dumps(report))
        files.append(path)
    out = tmp_path / "plot.png"
    plot_results(files, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_structured_benchmark_runs_the_same_tokens_both_ways(tiny_dir, tokenizer):
    """The schema never completes within max_tokens: both runs generate every requested token,
    so they differ only by the grammar's work."""
    from cluster.bench_offline import structured_overhead
    from replicas import LLM

    llm = LLM(str(tiny_dir), dtype="float32")
    workload = make_workload(tokenizer, "random", 3, (30, 60), (20, 40), seed=0)
    report = structured_overhead(llm, workload, repeats=1)
    plain, constrained = report["results"]
    assert plain["generated_tokens"] == constrained["generated_tokens"]
    assert plain["generated_tokens"] == sum(r.max_tokens for r in workload)
    assert "overhead_percent_median_of_pairs" in report
