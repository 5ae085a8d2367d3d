"""The cluster simulator: real schedulers on a virtual clock, seeded workloads, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.sim_workloads import Agent, Chat, NoSharing, Trace, make_workload
from cluster.simulator import ReplicaSpec, SimConfig, Simulator, capacity_rps, simulate
from scheduler.block_manager import prompt_block_hashes
from scheduler.step_time import StepTimeModel

MODEL = StepTimeModel(0.007, 3e-5, 1e-5, 4.3e-8, 1.3e-9)
SPEC = ReplicaSpec(num_blocks=1024, max_num_batched_tokens=2048, max_num_seqs=64)
SMALL_AGENT = dict(num_prefixes=12, prefix_len=1200, question_len=(20, 100), output_len=(20, 60))


def agent(rate, seed=0):
    return Agent(rate=rate, seed=seed, **SMALL_AGENT)


def test_every_request_finishes_and_every_block_is_returned():
    sim = Simulator(SimConfig(4, "cost", MODEL, SPEC, stats_period_s=0.2, num_routers=2))
    result = sim.run(agent(rate=40), 300)
    assert result.requests == 300 and result.rejected == 0
    for replica in sim.replicas:
        assert not replica.scheduler.has_unfinished()
        assert replica.block_manager.num_free_blocks == SPEC.num_blocks, "blocks leaked"
    assert sum(result.decisions.values()) == pytest.approx(1.0)
    assert 0 < result.prefix_hit_rate <= 1
    assert result.ttft_s["p50"] <= result.ttft_s["p90"] <= result.ttft_s["p99"]
    assert result.itl_s["p50"] > 0 and result.e2e_s["p50"] > result.ttft_s["p50"]


def test_same_seed_same_result():
    def run():
        result = simulate(SimConfig(3, "power_of_two", MODEL, SPEC), agent(rate=30), 150)
        return result.as_dict(per_request=True)

    first, second = run(), run()
    for volatile in ("wall_seconds", "decision_us"):
        first.pop(volatile), second.pop(volatile)
    assert first == second


def test_a_lone_request_takes_exactly_its_modelled_steps():
    """One request on an idle replica: a prefill step, then one decode step per token."""
    tokens = list(range(100, 400))  # 300 tokens: one prefill step
    trace = Trace(
        requests=[
            __import__("cluster.sim_workloads", fromlist=["SimRequest"]).SimRequest(
                1, 0.5, tokens, 4, prompt_block_hashes(tokens, 16)
            )
        ]
    )
    result = simulate(SimConfig(1, "round_robin", MODEL, SPEC, warmup_fraction=0), trace, 1)
    prefill = MODEL.seconds(300, 1, 300, 300 * 300)
    decodes = sum(MODEL.seconds(1, 1, 300 + k, 300 + k) for k in range(1, 4))
    assert result.ttft_s["p50"] == pytest.approx(prefill)
    assert result.e2e_s["p50"] == pytest.approx(prefill + decodes)


def test_cache_aware_routing_beats_power_of_two_on_shared_prefixes():
    rate = 0.7 * capacity_rps(agent(1).shape(), SPEC, MODEL, 4) * 4
    results = {
        policy: simulate(SimConfig(4, policy, MODEL, SPEC), agent(rate), 1000)
        for policy in ("power_of_two", "cost")
    }
    cost, p2c = results["cost"], results["power_of_two"]
    assert cost.prefix_hit_rate > p2c.prefix_hit_rate + 0.05
    assert cost.ttft_s["p90"] * 5 < p2c.ttft_s["p90"], (cost.ttft_s, p2c.ttft_s)
    assert cost.decisions["prefix_hit"] > 0.8 and cost.matched_blocks_per_request > 60
    assert cost.index["entries"] > 0 and cost.index["bytes_per_entry"] > 0


def test_workloads_share_what_they_say_they_share():
    chat = Chat(rate=10, seed=1, num_system_prompts=2, turns=(3, 3))
    first = next(iter(chat.arrivals(1)))
    assert first.shared_tokens == chat.system_len and first.session_id is not None
    answer = first.token_ids + [7] * 20
    hashes = prompt_block_hashes(answer, 16)
    follow = chat.follow_up(first, answer, hashes, now=3.0)
    assert follow.token_ids[: len(answer)] == answer, "the next turn resends the conversation"
    assert follow.block_hashes[: len(hashes)] == hashes and follow.arrival > 3.0
    assert follow.block_hashes == prompt_block_hashes(follow.token_ids, 16)
    assert follow.turns_left == first.turns_left - 1
    requests = list(agent(rate=10).arrivals(20))
    assert len({tuple(r.token_ids[:1200]) for r in requests}) <= SMALL_AGENT["num_prefixes"]
    assert all(r.block_hashes == prompt_block_hashes(r.token_ids, 16) for r in requests)
    unique = list(NoSharing(rate=10).arrivals(10))
    assert len({r.block_hashes[0] for r in unique}) == 10
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("bogus", 1.0, 16, 0)


def test_cli_simulate_writes_json_and_plots(tmp_path):
    repo = Path(__file__).parent.parent
    command = [
        sys.executable,
        "-m",
        "cluster",
        "simulate",
        "--workload",
        "none",
        "--replicas",
        "2",
        "4",
        "--load",
        "0.5",
        "--policies",
        "round_robin",
        "cost",
        "--requests",
        "80",
        "--workload-options",
        '{"prompt_len": [50, 200], "output_len": [10, 30]}',
        "--output-dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=repo, timeout=120)
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "sim-none.json").read_text())["runs"]
    assert [(r["config"]["num_replicas"], r["config"]["policy"]) for r in runs] == [
        (2, "round_robin"),
        (2, "cost"),
        (4, "round_robin"),
        (4, "cost"),
    ]
    assert all(r["requests"] == 80 for r in runs)
    assert (tmp_path / "sim-none-ttft-vs-load.png").stat().st_size > 1000
    assert (tmp_path / "sim-none-hit-rate-vs-replicas.png").stat().st_size > 1000
