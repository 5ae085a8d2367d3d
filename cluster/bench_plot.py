"""Plots from benchmark result files: latency CDFs, and throughput against load."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def plot_results(paths: list[Path], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(path, json.loads(path.read_text())) for path in paths]
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    for path, run in runs:
        label = run.get("label") or path.stem
        for ax, metric in zip(axes[:3], ("ttft", "tpot", "e2e"), strict=True):
            values = sorted(
                r[metric] * 1000 for r in run["per_request"] if r.get(metric) is not None
            )
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
    for ax, title in zip(axes[:3], ("TTFT", "TPOT", "end-to-end latency"), strict=True):
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    # Throughput against offered load: one line per server label.
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for path, run in runs:
        load = run.get("request_rate") or run.get("concurrency")
        if load:
            series[run.get("server") or run.get("label") or path.stem].append(
                (load, run["summary"]["output_token_throughput"])
            )
    ax = axes[3]
    for name, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set(
        title="output throughput vs load",
        xlabel="request rate (req/s) or concurrency",
        ylabel="tokens/s",
    )
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
