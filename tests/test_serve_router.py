"""The KV-aware router with two real SmolLM2 replicas, and its pure policy."""

from __future__ import annotations

import random
import threading

import httpx
import pytest
from conftest import deploy, wait_for
from openai import OpenAI

from cluster.status import replica_stats
from replicas import LLM, SamplingParams
from scheduler.routing import ReplicaLoad, RoutingWeights, rank_replicas, replica_score

APP = "smol"
ENGINE = {"device": "cpu", "num_threads": 1, "num_blocks": 96, "max_num_batched_tokens": 256}


# --- the pure policy ---------------------------------------------------------------------------


def load(replica_id, queue_len=0, free=100, total=100, max_queue=10):
    return ReplicaLoad(replica_id, queue_len, max_queue, free, total, 16)


def test_shorter_queue_ranks_first():
    ranked = rank_replicas(
        [load("a", 5), load("b", 1), load("c", 3)], None, RoutingWeights(), random.Random(0)
    )
    assert ranked == ["b", "c", "a"]


def test_more_free_blocks_ranks_first():
    ranked = rank_replicas(
        [load("a", free=10), load("b", free=90)], None, RoutingWeights(), random.Random(0)
    )
    assert ranked == ["b", "a"]


def test_replica_that_cannot_hold_the_prompt_ranks_last():
    # "a" is idle but has 2 free blocks (32 tokens); "b" is busier but can hold the prompt.
    loads = [load("a", queue_len=0, free=2), load("b", queue_len=8, free=50)]
    assert rank_replicas(loads, 100, RoutingWeights(), random.Random(0)) == ["b", "a"]
    assert rank_replicas(loads, 20, RoutingWeights(), random.Random(0)) == ["a", "b"]


def test_weights_trade_queue_against_kv():
    loads = [load("a", queue_len=6, free=90), load("b", queue_len=2, free=20)]
    assert rank_replicas(loads, None, RoutingWeights(queue=1, kv_cache=0), random.Random(0)) == [
        "b",
        "a",
    ]
    assert rank_replicas(loads, None, RoutingWeights(queue=0, kv_cache=1), random.Random(0)) == [
        "a",
        "b",
    ]
    assert replica_score(load("x", queue_len=50, free=0), RoutingWeights()) == 2.0, (
        "both terms cap at 1"
    )


def test_ties_are_broken_randomly():
    firsts = {
        rank_replicas([load("a"), load("b"), load("c")], None, RoutingWeights(), random.Random(s))[
            0
        ]
        for s in range(30)
    }
    assert firsts == {"a", "b", "c"}


def test_unknown_stats_do_not_penalise():
    fresh = ReplicaLoad("new", 0, 10)  # no routing stats reported yet
    assert rank_replicas(
        [load("old", queue_len=1), fresh], 500, RoutingWeights(), random.Random(0)
    ) == ["new", "old"]


@pytest.mark.parametrize("weights", [(-1, 1), (0, 0)])
def test_invalid_weights(weights):
    with pytest.raises(ValueError):
        RoutingWeights(*weights)


# --- two real replicas -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_url(serve_instance):
    args = {
        "engine": ENGINE,
        "replicas": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1}},
        "router": {"stats_period_s": 0.2},
    }
    return deploy(serve_instance, APP, args)


@pytest.mark.real_model
def test_smollm2_http_greedy_equals_offline(base_url):
    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    got = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, temperature=0, max_tokens=20
    )
    llm = LLM(**{k: v for k, v in ENGINE.items() if k != "num_threads"})
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert got.choices[0].message.content == expected.text
    assert got.usage.completion_tokens == len(expected.token_ids)


@pytest.mark.real_model
def test_new_work_goes_to_the_replica_with_free_blocks(base_url):
    """One replica holds a long request that fills most of its KV cache; the other runs two
    short-prompt requests, so it has the longer queue but free blocks. New requests must go to
    the second: a queue-length-only router would send them to the first."""

    def post_in_background(body):
        thread = threading.Thread(
            target=lambda: httpx.post(f"{base_url}/v1/completions", json=body, timeout=300)
        )
        thread.start()
        return thread

    def stats_by_replica():
        return {s["replica"]: s for s in replica_stats(APP)}

    def loaded_replica():
        stats = stats_by_replica()
        busy = [r for r, s in stats.items() if s["free_blocks"] < 0.3 * s["total_blocks"]]
        return busy[0] if len(stats) == 2 and len(busy) == 1 else None

    long_body = {"prompt": "word " * 1150, "max_tokens": 300, "ignore_eos": True, "temperature": 0}
    threads = [post_in_background(long_body)]
    try:
        wait_for(lambda: loaded_replica() is not None, timeout=60)
        busy = loaded_replica()
        medium_body = {"prompt": "Hello", "max_tokens": 250, "ignore_eos": True, "temperature": 0}
        threads += [post_in_background(medium_body) for _ in range(2)]
        wait_for(
            lambda: any(r != busy and s["num_running"] == 2 for r, s in stats_by_replica().items()),
            timeout=60,
        )
        before = {r: s["requests_admitted"] for r, s in stats_by_replica().items()}
        client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        for i in range(6):
            client.completions.create(model="SmolLM2-135M-Instruct", prompt=f"Hi {i}", max_tokens=2)
        assert threads[0].is_alive(), "the long request ended before the test could use it"
        after = {r: s["requests_admitted"] for r, s in stats_by_replica().items()}
        sent = {replica: after[replica] - before[replica] for replica in after}
        assert sent[busy] == 0, f"new requests went to the replica with few free blocks: {sent}"
        assert sum(sent.values()) == 6
    finally:
        for thread in threads:
            thread.join()
