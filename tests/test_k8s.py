"""Kubernetes manifests: valid for KubeRay's CRD, with serveConfigV2 equal to configs/gpu.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.config import AppConfig
from cluster.k8s import OUTPUT, SERVE_CONFIG, render_rayservice

CRD = (
    Path(__file__).resolve().parent.parent.parent
    / "shared"
    / "kuberay"
    / "ray.io_rayservices.v1.7.0.yaml"
)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(OUTPUT.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    if not CRD.is_file():
        pytest.skip(f"KubeRay CRD not found at {CRD}")
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would prune: the schema does not reject them, but they do nothing."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def test_rayservice_is_rendered_from_gpu_config():
    assert OUTPUT.read_text() == render_rayservice(), "k8s/rayservice.yaml drifted: run `make k8s`"


def test_rayservice_validates_against_kuberay_crd(manifest, schema):
    from jsonschema import Draft7Validator

    errors = sorted(Draft7Validator(schema).iter_errors(manifest), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    assert unknown_fields(manifest, schema) == []
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"


def test_serve_config_v2_is_a_valid_serve_config(manifest):
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config == yaml.safe_load(SERVE_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(serve_config)
    for application in schema.applications:
        AppConfig.model_validate(application.args)


def test_cluster_shape(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    assert {p["name"] for p in head_container["ports"]} >= {"dashboard", "metrics", "serve"}
    assert {e["name"] for e in head_container["env"]} >= {"RAY_GRAFANA_HOST", "RAY_PROMETHEUS_HOST"}
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    worker = workers["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": 8000}
    assert "metrics" in {p["name"] for p in worker["ports"]}


def test_podmonitor_selects_the_ray_pods(manifest):
    monitor = yaml.safe_load(Path("k8s/podmonitor.yaml").read_text())
    assert monitor["kind"] == "PodMonitor"
    selector = monitor["spec"]["selector"]["matchLabels"]
    cluster = manifest["spec"]["rayClusterConfig"]
    for template in [
        cluster["headGroupSpec"]["template"],
        cluster["workerGroupSpecs"][0]["template"],
    ]:
        assert selector.items() <= template["metadata"]["labels"].items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_dockerfile_uses_the_pinned_ray_gpu_image():
    dockerfile = Path("k8s/Dockerfile").read_text()
    from_line = next(line for line in dockerfile.splitlines() if line.startswith("FROM "))
    assert from_line == "FROM rayproject/ray:2.60.0-py311-gpu"
    for line in dockerfile.splitlines():
        if line.startswith("COPY"):
            for source in line.split()[2:-1]:
                assert Path(source).exists(), f"Dockerfile copies missing {source}"
