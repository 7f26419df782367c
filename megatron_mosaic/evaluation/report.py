"""Evaluation results as a printed table, CSV, JSON and plots (one or several models).

A *results* dict is what ``run.evaluate_task`` returns: one model, one task, several lengths.
Every function here takes a list of them, so tools/evaluate.py (one model) and
examples/icl_report.py (several models) write the same files.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Sequence

CSV_FIELDS = ("model", "parameters", "task", "length", "group", "bin", "n", "accuracy", "mean_logprob", "loss")


def label(results: dict) -> str:
    """A model's name with its parameter count: printed next to every figure."""
    return f"{results['name']} ({results['parameters'] / 1e6:.2f}M params)"


def _fmt(value) -> str:
    return "" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def csv_rows(all_results: Sequence[dict]) -> list[dict]:
    rows = []
    for res in all_results:
        base = {"model": res["name"], "parameters": res["parameters"], "task": res["task"]}
        for at in res["lengths"]:
            common = {**base, "length": at["length"]}
            summary = at.get("summary")
            rows.append({**common, "group": "all", "bin": "", "loss": at["mean_loss"],
                         **({k: summary[k] for k in ("n", "accuracy", "mean_logprob")} if summary else {})})
            for field, table in (summary or {}).get("by", {}).items():
                rows += [{**common, "group": field, "bin": r["bin"], "n": r["n"], "accuracy": r["accuracy"],
                          "mean_logprob": r["mean_logprob"]} for r in table]
            rows += [{**common, "group": "position", "bin": f"{b['first']}-{b['last']}", "n": b["tokens"],
                      "loss": b["loss"]} for b in at["per_position"]]
    return rows


def write_outputs(all_results: Sequence[dict], out_dir: str, stem: str) -> list[str]:
    """``stem``.json, ``stem``.csv and the plots into ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{stem}.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(list(all_results), f, indent=1)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        for row in csv_rows(all_results):
            writer.writerow({k: _fmt(row.get(k)) for k in CSV_FIELDS})
    from .plots import plot_all

    return [json_path, csv_path] + plot_all(all_results, out_dir, stem)


def table(all_results: Sequence[dict]) -> str:
    """One line per model and length: accuracy (answer tasks) and mean loss, then the groups."""
    lines = [f"{'model':<34} {'task':<9} {'length':>7} {'x train':>7} {'answers':>8} {'accuracy':>9} "
             f"{'loss':>7}"]
    groups = []
    for res in all_results:
        train = res.get("train_seq_length")
        for at in res["lengths"]:
            s = at.get("summary")
            ratio = f"{at['length'] / train:g}" if train else "?"
            acc = f"{s['accuracy']:.3f}" if s and s["n"] else "-"
            lines.append(f"{label(res):<34} {res['task']:<9} {at['length']:>7} {ratio:>7} "
                         f"{(s or {}).get('n', 0):>8} {acc:>9} {at['mean_loss']:>7.3f}")
            for field, rows in (s or {}).get("by", {}).items():
                if field == "query":
                    continue  # per-query accuracy is in the CSV; distance tells the story
                cells = " ".join(f"{r['bin']}:{r['accuracy']:.2f}" for r in rows)
                groups.append(f"  {res['name']} @ {at['length']} by {field}: {cells}")
    return "\n".join(lines + groups)
