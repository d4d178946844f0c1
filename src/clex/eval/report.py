"""Tables and plots of results (matplotlib is imported only when a plot is drawn)."""

from __future__ import annotations

import math
import textwrap
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


def _against_length(table: dict, L: int, path, xlabel: str, ylabel: str, title: str, scale: float = 1.0,
                    log_y: bool = False, ylim: tuple[float, float] | None = None) -> None:
    """One line per method: a value against length in multiples of L (log 2 axis), L marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, by_length in table.items():
        xs = sorted(by_length)
        ax.plot([x / L for x in xs], [scale * by_length[x] for x in xs], marker="o", label=method)
    ax.axvline(1.0, color="grey", linestyle=":", label=f"training length L = {L}")
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ppl(report, path: str | Path) -> None:
    """Log-scale perplexity against length in multiples of L, L marked."""
    plot_ppl_curves(report.table(), report.training_length, path, f"{Path(str(report.model)).name} on {report.data}")


def plot_ppl_curves(table: dict[str, dict[int, float]], L: int, path: str | Path, title: str) -> None:
    """``plot_ppl`` for curves given directly: label → length → perplexity."""
    _against_length(table, L, path, "evaluation length / L", "perplexity", title, log_y=True)


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


# --- generation-scored tasks (passkey, niah, ruler, longbench) -------------------------------------
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def task_markdown(report) -> str:
    """Scores in percent: per task a methods × lengths table (mean over depths and samples), per-depth
    tables where the task has depths, and an average over tasks when there are several."""
    L = report.training_length
    head = "| method | " + " | ".join(f"{_fmt_length(n)} ({n / L:g}×L)" for n in report.lengths) + " |"
    rule = "| --- |" + " --- |" * len(report.lengths)
    s = report.settings
    lines = [f"# {report.kind}: {report.model}", "",
             f"Training length L = {L}; greedy generation, cache policy {s.get('policy')}, {s.get('dtype')} on "
             f"{s.get('device')}. Scores in percent.", ""]

    def table(title: str, by_method: dict) -> None:
        lines.extend([f"## {title}", "", head, rule])
        for m in report.methods:
            lines.append(f"| {m} | " + " | ".join(_pct(by_method.get(m, {}).get(n)) for n in report.lengths) + " |")
        lines.append("")

    tasks = report.tasks()
    for task in tasks:
        metric = next(r.metric for r in report.rows if r.task == task)
        table(f"{task} ({metric})", report.table(task))
        for d in sorted({r.depth for r in report.rows if r.task == task and r.depth is not None}):
            cell = {}
            for r in report.rows:
                if r.task == task and r.depth == d:
                    cell.setdefault(r.method, {})[r.length] = r.score
            table(f"{task} at depth {d:g}%", cell)
    if len(tasks) > 1:
        table("average over tasks", report.table())
    lines.extend(["| method | task | length | depth | samples | mean prompt tokens | seconds |",
                  "| --- | --- | --- | --- | --- | --- | --- |"])
    lines.extend(f"| {r.method} | {r.task} | {r.length} | {'' if r.depth is None else f'{r.depth:g}'} | {r.samples} | "
                 f"{r.prompt_tokens:.0f} | {r.seconds:.2f} |" for r in report.rows)
    lines.append("")
    return "\n".join(lines)


def plot_task(report, path: str | Path) -> None:
    """Mean score against length in multiples of L (the average over tasks for suites)."""
    ylabel = "score (%)" if len(report.tasks()) == 1 else "mean score over tasks (%)"
    _against_length(report.table(), report.training_length, path, "prompt length / L", ylabel,
                    f"{report.kind}: {Path(str(report.model)).name}", scale=100, ylim=(-3, 103))


def plot_heatmap(report, path: str | Path) -> None:
    """Depth × length accuracy, one panel per method (green: found, red: missed)."""
    plt = _pyplot()
    depths, lengths, methods = report.depths(), report.lengths, report.methods
    size = (1.2 + 0.55 * len(lengths) * len(methods), 0.35 * len(depths) + 2)
    fig, axes = plt.subplots(1, len(methods), figsize=size, squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods, strict=True):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for r in report.rows:
            if r.method == method and r.depth is not None:
                grid[depths.index(r.depth)][lengths.index(r.length)] = 100 * r.score
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if math.isfinite(value):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(lengths)), [_fmt_length(n) for n in lengths], rotation=45, fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths], fontsize=7)
        ax.set_title(textwrap.fill(method, 24), fontsize=7)
        ax.set_xlabel("length", fontsize=8)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy (%)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
