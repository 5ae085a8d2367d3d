"""Every config in configs/ is a valid Serve config whose application args build the app."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from cluster.app import build_app
from cluster.config import AppConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_is_a_valid_serve_config(path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for application in schema.applications:
        assert application.import_path == "cluster.app:build_app"
        config = AppConfig.model_validate(application.args)
        build_app(application.args)
        gpus = config.replicas.ray_actor_options.get("num_gpus", 0)
        if path.name.startswith("gpu"):
            assert gpus == 1 and config.engine.device == "cuda"
        else:
            assert gpus == 0 and config.replicas.ray_actor_options.get("num_cpus")


def test_ingress_scales_as_configured():
    """The ingress is sized (or autoscaled) from `ingress:`, so it is never the bottleneck."""
    ingress = build_app({"ingress": {"num_replicas": 3, "num_cpus": 1}})._bound_deployment
    assert ingress.name == "OpenAIIngress" and ingress.num_replicas == 3
    assert ingress.ray_actor_options == {"num_cpus": 1}
    scaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 256}
    ingress = build_app({"ingress": {"autoscaling_config": scaling}})._bound_deployment
    assert ingress._deployment_config.autoscaling_config.max_replicas == 4


def test_gpu_cluster_autoscales_its_ingress():
    schema = yaml.safe_load(Path("configs/gpu-autoscaling.yaml").read_text())
    config = AppConfig.model_validate(schema["applications"][0]["args"])
    assert config.ingress.autoscaling_config is not None, "one ingress would cap the cluster"


def test_router_weights_derive_from_the_engines_step_model():
    """The cost policy weighs prefill by what the replicas' engine takes per token; `cost`
    overrides what the step model gives."""
    engine = {"synthetic": {"tokens_per_second": 5000}, "max_num_batched_tokens": 1024}
    weights = AppConfig.model_validate({"engine": engine}).router_kwargs()["cost_weights"]
    assert weights["prefill_s_per_token"] == pytest.approx(1 / 5000)
    overridden = {"engine": engine, "router": {"cost": {"load_guard_s": 9.0}}}
    weights = AppConfig.model_validate(overridden).router_kwargs()["cost_weights"]
    assert weights["load_guard_s"] == 9.0
    assert weights["prefill_s_per_token"] == pytest.approx(1 / 5000)
    with pytest.raises(ValidationError, match="no such file"):
        AppConfig.model_validate({"router": {"step_model": "configs/step-models/none.json"}})


def test_local_config_serves_on_loopback():
    schema = ServeDeploySchema.model_validate(
        yaml.safe_load(Path("configs/local-cpu.yaml").read_text())
    )
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == 8000
    assert AppConfig.model_validate(schema.applications[0].args).replicas.num_replicas == 2


@pytest.mark.parametrize(
    "bad",
    [
        {"engine": {"device": "cuda"}},  # a GPU engine without a GPU
        {"engine": {"device": "cpu"}, "replicas": {"ray_actor_options": {"num_gpus": 1}}},
        {"engine": {"max_num_seqs": 0}},
        {"replicas": {"num_replicas": 0}},
        {"router": {"queue_weight": 0, "kv_cache_weight": 0}},
        {"router": {"cost": {"prefill_s_per_token": 0}}},
        {"router": {"cost": {"no_such_weight": 1}}},
        {"ingress": {"num_replicas": 0}},
        {"engine": {"dtype": "int8"}},
        {"unknown": 1},
    ],
)
def test_invalid_app_args_are_refused_before_anything_starts(bad):
    with pytest.raises(ValidationError):
        build_app(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_runs_serve_in_the_replicas_own_event_loop(path):
    """The same Serve settings `python -m cluster serve` uses, for `serve run` and KubeRay."""
    from cluster.local_server import SERVE_LOOP_ENV

    for application in yaml.safe_load(path.read_text())["applications"]:
        assert application["runtime_env"]["env_vars"] == SERVE_LOOP_ENV
