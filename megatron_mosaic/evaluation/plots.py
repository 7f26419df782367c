"""Plots of evaluation results (matplotlib, Agg): accuracy vs length, accuracy by shot /
distance / depth, loss per position. Every legend names the parameter count."""

from __future__ import annotations

import os
from typing import Sequence

from .report import label

GROUP_TITLES = {"shot": "shot index (earlier examples of the class)", "distance": "key-to-query distance (tokens)",
                "depth": "depth of the fact in the context"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_vs_length(all_results: Sequence[dict], path: str) -> str:
    """Accuracy (answer tasks) or mean loss (lm) against the evaluation length, per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for res in all_results:
        xs = [at["length"] for at in res["lengths"]]
        has_answers = "summary" in res["lengths"][0]
        ys = [at["summary"]["accuracy"] if has_answers else at["mean_loss"] for at in res["lengths"]]
        ax.plot(xs, ys, marker="o", label=label(res))
        if res.get("train_seq_length"):
            ax.axvline(res["train_seq_length"], color="gray", linestyle=":", linewidth=1)
    task = all_results[0]["task"]
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens; dotted: training length)")
    ax.set_ylabel("answer accuracy" if "summary" in all_results[0]["lengths"][0] else "mean loss (nats/token)")
    ax.set_title(f"{task}: vs evaluation length")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_grouped(all_results: Sequence[dict], field: str, path: str) -> str:
    """Accuracy by bins of ``field``: one panel per evaluation length, one line per model."""
    plt = _pyplot()
    lengths = sorted({at["length"] for res in all_results for at in res["lengths"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.8), dpi=120, squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for res in all_results:
            for at in res["lengths"]:
                rows = at["length"] == length and at.get("summary", {}).get("by", {}).get(field)
                if rows:
                    ax.plot([r["bin"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=label(res))
        ax.set_title(f"{all_results[0]['task']} @ {length} tokens")
        ax.set_xlabel(GROUP_TITLES.get(field, field))
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(axis="x", labelrotation=45)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_per_position(all_results: Sequence[dict], path: str) -> str:
    """Loss per position (log-spaced bins): one panel per model, one line per length."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(all_results), figsize=(5 * len(all_results), 3.8), dpi=120,
                             squeeze=False, sharey=True)
    for ax, res in zip(axes[0], all_results):
        for at in res["lengths"]:
            bins = at["per_position"]
            centres = [(b["first"] * b["last"]) ** 0.5 for b in bins]
            ax.plot(centres, [b["loss"] for b in bins], marker="o", label=f"length {at['length']}")
        if res.get("train_seq_length"):
            ax.axvline(res["train_seq_length"], color="gray", linestyle=":", linewidth=1,
                       label="training length")
        ax.set_xscale("log", base=2)
        ax.set_title(label(res), fontsize=9)
        ax.set_xlabel(f"{res['task']}: token position (log-spaced bins)")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_all(all_results: Sequence[dict], out_dir: str, stem: str) -> list[str]:
    paths = [plot_vs_length(all_results, os.path.join(out_dir, f"{stem}_vs_length.png")),
             plot_per_position(all_results, os.path.join(out_dir, f"{stem}_per_position.png"))]
    fields = [f for f in all_results[0]["lengths"][0].get("summary", {}).get("by", {}) if f != "query"]
    for field in fields:
        paths.append(plot_grouped(all_results, field, os.path.join(out_dir, f"{stem}_by_{field}.png")))
    return paths
