"""`python -m cluster serve` as an operator meets it: loopback-only Ray, friendly errors, and a
SIGTERM that drains like Ctrl-C (streams end with [DONE], exit status 0, nothing left behind)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import yaml
from conftest import free_port, wait_for

LOOPBACK = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}


def write_config(path: Path, tiny_dir: Path, port: int) -> Path:
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "continuum",
                "route_prefix": "/",
                "import_path": "cluster.app:build_app",
                "args": {
                    "served_model_name": "tiny",
                    "engine": {
                        "model": str(tiny_dir),
                        "dtype": "float32",
                        "device": "cpu",
                        "num_threads": 1,
                        "num_blocks": 256,
                        "block_size": 8,
                        "max_model_len": 1024,
                    },
                    "replicas": {
                        "num_replicas": 1,
                        "ray_actor_options": {"num_cpus": 1},
                        "graceful_shutdown_timeout_s": 3,
                    },
                },
            }
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def listening_addresses(pids: set[int]) -> dict[int, set]:
    """pid -> the addresses its listening TCP sockets are bound to."""
    listening: dict[str, ipaddress._BaseAddress] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                raw = bytes.fromhex(fields[1].split(":")[0])
                # /proc prints each 32-bit word in host (little-endian) order.
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                address = ipaddress.ip_address(raw)
                if getattr(address, "ipv4_mapped", None):
                    address = address.ipv4_mapped
                listening[fields[9]] = address
    found: dict[int, set] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and (inode := target[8:-1]) in listening:
                    found.setdefault(pid, set()).add(listening[inode])
        except OSError:
            continue
    return found


def test_a_busy_port_is_a_one_line_error(tmp_path, tiny_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "busy.yaml", tiny_dir, port)
        result = subprocess.run(
            [sys.executable, "-m", "cluster", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode != 0
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_sigterm_drains_streams_and_exits_cleanly_with_ray_on_loopback(tmp_path, tiny_dir):
    port = free_port()
    config = write_config(tmp_path / "serve.yaml", tiny_dir, port)
    env = {**os.environ, "RAY_ADDRESS": ""}  # a new local cluster, whatever else runs here
    server = subprocess.Popen(
        [sys.executable, "-m", "cluster", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(server.stdout), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200, timeout=240)
        assert any(line.startswith("metrics:") for line in output), "".join(output)

        tree = descendants(server.pid) | {server.pid}
        exposed = {
            pid: addresses - LOOPBACK
            for pid, addresses in listening_addresses(tree).items()
            if addresses - LOOPBACK
        }
        assert not exposed, f"Ray processes listen beyond loopback: {exposed}"

        (address,) = [line.split()[1] for line in output if line.startswith("ray:")]
        status = subprocess.run(
            [sys.executable, "-m", "cluster", "status", "--address", address],
            capture_output=True,
            text=True,
            timeout=120,
            env={k: v for k, v in env.items() if k != "RAY_AUTH_MODE"},
        )
        assert status.returncode == 0, status.stderr[-2000:]
        (replica,) = json.loads(status.stdout)
        assert replica["engine_alive"] and replica["free_blocks"] == replica["total_blocks"]

        # A stream longer than the replicas' 3 s grace: it must still end cleanly.
        body = {"prompt": "drain", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        events: list[str] = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line:
                    events.append(line)
                if len(events) == 3:
                    server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, "".join(output)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert events[-1] == "data: [DONE]", events[-3:]
    last = json.loads(events[-2].removeprefix("data: "))
    finished = last.get("choices") and last["choices"][0].get("finish_reason") == "length"
    assert finished or "error" in last, f"the stream was cut: {events[-3:]}"
    wait_for(lambda: not running(tree - {server.pid}), timeout=30)


def running(pids: set[int]) -> set[int]:
    """Those of `pids` still running (zombies waiting to be reaped do not count)."""
    alive = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.add(pid)
        except OSError:
            continue
    return alive


def test_status_without_a_server_is_a_one_line_error():
    command = [sys.executable, "-m", "cluster", "status"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "no Ray cluster is running" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
