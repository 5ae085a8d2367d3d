"""`python -m cluster <command>`: generate text offline, benchmark, serve, simulate, calibrate."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from cluster.workloads import WORKLOADS
from replicas.config import EngineConfig


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field (e.g. --max-num-seqs); pydantic parses and checks values."""
    group = parser.add_argument_group("engine")
    for name, field in EngineConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=field.description
            )
        else:
            group.add_argument(flag, default=None, metavar=name.upper(), help=field.description)


def engine_config_from_args(args: argparse.Namespace, **defaults) -> EngineConfig:
    values = dict(defaults)
    values.update(
        {
            name: getattr(args, name)
            for name in EngineConfig.model_fields
            if getattr(args, name) is not None
        }
    )
    return EngineConfig(**values)


def cmd_generate(args: argparse.Namespace) -> None:
    from replicas import LLM, SamplingParams

    config = engine_config_from_args(args)
    llm = LLM(**config.model_dump())
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=None if args.seed is None else int(args.seed),
    )
    if args.chat:
        output = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    else:
        output = llm.generate(args.prompt, params, use_tqdm=False)[0]
    print(output.text)


def default_tokenizer(args: argparse.Namespace):
    """The tokenizer of the model being benchmarked (for prompt lengths)."""
    from replicas.model_loader import resolve_model_source
    from replicas.tokenizer import load_tokenizer

    config = engine_config_from_args(args)
    return load_tokenizer(config, resolve_model_source(config))


def write_report(report: dict, output: str | None) -> None:
    text = json.dumps(report, indent=2)
    if output:
        Path(output).write_text(text + "\n")
        report = {k: v for k, v in report.items() if k != "per_request"}
        text = json.dumps(report, indent=2)
    print(text)


def workload_summary(workload, args: argparse.Namespace, seed: int) -> dict:
    lengths = [len(r.prompt_token_ids) for r in workload]
    outputs = [r.max_tokens for r in workload]
    return {
        "kind": args.workload,
        "requests": len(workload),
        "prompt_tokens": {"min": min(lengths), "max": max(lengths), "total": sum(lengths)},
        "output_tokens": {"min": min(outputs), "max": max(outputs), "total": sum(outputs)},
        "seed": seed,
    }


def cmd_bench(args: argparse.Namespace) -> None:
    from cluster.workloads import make_workload

    seed = int(args.seed or 0)
    if args.offline:
        return bench_offline(args, seed)
    import asyncio

    import httpx

    from cluster.bench_client import (
        auth_headers,
        parse_goodput,
        per_request,
        run_benchmark,
        summarize,
    )

    goodput = parse_goodput(args.goodput)
    base_url = args.url.rstrip("/")
    model = args.served_model
    if model is None:
        models = httpx.get(f"{base_url}/v1/models", timeout=30, headers=auth_headers())
        model = models.json()["data"][0]["id"]
    if args.capacity:
        return bench_capacity(args, base_url, model)
    workload = make_workload(
        default_tokenizer(args),
        args.workload,
        args.num_requests,
        tuple(args.prompt_len),
        tuple(args.output_len),
        seed,
    )
    results, wall = asyncio.run(
        run_benchmark(
            base_url,
            model,
            workload,
            args.concurrency,
            args.request_rate,
            seed,
            stream=not args.no_stream,
        )
    )
    report = {
        "label": args.label,
        "server": args.label or base_url,
        "url": base_url,
        "model": model,
        "concurrency": args.concurrency,
        "request_rate": args.request_rate,
        "workload": workload_summary(workload, args, seed),
        "summary": summarize(results, wall, goodput),
        "per_request": per_request(results),
    }
    write_report(report, args.output)


def bench_capacity(args: argparse.Namespace, base_url: str, model: str) -> None:
    if args.ray_address:
        from cluster.local_server import use_loopback_ray

        use_loopback_ray(args.ray_address)
    from cluster.bench_capacity import run_capacity

    results = run_capacity(
        base_url,
        model,
        args.capacity,
        args.prompt_len[0],
        args.output_len[1],
        args.warmup,
        args.duration,
        args.ray_address,
    )
    report = {
        "label": args.label or "capacity",
        "url": base_url,
        "model": model,
        "prompt_tokens": args.prompt_len[0],
        "output_tokens": args.output_len[1],
        "results": results,
    }
    write_report(report, args.output)


