"""Cache-aware routing through Serve: two replicas of the tiny model report their prefix caches,
and the router sends repeated prefixes to the replica that holds them."""

from __future__ import annotations

import time

import httpx
import pytest
import ray
from conftest import deploy, scrape, wait_for

from cluster.status import replica_stats

APP = "prefix"
ENGINE = {
    "dtype": "float32",
    "device": "cpu",
    "num_threads": 1,
    "num_blocks": 512,
    "block_size": 8,
    "max_num_batched_tokens": 256,
    "max_model_len": 1024,
}


@pytest.fixture(scope="module")
def base_url(serve_instance, tiny_dir):
    args = {
        "served_model_name": "tiny",
        "engine": {"model": str(tiny_dir), **ENGINE},
        "replicas": {
            "num_replicas": 2,
            "ray_actor_options": {"num_cpus": 1},
            "health_check_period_s": 1,
        },
        "router": {"stats_period_s": 0.2},
    }
    return deploy(serve_instance, APP, args)


def document(i: int) -> list[int]:
    """A 400-token document (50 blocks of 8), different for each i."""
    return [1000 + (i * 7919 + j * 31) % 20000 for j in range(400)]


def ask(base: str, doc: list[int], question: int, headers: dict | None = None) -> dict:
    prompt = doc + [500 + question, 600 + question]
    response = httpx.post(
        f"{base}/v1/completions",
        json={"prompt": prompt, "max_tokens": 2, "ignore_eos": True, "temperature": 0},
        headers=headers or {},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def test_repeated_prefixes_go_to_the_replica_that_holds_them(base_url):
    """Every later question about a document is served from the cache of the replica that
    prefilled it: its prompt tokens come back as cached tokens, for each of 6 documents."""
    for i in range(6):
        doc = document(i)
        first = ask(base_url, doc, 0)
        assert first["prompt_tokens_details"]["cached_tokens"] == 0
        time.sleep(0.5)  # a report or two: the router's index learns where the blocks are
        for question in range(1, 4):
            usage = ask(base_url, doc, question)
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            assert cached >= 400, f"document {i}, question {question}: only {cached} cached"


def test_router_metrics_count_the_prefix_hits(base_url, serve_instance):
    """The repeats above were routed as prefix hits, with their blocks matched; every decision
    was timed."""

    def metric(name: str, **labels: str) -> float:
        return scrape(serve_instance.metrics_url, f"ray_continuum_router_{name}", APP, **labels)

    def matched_over_32_blocks() -> float:
        at_most_32 = sum(metric("prefix_blocks_matched_bucket", le=le) for le in ("32", "32.0"))
        return metric("prefix_blocks_matched_count") - at_most_32

    # Ray exports each metric on its own schedule: wait for all three.
    wait_for(
        lambda: (
            metric("decisions_total", reason="prefix_hit") >= 18
            and matched_over_32_blocks() >= 18  # each repeat matched its 50-block document
            and metric("decision_seconds_count") >= 24
        ),
        timeout=30,
    )


def test_session_header_keeps_a_session_on_one_replica(base_url):
    stats = {s["replica"]: s["requests_admitted"] for s in replica_stats(APP)}
    for i in range(6):
        ask(base_url, [7000 + i] * 20, i, {"X-Session-ID": "session-a"})
    after = {s["replica"]: s["requests_admitted"] for s in replica_stats(APP)}
    moved = {r: after[r] - stats.get(r, 0) for r in after}
    assert sorted(moved.values()) == [0, 6], f"a session was split across replicas: {moved}"


def test_a_dead_replica_leaves_the_index_and_stale_entries_fail_nothing(base_url, serve_instance):
    doc = document(100)
    ask(base_url, doc, 0)
    time.sleep(0.5)
    holders = [s for s in replica_stats(APP) if s["prefix_cache_queries"]]
    assert holders

    def entries() -> float:
        return scrape(serve_instance.metrics_url, "ray_continuum_router_index_entries", APP)

    wait_for(lambda: entries() > 0, timeout=30)
    before = entries()
    # Kill the replica holding the document; its entries must go, and asking about the
    # document again must still work (on the other replica, or the replacement).
    victim = max(replica_stats(APP), key=lambda s: s["prefix_cache_queries"])["replica"]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#LLMServer#{victim}", namespace="serve"))
    for question in range(1, 6):
        ask(base_url, doc, question)
    wait_for(lambda: entries() < before, timeout=60)
    wait_for(lambda: len([s for s in replica_stats(APP) if "error" not in s]) == 2, timeout=180)
    for question in range(6, 9):
        ask(base_url, doc, question)
