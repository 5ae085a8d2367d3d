"""`python -m cluster serve`: run a Serve config like `serve run`, as a well-behaved server.

What it adds to `serve run`: the local Ray it starts listens on 127.0.0.1 only (an open Ray
cluster runs anyone's code); a busy HTTP port is a one-line error, not a traceback; it prints
where the API, the dashboard and the metrics are; and SIGTERM (docker stop, Kubernetes) drains
like Ctrl-C: Serve stops taking requests, lets in-flight ones finish for the replicas' grace
period (the rest end with an error event and [DONE]), then Serve and Ray stop and it exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path

import yaml

from replicas.config import EngineConfig

# Serve runs the request router and the user code in the replica's own event loop: every
# streamed item otherwise crosses threads twice (measured in docs/benchmarks.md).
SERVE_LOOP_ENV = {
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}
# Read by Ray when it is imported: a local cluster then binds its servers to 127.0.0.1 (its
# "cluster mode" would bind every interface and advertise the machine's address).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def use_loopback_ray(address: str | None) -> None:
    """Before Ray is imported: a driver for a cluster on this machine uses 127.0.0.1 as its
    node address, as the cluster `serve_config` starts does; joining one, it authenticates with
    the token Ray keeps for this user (Ray turns token auth on for the clusters it starts)."""
    if address is None or address.split(":")[0] in ("127.0.0.1", "localhost"):
        if "ray" in sys.modules:
            raise RuntimeError("Ray was imported before the loopback settings could apply")
        os.environ.update(LOOPBACK_ENV)
        if address is not None and (Path.home() / ".ray" / "auth_token").is_file():
            os.environ.setdefault("RAY_AUTH_MODE", "token")


def bind_grpc_to_loopback() -> None:
    """Worker set-up hook: Serve replicas open a gRPC server on every interface ("[::]:0"),
    which no Ray setting moves; bind it to 127.0.0.1 instead (local clusters only)."""
    import ray._common.tls_utils as tls_utils

    add_port = tls_utils.add_port_to_grpc_server

    def loopback(server, address: str):
        if address.startswith(("[::]:", "0.0.0.0:")):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return add_port(server, address)

    tls_utils.add_port_to_grpc_server = loopback
    if (replica := sys.modules.get("ray.serve._private.replica")) is not None:
        replica.add_port_to_grpc_server = loopback


def prepare_once(engine: EngineConfig) -> None:
    """On the first run, convert the GGUF and build the CPU kernel here, once, rather than in
    every replica at the same time. Later runs only check that the conversion exists."""
    from replicas.model_source import converted_dir, gguf_file

    gguf = gguf_file(engine)
    if gguf is None or (converted_dir(gguf, engine.model_cache_dir) / "config.json").is_file():
        return
    print(f"first run: converting {gguf.name} and building the CPU attention kernel (once)")
    from replicas.kernels import load_cpu_kernels
    from replicas.model_loader import resolve_model_source

    resolve_model_source(engine)
    if engine.native_kernels and engine.device != "cuda":
        load_cpu_kernels()


def check_port_free(host: str, port: int, config: Path) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SystemExit(
                f"cannot serve on {host}:{port}: {exc.strerror.lower()} (another server?). Stop "
                f"it, or set http_options.port in {config}."
            ) from None


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """`engine.max_num_seqs=128` sets args.engine.max_num_seqs of every application (the value
    is read as YAML: numbers, booleans, null, lists)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes key=value, got {override!r}")
        *parents, leaf = key.split(".")
        for application in config.get("applications", []):
            node = application.setdefault("args", {})
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(raw)
    return config


def serve_config(path: Path, address: str | None, overrides: list[str] = ()) -> None:
    """Deploy `path` on a local Ray (started on loopback) or the one at `address`, and block
    until SIGINT or SIGTERM; then drain and shut down."""
    for name, value in SERVE_LOOP_ENV.items():
        os.environ.setdefault(name, value)
    local = address is None
    use_loopback_ray(address)
    if not path.is_file():
        raise SystemExit(f"no such config file: {path}")
    import ray
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from cluster.config import AppConfig

    config = apply_overrides(yaml.safe_load(path.read_text()), list(overrides))
    deploy = ServeDeploySchema.model_validate(config)
    for application in deploy.applications:
        prepare_once(AppConfig.model_validate(application.args).engine)
    http = deploy.http_options
    if local:
        check_port_free(http.host, http.port, path)
    context = ray.init(
        address=address or "local",  # "local": a new cluster, never one found on the machine
        namespace="serve",
        runtime_env={"worker_process_setup_hook": bind_grpc_to_loopback} if local else None,
    )
    stop = threading.Event()
    # Installed after ray.init, which installs its own SIGTERM handler (a stack dump and exit
    # 15). A shell's background jobs start with SIGINT ignored, so it is set explicitly too.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        client = serve_start(
            http_options=http.model_dump(),
            proxy_location=deploy.proxy_location,
            grpc_options=deploy.grpc_options.model_dump(),
            controller_options=deploy.controller_options,
        )
        client.deploy_apps(deploy, _blocking=False)
        node = ray._private.worker.global_worker.node
        print(f"API:       http://{http.host}:{http.port}/v1  (health: /health)", flush=True)
        if context.dashboard_url:
            print(f"dashboard: http://{context.dashboard_url}", flush=True)
        print(
            f"metrics:   http://{node.node_ip_address}:{node.metrics_export_port}/metrics "
            "(Prometheus; Continuum's are ray_continuum_*)",
            flush=True,
        )
        print(
            f"ray:       {node.gcs_address}  (python -m cluster status --address ...)", flush=True
        )
        stop.wait()
        print("shutting down: draining in-flight requests", flush=True)
        drain(deploy)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def drain(deploy) -> None:
    """Delete the applications before Serve itself: their replicas finish what they hold for
    their grace period while the HTTP proxies stay up to deliver it (`serve.shutdown` alone
    kills the proxies at once, cutting every open stream)."""
    from ray import serve

    for application in deploy.applications:
        serve.delete(application.name, _blocking=True)