def bench_offline(args: argparse.Namespace, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from cluster.bench_offline import (
        profile_engine,
        run_engine,
        run_hf_static,
        structured_overhead,
    )
    from cluster.workloads import make_workload
    from replicas import LLM
    from replicas.model_loader import resolve_dtype, resolve_model_source

    torch.set_num_threads(args.threads)
    config = engine_config_from_args(args, dtype="bfloat16", num_threads=args.threads)
    llm = LLM(**config.model_dump())
    engine = llm.engine
    workload = make_workload(
        engine.tokenizer,
        args.workload,
        args.num_requests,
        tuple(args.prompt_len),
        tuple(args.output_len),
        seed,
    )
    if args.structured:
        report = {
            "label": args.label or "offline-structured",
            "workload": workload_summary(workload, args, seed),
            "engine": config.model_dump(mode="json"),
            "threads": torch.get_num_threads(),
            **structured_overhead(llm, workload, args.repeats, args.profile),
        }
        return write_report(report, args.output)
    results = [run_engine(llm, workload)]
    if not args.skip_baseline:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_source(config),
            dtype=resolve_dtype(config.dtype, engine.device),
            attn_implementation="sdpa",
        ).to(engine.device)
        model.eval()
        pad = engine.tokenizer.pad_token_id
        if pad is None:
            pad = engine.eos_token_ids[0]
        results.append(run_hf_static(model, pad, workload, args.batch_size))
    report = {
        "label": args.label or "offline",
        "workload": workload_summary(workload, args, seed),
        "engine": config.model_dump(mode="json"),
        "threads": torch.get_num_threads(),
        "results": [r.as_dict() for r in results],
    }
    if len(results) == 2:
        report["speedup"] = round(results[0].tokens_per_second / results[1].tokens_per_second, 2)
    if args.profile:
        report["profile_percent_of_wall_time"] = profile_engine(llm, workload)
    write_report(report, args.output)


def cmd_plot(args: argparse.Namespace) -> None:
    from cluster.bench_plot import plot_results

    plot_results([Path(p) for p in args.results], Path(args.output))
    print(f"wrote {args.output}")


def cmd_serve(args: argparse.Namespace) -> None:
    from cluster.local_server import serve_config

    serve_config(Path(args.config), args.address, args.set or [])


def cmd_status(args: argparse.Namespace) -> None:
    from cluster.local_server import use_loopback_ray

    use_loopback_ray(args.address)
    import ray

    from cluster.status import replica_stats

    try:
        ray.init(address=args.address or "auto", namespace="serve", log_to_driver=False)
    except ConnectionError:
        where = args.address or "this machine"
        raise SystemExit(
            f"no Ray cluster is running on {where}: start a server first (`make serve`), or "
            "pass --address"
        ) from None
    print(json.dumps(replica_stats(args.app), indent=2))


DEFAULT_STEP_MODEL = (
    Path(__file__).parent.parent / "configs" / "step-models" / "llama-8b-h100-estimate.json"
)


