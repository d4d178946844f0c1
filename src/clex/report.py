"""Tables and plots of results (matplotlib is imported only when a plot is drawn)."""

from __future__ import annotations

import math
from pathlib import Path


def _fmt_length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def ppl_markdown(report) -> str:
    """A methods × lengths perplexity table with the run's settings."""
    table = report.table()
    L = report.training_length
    head = "| method | " + " | ".join(f"{_fmt_length(n)} ({n / L:g}×L)" for n in report.lengths) + " |"
    rule = "| --- |" + " --- |" * len(report.lengths)
    rows = [
        f"| {m} | " + " | ".join(_cell(table.get(m, {}).get(n)) for n in report.lengths) + " |" for m in report.methods
    ]
    s = report.settings
    lines = [
        f"# Perplexity by length: {report.model}",
        "",
        f"Data `{report.data}`, training length L = {L}, {s.get('samples')} windows per length "
        f"(mode {s.get('mode')}, stride {s.get('stride')}), {s.get('dtype')} on {s.get('device')}.",
        "",
        head,
        rule,
        *rows,
        "",
        "| method | length | tokens | windows | seconds | peak memory (MiB) |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r.method} | {r.length} | {r.tokens} | {r.windows} | {r.seconds:.2f} | "
            f"{r.peak_memory_bytes / 2**20:.0f} |"
            for r in report.results
        ),
        "",
    ]
    return "\n".join(lines)


def _cell(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if math.isfinite(x) and x < 1e4 else f"{x:.3g}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl(report, path: str | Path) -> None:
    """Log-scale perplexity against length in multiples of L, L marked."""
    plt = _pyplot()
    L = report.training_length
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, by_length in report.table().items():
        xs = sorted(by_length)
        ax.plot([x / L for x in xs], [by_length[x] for x in xs], marker="o", label=method)
    ax.axvline(1.0, color="grey", linestyle=":", label=f"training length L = {L}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length / L")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{Path(str(report.model)).name} on {report.data}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_position(report, path: str | Path) -> None:
    """Mean NLL by position (binned) at the longest length: where each method starts to fail."""
    plt = _pyplot()
    L = report.training_length
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in report.results:
        if r.per_position:
            bins = len(r.per_position)
            centers = [(i + 0.5) * r.length / bins / L for i in range(bins)]
            ax.plot(centers, r.per_position, label=r.method)
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.set_xlabel("position / L")
    ax.set_ylabel("mean NLL (nats)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
