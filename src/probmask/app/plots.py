"""PNG figures of a run, drawn with matplotlib's object API on the Agg canvas.

No ``pyplot`` and no global backend switch: importing this module changes nothing for a caller
that uses matplotlib interactively.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from probmask.atomic_io import atomic_write_file

__all__ = ["plot_layer_density", "plot_role_density", "plot_training"]


def _save(fig: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(fig)
    return atomic_write_file(path, lambda f: fig.savefig(f, format="png", dpi=110))


def plot_layer_density(layers: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Horizontal bars: the kept fraction of every prunable layer, with the overall density.

    Layers that carry a ``role`` (``results.json`` of a model that declares roles) are drawn grouped
    by role instead: see :func:`plot_role_density`."""
    if layers and all("role" in layer for layer in layers):
        return plot_role_density(layers, path, title)
    names = [str(layer["name"]) for layer in layers]
    density = [100.0 * layer["kept"] / layer["numel"] for layer in layers]
    total = 100.0 * sum(layer["kept"] for layer in layers) / sum(layer["numel"] for layer in layers)
    height = 1.8 + 0.32 * len(layers)
    width = 7.5 + 0.06 * max(len(n) for n in names)
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    rows = range(len(layers))
    ax.barh(rows, density, color="tab:blue", height=0.7)
    ax.set_yticks(list(rows), names, fontsize=9 if len(layers) < 30 else 7)
    ax.set_ylim(len(layers) - 0.4, -0.6)  # first layer on top, no empty margins
    ax.axvline(total, color="tab:red", linestyle="--", linewidth=1.2)
    top = max(density + [total])
    for row, (d, layer) in enumerate(zip(density, layers)):
        ax.text(max(d, total) + 0.01 * top, row, f"{d:.2f}%  ({int(layer['kept'])}/{int(layer['numel'])})",
                va="center", fontsize=8)
    ax.set_xlim(0, top * 1.45)
    ax.xaxis.set_major_formatter(PercentFormatter())
    ax.set_xlabel(f"weights kept per layer (red dashed line: all layers together, {total:.2f}%)")
    ax.set_title(title or "kept weights per layer")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, Path(path))


ROLE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan", "tab:gray")


def plot_role_density(layers: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Two panels sharing the density axis: the kept fraction of each role (all its layers together)
    on top, every layer below, grouped under its role and coloured by it; the dashed red line is
    the overall density. Roles appear in the order of their first layer."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for layer in layers:
        groups.setdefault(str(layer["role"]), []).append(layer)
    color = {role: ROLE_COLORS[i % len(ROLE_COLORS)] for i, role in enumerate(groups)}
    role_density = {r: 100.0 * sum(x["kept"] for x in g) / sum(x["numel"] for x in g) for r, g in groups.items()}
    total = 100.0 * sum(layer["kept"] for layer in layers) / sum(layer["numel"] for layer in layers)
    rows: list[tuple[float, Mapping[str, Any]]] = []  # (y position, layer): a gap of one row between roles
    y = 0.0
    for group in groups.values():
        for layer in group:
            rows.append((y, layer))
            y += 1
        y += 0.6
    names = [str(layer["name"]) for layer in layers] + list(groups)
    width = 7.5 + 0.06 * max(len(n) for n in names)
    fig = Figure(figsize=(width, 2.4 + 0.4 * len(groups) + 0.27 * len(layers)), layout="constrained")
    top_ax, ax = fig.subplots(2, 1, sharex=True, height_ratios=[0.8 + 0.55 * len(groups), y])
    density = [100.0 * layer["kept"] / layer["numel"] for _, layer in rows]
    top = max(density + list(role_density.values()) + [total])

    for row, (role, d) in enumerate(role_density.items()):
        g = groups[role]
        top_ax.barh(row, d, color=color[role], height=0.7)
        top_ax.text(max(d, total) + 0.01 * top, row, f"{d:.2f}%  ({int(sum(x['kept'] for x in g))}/"
                    f"{int(sum(x['numel'] for x in g))}, {len(g)} layer{'s' if len(g) > 1 else ''})",
                    va="center", fontsize=8)
    top_ax.set_yticks(range(len(groups)), list(groups), fontsize=9)
    top_ax.set_ylim(len(groups) - 0.4, -0.6)
    top_ax.set_title(title or "kept weights by role and layer")
    top_ax.text(0.995, 0.03, "by role", transform=top_ax.transAxes, ha="right", va="bottom", fontsize=9, color="0.35")

    ys = [pos for pos, _ in rows]
    ax.barh(ys, density, color=[color[str(layer["role"])] for _, layer in rows], height=0.7)
    ax.set_yticks(ys, [str(layer["name"]) for _, layer in rows], fontsize=8 if len(rows) < 30 else 6)
    for (pos, layer), d in zip(rows, density):
        ax.text(max(d, total) + 0.01 * top, pos, f"{d:.2f}%  ({int(layer['kept'])}/{int(layer['numel'])})",
                va="center", fontsize=7.5)
    ax.set_ylim(y - 0.9, -0.6)
    ax.text(0.995, 0.01, "per layer, grouped by role", transform=ax.transAxes, ha="right", va="bottom",
            fontsize=9, color="0.35")
    for axis in (top_ax, ax):
        axis.axvline(total, color="tab:red", linestyle="--", linewidth=1.2)
        axis.grid(axis="x", alpha=0.3)
    ax.set_xlim(0, top * 1.5)
    ax.xaxis.set_major_formatter(PercentFormatter())
    ax.set_xlabel(f"weights kept (red dashed line: all layers together, {total:.2f}%)")
    return _save(fig, Path(path))


def plot_training(history: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Three panels over all epochs: accuracy, budget and density, inverse temperature."""
    x = list(range(1, len(history) + 1))
    main = [i for i, h in enumerate(history) if h["phase"] == "main"]
    fig = Figure(figsize=(8, 8.5), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(xi, h[key]) for xi, h in zip(x, history) if h.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    acc = axes[0]
    for key, label, style in (("train_acc", "train", "--"), ("test_acc", "test (hard masks)", "-")):
        xs, ys = series(key)
        acc.plot(xs, ys, style, marker="o", markersize=3, label=label)
    acc.set_ylabel("accuracy (%)")
    acc.legend(loc="best")

    dens = axes[1]
    xs, ys = series("budget")
    dens.plot(xs, [100 * y for y in ys], "-", color="tab:red", label="budget (keep ratio)")
    xs, ys = series("density")
    dens.plot(xs, [100 * y for y in ys], "o", markersize=3, color="tab:blue", label="density (expected / fixed)")
    dens.set_yscale("log")
    dens.yaxis.set_major_formatter(PercentFormatter(decimals=1))
    dens.set_ylabel("weights kept")
    dens.legend(loc="upper right")

    temp = axes[2]
    xs, ys = series("temperature")
    temp.plot(xs, ys, "-", marker="o", markersize=3, color="tab:purple")
    temp.set_ylabel("inverse temperature T")
    temp.set_xlabel("epoch")

    for ax in axes:
        ax.grid(alpha=0.3)
        if main and len(main) < len(history):  # shade the finetuning epochs
            ax.axvspan(len(main) + 0.5, len(history) + 0.5, color="0.9", zorder=0)
    if main and len(main) < len(history):
        axes[2].text((len(main) + len(history) + 1) / 2, 0.5, "finetune\n(fixed mask)", ha="center",
                     va="center", transform=axes[2].get_xaxis_transform(), fontsize=9, color="0.3")
    axes[0].set_title(title or "training")
    return _save(fig, Path(path))