def cmd_simulate(args: argparse.Namespace) -> None:
    from cluster.sim_plot import markdown_table, plot_sweep
    from cluster.simulator import ReplicaSpec, sweep
    from scheduler.routing import CostWeights
    from scheduler.step_time import StepTimeModel

    model = StepTimeModel.load(args.step_model)
    spec = ReplicaSpec(
        args.num_blocks,
        args.block_size,
        args.max_num_batched_tokens,
        args.max_num_seqs,
        args.max_model_len,
    )
    weights = None
    if args.weights:
        overrides = json.loads(args.weights)
        weights = CostWeights.from_step_model(model, spec.max_num_batched_tokens, **overrides)

    def progress(run: dict) -> None:
        print(markdown_table([run]).splitlines()[-1], flush=True)

    print(markdown_table([]), flush=True)
    runs = sweep(
        args.workload,
        json.loads(args.workload_options or "{}"),
        args.replicas,
        args.load,
        args.policies,
        args.requests,
        progress=progress,
        requests_per_replica=args.requests_per_replica,
        step_model=model,
        replica=spec,
        stats_period_s=args.stats_period,
        num_routers=args.routers,
        cost_weights=weights,
        seed=args.seed,
        warmup_fraction=args.warmup,
    )
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = args.name or f"sim-{args.workload}"
        (out / f"{name}.json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")
        for path in plot_sweep(runs, out, name):
            print(f"wrote {path}")
        print(f"wrote {out / (name + '.json')}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    import torch

    from cluster.calibrate import calibrate, fidelity, poisson_trace
    from replicas import LLMEngine

    torch.set_num_threads(args.threads)
    engine = LLMEngine(engine_config_from_args(args, num_threads=args.threads))
    bs = engine.block_manager.block_size
    workload = dict(
        num_requests=args.requests,
        prompt_len=tuple(args.prompt_len),
        output_len=tuple(args.output_len),
        block_size=bs,
    )
    traces = [
        poisson_trace(engine.vocab_size, rate=rate, seed=10 + i, **workload)
        for i, rate in enumerate(args.rates)
    ]
    name = args.name or f"{engine.model_name}-{engine.device.type}"
    model, quality = calibrate(engine, name, traces, scale=args.scale)
    report = {"model": model.to_dict(), "fit": quality}
    if args.check_rate:
        held_out = poisson_trace(engine.vocab_size, rate=args.check_rate, seed=1, **workload)
        report["fidelity"] = fidelity(engine, model, held_out)
    model.save(args.output, **quality, fidelity=report.get("fidelity"))
    print(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


def cmd_k8s(args: argparse.Namespace) -> None:
    from cluster.k8s import write_manifests

    for path in write_manifests():
        print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text offline with the engine")
    generate.add_argument("--prompt", required=True)
    generate.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the chat template"
    )
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    add_engine_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    serve = commands.add_parser(
        "serve", help="run the Ray Serve application (starts Ray if needed)"
    )
    serve.add_argument("--config", default="configs/local-cpu.yaml", help="a Serve config file")
    serve.add_argument("--address", help="Ray cluster address (default: a new local one)")
    serve.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override an application setting, e.g. engine.synthetic.tokens_per_second=10000",
    )
    serve.set_defaults(func=cmd_serve)

    status = commands.add_parser("status", help="show engine replicas and their routing stats")
    status.add_argument("--app", default="continuum")
    status.add_argument("--address", help="Ray cluster address (default: the local one)")
    status.set_defaults(func=cmd_status)

    bench = commands.add_parser(
        "bench",
        help="benchmark a server over HTTP, or the engine offline against HF static batches",
    )
    bench.add_argument("--url", default="http://127.0.0.1:8000", help="OpenAI-compatible server")
    bench.add_argument("--offline", action="store_true", help="drive the engine in-process")
    bench.add_argument("--workload", default="random", choices=WORKLOADS)
    bench.add_argument("--num-requests", type=int, default=64)
    bench.add_argument("--prompt-len", type=int, nargs=2, default=[20, 300], metavar=("MIN", "MAX"))
    bench.add_argument("--output-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    load = bench.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="requests in flight at once")
    load.add_argument("--request-rate", type=float, help="Poisson arrivals, requests per second")
    bench.add_argument("--goodput", nargs="+", metavar="SLO", help="e.g. ttft:500 tpot:50 (ms)")
    bench.add_argument(
        "--no-stream", action="store_true", help="whole responses instead of streams (HTTP)"
    )
    bench.add_argument(
        "--capacity",
        type=int,
        nargs="+",
        metavar="STREAMS",
        help="serving-path capacity at these numbers of concurrent streams: delivered tokens/s "
        "and CPU per token of each server process (server on this machine; prompts of "
        "--prompt-len MIN tokens, outputs of --output-len MAX)",
    )
    bench.add_argument("--duration", type=float, default=20, help="capacity: seconds measured")
    bench.add_argument(
        "--ray-address",
        help="capacity: the server's Ray cluster (printed by `python -m cluster serve`), to read "
        "how many tokens its engines generated in the window",
    )
    bench.add_argument("--warmup", type=float, default=5, help="capacity: seconds before that")
    bench.add_argument("--served-model", help="model name to request (default: the server's first)")
    bench.add_argument("--label", help="a name for this run in reports and plots")
    bench.add_argument("--threads", type=int, default=2, help="torch threads (offline)")
    bench.add_argument("--batch-size", type=int, default=8, help="HF static batch size (offline)")
    bench.add_argument("--skip-baseline", action="store_true", help="offline: engine only")
    bench.add_argument(
        "--profile", action="store_true", help="offline: run the workload again under the profiler"
    )
    bench.add_argument(
        "--structured",
        action="store_true",
        help="offline: tokens/s unconstrained vs every request under a JSON schema",
    )
    bench.add_argument("--repeats", type=int, default=2, help="offline --structured: runs of each")
    bench.add_argument("--output", help="write the JSON report (with per-request latencies) here")
    add_engine_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    simulate = commands.add_parser(
        "simulate",
        help="simulate a cluster: the real scheduler and routing policies on a virtual clock",
    )
    simulate.add_argument("--workload", default="agent", choices=["chat", "agent", "none"])
    simulate.add_argument(
        "--workload-options", help='JSON, e.g. \'{"num_prefixes": 150, "prefix_len": 6000}\''
    )
    simulate.add_argument("--replicas", type=int, nargs="+", default=[64])
    simulate.add_argument(
        "--load", type=float, nargs="+", default=[0.8], help="fractions of ideal capacity"
    )
    simulate.add_argument(
        "--policies",
        nargs="+",
        default=["round_robin", "power_of_two", "queue_kv", "cost"],
        choices=["round_robin", "power_of_two", "queue_kv", "cost"],
    )
    simulate.add_argument("--requests", type=int, default=10_000, help="per run (at most)")
    simulate.add_argument(
        "--requests-per-replica", type=int, help="scale requests with the replica count"
    )
    simulate.add_argument("--step-model", default=str(DEFAULT_STEP_MODEL), help="JSON file")
    simulate.add_argument(
        "--stats-period", type=float, default=0.5, help="seconds between load reports (0: live)"
    )
    simulate.add_argument("--routers", type=int, default=1, help="router instances")
    simulate.add_argument("--weights", help="cost policy overrides, JSON: '{\"tie_s\": 0.01}'")
    simulate.add_argument("--num-blocks", type=int, default=16384)
    simulate.add_argument("--block-size", type=int, default=16)
    simulate.add_argument("--max-num-batched-tokens", type=int, default=8192)
    simulate.add_argument("--max-num-seqs", type=int, default=256)
    simulate.add_argument("--max-model-len", type=int, default=32768)
    simulate.add_argument("--warmup", type=float, default=0.1, help="fraction left out of stats")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--output-dir", help="write <name>.json and plots here")
    simulate.add_argument("--name", help="file name prefix (default: sim-<workload>)")
    simulate.set_defaults(func=cmd_simulate)

    calibrate = commands.add_parser(
        "calibrate", help="fit the simulator's step-time model to the engine on this machine"
    )
    calibrate.add_argument("--output", required=True, help="the step-time model JSON to write")
    calibrate.add_argument("--name", help="a name for the model (default: model-device)")
    calibrate.add_argument("--threads", type=int, default=2, help="torch threads")
    calibrate.add_argument("--scale", type=float, default=1.0, help="shrink calibration lengths")
    calibrate.add_argument("--requests", type=int, default=40, help="per replayed trace")
    calibrate.add_argument(
        "--rates", type=float, nargs="*", default=[1.0, 3.0], help="replayed trace rates (req/s)"
    )
    calibrate.add_argument("--prompt-len", type=int, nargs=2, default=[20, 300])
    calibrate.add_argument("--output-len", type=int, nargs=2, default=[16, 128])
    calibrate.add_argument(
        "--check-rate", type=float, help="replay a held-out trace at this rate, engine vs simulator"
    )
    add_engine_arguments(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)

    k8s = commands.add_parser(
        "k8s", help="render k8s/ (the RayService and the Grafana dashboard) from their sources"
    )
    k8s.set_defaults(func=cmd_k8s)

    plot = commands.add_parser("plot", help="plot benchmark result files")
    plot.add_argument("results", nargs="+", help="JSON files written by `bench --output`")
    plot.add_argument("-o", "--output", default="bench.png")
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except ValidationError as exc:
        sys.exit(f"invalid settings:\n{exc}")
