"""Kubernetes manifests: every file in k8s/ applies as is, the RayService is valid for KubeRay's
CRD, and what is generated matches its sources (configs/gpu-autoscaling.yaml, the dashboard)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.config import AppConfig
from cluster.k8s import (
    DASHBOARD,
    DASHBOARD_CONFIGMAP,
    RAYSERVICE,
    SERVE_CONFIG,
    render_dashboard_configmap,
    render_rayservice,
)

K8S = Path(__file__).resolve().parent.parent / "k8s"

CRD = (
    Path(__file__).resolve().parent.parent.parent
    / "shared"
    / "kuberay"
    / "ray.io_rayservices.v1.7.0.yaml"
)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    if not CRD.is_file():
        if os.environ.get("CI") == "true":  # CI has ../shared beside the clone: this is a bug
            pytest.fail(f"KubeRay CRD not found at {CRD}")
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


def test_every_file_kubectl_reads_in_k8s_is_a_kubernetes_object():
    """`kubectl apply -f k8s/` reads every .yaml, .yml and .json file there: each must hold only
    Kubernetes objects, and no two may share a kind and name."""
    seen = set()
    files = sorted(p for p in K8S.iterdir() if p.suffix in {".yaml", ".yml", ".json"})
    assert files, "no manifests in k8s/"
    for path in files:
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict), f"{path.name}: not a Kubernetes object"
            for field in ("apiVersion", "kind"):
                assert document.get(field), f"{path.name}: no {field}"
            name = (document.get("metadata") or {}).get("name")
            assert name, f"{path.name}: no metadata.name"
            key = (document["kind"], name)
            assert key not in seen, f"{path.name}: a second {key[0]} named {name}"
            seen.add(key)


def test_generated_manifests_match_their_sources():
    assert RAYSERVICE.read_text() == render_rayservice(), "k8s/rayservice.yaml drifted: make k8s"
    assert DASHBOARD_CONFIGMAP.read_text() == render_dashboard_configmap(), (
        "k8s/grafana-dashboard.yaml drifted: make k8s"
    )
    configmap = yaml.safe_load(DASHBOARD_CONFIGMAP.read_text())
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["continuum.json"]) == json.loads(DASHBOARD.read_text())


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
    worker = workers["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "metrics" in {p["name"] for p in worker["ports"]}
    assert cluster["authOptions"]["mode"] == "token", "an open Ray cluster runs anyone's code"


def test_every_ray_pod_runs_serve_in_its_own_event_loop(manifest):
    from cluster.local_server import SERVE_LOOP_ENV

    cluster = manifest["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]]
    for template in templates:
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        assert SERVE_LOOP_ENV.items() <= env.items(), env


def test_kuberay_owns_the_probes(manifest):
    """KubeRay submits serveConfigV2 only once the head pod is ready, so a head probe that waits
    for Serve keeps it unready forever; the workers keep the probe KubeRay injects."""
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert not {"readinessProbe", "livenessProbe", "startupProbe"} & head.keys()
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert not {"readinessProbe", "livenessProbe", "startupProbe"} & worker.keys()


def test_worker_group_scales_with_the_engine_replicas(manifest):
    """One GPU worker per engine replica: the group's bounds are Serve's autoscaling bounds."""
    cluster = manifest["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    scaling = serve_config["applications"][0]["args"]["replicas"]["autoscaling_config"]
    assert workers["minReplicas"] == scaling["min_replicas"]
    assert workers["maxReplicas"] == scaling["max_replicas"]
    assert workers["replicas"] == scaling["initial_replicas"]
    assert cluster["enableInTreeAutoscaling"] is True


def test_podmonitor_selects_the_ray_pods(manifest):
    monitor = yaml.safe_load((K8S / "podmonitor.yaml").read_text())
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
    dockerfile = (K8S / "Dockerfile").read_text()
    from_line = next(line for line in dockerfile.splitlines() if line.startswith("FROM "))
    assert from_line == "FROM rayproject/ray:2.60.0-py311-gpu"
    for line in dockerfile.splitlines():
        if line.startswith("COPY"):
            for source in line.split()[2:-1]:
                assert (K8S.parent / source).exists(), f"Dockerfile copies missing {source}"


def test_docker_build_context_holds_only_what_the_image_copies():
    """.dockerignore excludes everything, then lets back exactly what the Dockerfile copies: no
    .venv, caches, tests or .git in the build context."""
    root = K8S.parent
    rules = [
        line.strip()
        for line in (root / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "**", "the build context must start from nothing"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {
        source.rstrip("/")
        for line in (K8S / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY")
        for source in line.split()[1:-1]
        if not source.startswith("--")
    }
    assert allowed == copied, f".dockerignore lets in {allowed}, the Dockerfile copies {copied}"
    assert not allowed & {".venv", "tests", ".git", "docs"}
