"""Figures of the study (matplotlib, Agg backend). Each function writes ``<stem>.png`` and
``<stem>.pdf`` and returns their paths."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from qdlm_bench.study import DROP  # noqa: E402

Lines = dict[str, tuple[list, list]]  # line label -> (x values, y values)


def save(fig, stem: Path) -> list[Path]:
    """Write ``fig`` as PNG and PDF next to each other, then close it."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(f"{stem.name}.{ext}") for ext in ("png", "pdf")]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def line_panels(panels: dict[str, Lines], stem: Path, *, title: str, xlabel: str, log_y: bool = False,
                style: Callable[[str], dict] | None = None, ncols: int = 2) -> list[Path]:
    """One axes per panel (titled by its key), one line per label; ``style(label)`` gives each
    line's matplotlib keywords. ``log_y``: log scale where a panel's values span over 20x. When
    a panel has several lines, a legend of the first panel's labels sits right of the grid."""
    n = len(panels)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        for label, (x, y) in lines.items():
            ax.plot(x, y, marker="o", markersize=3, label=label, **(style(label) if style else {}))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        values = np.array([v for _, y in lines.values() for v in y], dtype=float)
        values = values[np.isfinite(values) & (values > 0)]
        if log_y and len(values) and values.max() > 20 * values.min():
            ax.set_yscale("log")
        if all(float(v).is_integer() for x, _ in lines.values() for v in x):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    if any(len(lines) > 1 for lines in panels.values()):
        fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=8)
    return save(fig, stem)


def _max_pool(a: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, int, int]:
    """Block-wise max of ``a`` down to at most rows x cols (so outliers survive); the block sizes."""
    fr, fc = math.ceil(a.shape[0] / rows), math.ceil(a.shape[1] / cols)
    padded = np.zeros((math.ceil(a.shape[0] / fr) * fr, math.ceil(a.shape[1] / fc) * fc))
    padded[:a.shape[0], :a.shape[1]] = a
    return padded.reshape(padded.shape[0] // fr, fr, padded.shape[1] // fc, fc).max(axis=(1, 3)), fr, fc


def surface(magnitude, stem: Path, *, title: str, max_tokens: int = 128, max_channels: int = 256) -> list[Path]:
    """3-D surface of |x| over (token, channel) of one layer's input ``magnitude`` [tokens, channels];
    max-pooled to at most max_tokens x max_channels."""
    z, fr, fc = _max_pool(np.abs(np.asarray(magnitude, dtype=np.float64)), max_tokens, max_channels)
    tokens, channels = np.meshgrid(np.arange(z.shape[0]) * fr, np.arange(z.shape[1]) * fc, indexing="ij")
    fig = plt.figure(figsize=(7, 5))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(channels, tokens, z, cmap="viridis", linewidth=0, antialiased=False,
                    rstride=1, cstride=1)
    ax.set_xlabel("channel")
    ax.set_ylabel("token")
    ax.set_zlabel("|x|")
    ax.view_init(elev=25, azim=-60)
    pooling = f"\n(each point: the max over {fr} token(s) x {fc} channel(s))" if fr * fc > 1 else ""
    ax.set_title(title + pooling, fontsize=10)
    return save(fig, stem)


def drop_chart(table: pd.DataFrame, stem: Path) -> list[Path]:
    """Bars of drop % per bit setting (x) and method (colour) of a study table; none without drops."""
    rows = table[(table["method"] != "fp") & (table["status"] == "done")].copy()
    rows["drop"] = pd.to_numeric(rows[DROP], errors="coerce")
    rows = rows.dropna(subset=["drop"])
    if rows.empty:
        return []
    rows = rows.drop_duplicates(["bits", "method"], keep="last")
    bits = list(dict.fromkeys(rows["bits"]))
    methods = list(dict.fromkeys(rows["method"]))
    colours = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    # one bar per (bits, method) that ran, grouped by bits with a gap between groups
    x, ticks = 0, []
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * (len(rows) + len(bits)) + 2.5), 3.4))
    for b in bits:
        group = rows[rows["bits"] == b]
        ticks.append(x + (len(group) - 1) / 2)
        for method, drop in zip(group["method"], group["drop"]):
            k = methods.index(method)
            ax.bar(x, drop, 0.85, color=colours(k % colours.N), label=method)
            x += 1
        if b != bits[-1]:
            ax.axvline(x, color="0.85", linewidth=0.8)
        x += 1
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(ticks, bits)
    ax.set_ylabel("drop % vs FP (positive = worse)")
    ax.set_title(table.attrs.get("title", ""))
    handles = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one entry per method
    ax.legend(handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save(fig, stem)


def accuracy_memory_speed(points: list[dict], stem: Path, *, title: str) -> list[Path]:
    """Accuracy against weight memory and against forward latency, one point per run (``points``:
    ``label``, ``accuracy``, ``weight_gib``, ``forward_ms``, ``runtime``: fake runs as circles,
    real runs as squares, the FP run as a star); none without points."""
    if not points:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), sharey=True)
    marker = {"fp": "*", "fake": "o", "real": "s"}
    for ax, key, xlabel in ((axes[0], "weight_gib", "linear weights (GiB, as stored)"),
                            (axes[1], "forward_ms", "forward latency (ms)")):
        for p in points:
            if p.get(key) is None or p.get("accuracy") is None:
                continue
            ax.scatter(p[key], p["accuracy"], marker=marker.get(p["runtime"], "o"), s=60 if p["runtime"] == "fp" else 36,
                       label=p["runtime"])
            ax.annotate(p["label"], (p[key], p["accuracy"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean accuracy")
    handles = dict(zip(*reversed(axes[0].get_legend_handles_labels())))
    axes[1].legend(handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, stem)
