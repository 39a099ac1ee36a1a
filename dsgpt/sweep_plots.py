"""A sweep's plots (matplotlib, PNG, in the sweep dir):

- objective_vs_<key>.png for each swept key: each configuration's objective (mean, with the repeats'
  std as an error bar) against its value of the key; pruned trials hollow, at the value they had
  when they stopped; diverged and failed trials as crosses along the top edge.
- curves.png: the objective's metric (val/loss by default) against the training step for every run
  of every configuration, the best configuration drawn thickest; pruned runs dashed.
"""

from __future__ import annotations

import re

from dsgpt.train.pruning import read_metrics

STYLE = {"complete": dict(marker="o", color="C0"), "pruned": dict(marker="o", mfc="none", color="C1")}


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _log_scale(spec, key: str, values: list) -> bool:
    axis = spec.space[key]
    if isinstance(axis, dict):
        return axis["type"] == "loguniform"
    positive = [v for v in axis if _numeric([v]) and v > 0]
    return len(positive) == len(axis) and max(positive) / min(positive) >= 100


def _file_name(key: str) -> str:
    return "objective_vs_" + re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png"


def write_plots(spec, rows: list[dict]) -> list:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    written = []
    for key in spec.space:
        written.append(_objective_plot(plt, spec, rows, key))
    written.append(_curves_plot(plt, spec, rows))
    return written


def _objective_plot(plt, spec, rows: list[dict], key: str):
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    values = [r["params"].get(key) for r in rows]
    numeric = _numeric(values)
    categories = [] if numeric else sorted({str(v) for v in values})

    def x_of(v):
        return v if numeric else categories.index(str(v))

    for status, style in STYLE.items():
        pts = [r for r in rows if r["status"] == status and r["value"] is not None]
        if pts:
            ax.errorbar([x_of(r["params"].get(key)) for r in pts], [r["value"] for r in pts],
                        yerr=[r["std"] or 0.0 for r in pts], linestyle="none", capsize=3, label=status, **style)
    bad = [r for r in rows if r["status"] in ("diverged", "failed")]
    if bad:
        # No value to place them by: along the top edge, so the values that fail still show.
        ax.plot([x_of(r["params"].get(key)) for r in bad], [1.0] * len(bad), "x", color="C3",
                transform=ax.get_xaxis_transform(), clip_on=False, label="diverged / failed")
    if numeric and _log_scale(spec, key, values):
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(key)
    ax.set_ylabel(f"{spec.mode} {spec.metric}")
    ax.set_title(f"sweep {spec.name}: {spec.mode} {spec.metric} ({spec.direction}) vs {key}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    path = spec.dir / _file_name(key)
    _save(fig, path)
    plt.close(fig)
    return path


def _curves_plot(plt, spec, rows: list[dict]):
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    best = next((r for r in rows if r["status"] == "complete"), None)
    for i, r in enumerate(rows):
        label = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in r["params"].items())
        if len(rows) > 12 and r is not best:
            label = None  # a legend that long hides the plot: name the best one only
        for run_dir in sorted((spec.dir / "runs").glob(f"{r['config']}-s*")):
            points = [(m["step"], m[spec.metric]) for m in read_metrics(run_dir)
                      if isinstance(m.get(spec.metric), (int, float))]
            if not points:
                continue
            ax.plot(*zip(*points), color=f"C{i % 10}", linestyle="--" if r["status"] == "pruned" else "-",
                    linewidth=2.5 if r is best else 1.0, marker="o" if len(points) == 1 else None,
                    label=label and f"{label} ({r['status']})")
            label = None  # one legend entry per configuration
    ax.set_xlabel("step")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"sweep {spec.name}: {spec.metric} of every run")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small", loc="best")
    ax.grid(alpha=0.3)
    path = spec.dir / "curves.png"
    _save(fig, path)
    plt.close(fig)
    return path


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _save(fig, path) -> None:
    import os
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    os.replace(tmp, path)
