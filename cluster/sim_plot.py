"""Tables and plots of simulator sweeps (`python -m cluster simulate` writes both)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

COLUMNS = (
    ("replicas", lambda r: r["config"]["num_replicas"], "{}"),
    ("load", lambda r: r["load"], "{:.2f}"),
    ("policy", lambda r: r["config"]["policy"], "{}"),
    ("TTFT p50 s", lambda r: r["ttft_s"]["p50"], "{:.3f}"),
    ("TTFT p90 s", lambda r: r["ttft_s"]["p90"], "{:.3f}"),
    ("TTFT p99 s", lambda r: r["ttft_s"]["p99"], "{:.3f}"),
    ("ITL p50 ms", lambda r: r["itl_s"]["p50"] * 1e3, "{:.1f}"),
    ("ITL p99 ms", lambda r: r["itl_s"]["p99"] * 1e3, "{:.1f}"),
    ("E2E p50 s", lambda r: r["e2e_s"]["p50"], "{:.2f}"),
    ("E2E p90 s", lambda r: r["e2e_s"]["p90"], "{:.2f}"),
    ("E2E p99 s", lambda r: r["e2e_s"]["p99"], "{:.2f}"),
    ("out tok/s", lambda r: r["output_tokens_per_s"], "{:,.0f}"),
    ("hit rate", lambda r: r["prefix_hit_rate"], "{:.2f}"),
    ("busy max/mean", lambda r: r["load_imbalance"]["busy_max_over_mean"], "{:.2f}"),
    ("decision p99 us", lambda r: r["decision_us"]["p99"], "{:.0f}"),
)


def markdown_table(runs: list[dict]) -> str:
    lines = [
        "| " + " | ".join(name for name, _, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for run in runs:
        cells = [fmt.format(get(run)) for _, get, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(runs: list[dict], output_dir: Path, prefix: str) -> list[Path]:
    """TTFT p90 against load (one panel per replica count) and prefix hit rate against the
    replica count (at the highest load), one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_replicas: dict[int, list[dict]] = defaultdict(list)
    for run in runs:
        by_replicas[run["config"]["num_replicas"]].append(run)
    counts = sorted(by_replicas)
    fig, axes = plt.subplots(1, len(counts), figsize=(5 * len(counts), 4), squeeze=False)
    for ax, count in zip(axes[0], counts, strict=True):
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for run in by_replicas[count]:
            series[run["config"]["policy"]].append((run["load"], run["ttft_s"]["p90"]))
        for policy, points in sorted(series.items()):
            points.sort()
            ax.plot(*zip(*points, strict=True), marker="o", label=policy)
        ax.set(
            title=f"{count} replicas", xlabel="load (fraction of capacity)", ylabel="TTFT p90 (s)"
        )
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = output_dir / f"{prefix}-ttft-vs-load.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    if len(counts) > 1:
        top = max(run["load"] for run in runs)
        fig, ax = plt.subplots(figsize=(6, 4))
        series = defaultdict(list)
        for run in runs:
            if run["load"] == top:
                series[run["config"]["policy"]].append(
                    (run["config"]["num_replicas"], run["prefix_hit_rate"])
                )
        for policy, points in sorted(series.items()):
            points.sort()
            ax.plot(*zip(*points, strict=True), marker="o", label=policy)
        ax.set(
            title=f"prefix hit rate at load {top:g}",
            xlabel="replicas",
            ylabel="prefix-cache hit rate (tokens)",
            xscale="log",
            ylim=(0, 1),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = output_dir / f"{prefix}-hit-rate-vs-replicas.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
