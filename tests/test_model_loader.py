"""Model sources (GGUF, local directory), settings validation, and refusal of unsupported models."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from transformers import AutoConfig

from replicas import EngineConfig, LLMEngine
from replicas.errors import ModelLoadError
from replicas.model_loader import check_supported, resolve_model_source
from replicas.model_source import embedded_model_file


def test_gguf_is_converted_once_and_reused(smol_dir, tmp_path):
    assert (smol_dir / "model.safetensors").is_file() and (smol_dir / "tokenizer.json").is_file()
    start = time.perf_counter()
    again = resolve_model_source(EngineConfig(model=str(embedded_model_file())))
    assert again == str(smol_dir), "an explicit path to the same GGUF reuses the conversion"
    assert time.perf_counter() - start < 1.0, "a cached conversion must not convert again"


def test_local_directory_is_served_as_is(tiny_dir):
    assert resolve_model_source(EngineConfig(model=str(tiny_dir))) == str(tiny_dir)


@pytest.mark.parametrize("model_type", ["mamba", "t5", "bert"])
def test_unsupported_architectures_are_refused(model_type):
    with pytest.raises(ModelLoadError):
        check_supported(AutoConfig.for_model(model_type))


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        LLMEngine(EngineConfig(model=str(tmp_path / "absent.gguf")))


@pytest.mark.parametrize(
    "bad",
    [
        dict(dtype="float64"),
        dict(device="tpu"),
        dict(block_size=0),
        dict(max_num_batched_tokens=8, max_num_seqs=16),
        dict(unknown_setting=1),
    ],
)
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValidationError):
        EngineConfig(**bad)


def test_small_budget_lowers_default_max_num_seqs():
    assert EngineConfig(max_num_batched_tokens=8).max_num_seqs == 8


def test_cli_generate_runs_on_a_local_model(tiny_dir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster",
            "generate",
            "--prompt",
            "Hello",
            "--model",
            str(tiny_dir),
            "--max-tokens",
            "5",
            "--dtype",
            "float32",
            "--num-blocks",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no text was generated"


def test_cli_reports_invalid_settings():
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "generate", "--prompt", "x", "--block-size", "-3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "block_size" in result.stderr


def test_processes_converting_the_same_gguf_at_once_convert_it_once(tmp_path):
    """A cold `serve run` starts the ingress and every replica at once: one converts, the rest
    wait for it and reuse its result."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not really a model")
    cache, log = tmp_path / "cache", tmp_path / "conversions.log"
    script = f"""
import time
from pathlib import Path
from pathlib import Path
import replicas.model_loader as loader

def fake_convert(gguf_path, cache_dir, target):
    with open({str(log)!r}, "a") as f:
        f.write("converted\\n")
    time.sleep(1.0)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{{}}")

loader._convert = fake_convert
print(loader.convert_gguf(Path({str(gguf)!r}), Path({str(cache)!r})))
"""
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    targets = {p.communicate(timeout=120)[0].strip() for p in processes}
    assert all(p.returncode == 0 for p in processes)
    assert len(targets) == 1 and (Path(targets.pop()) / "config.json").is_file()
    assert log.read_text().count("converted") == 1, "the GGUF was converted more than once"
