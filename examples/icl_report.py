"""One report for several models evaluated by tools/evaluate.py: tables, CSV/JSON and plots.

    python examples/icl_report.py --runs runs/icl --models mosaic-v1 mosaic-v2 gpt

reads RUNS/MODEL/eval/TASK.json (tools/evaluate.py --output RUNS/MODEL/eval) and each model's
RUNS/MODEL/train.log (pretrain_mosaic.py's output), and writes into RUNS:
- report.md: training summary, one table per task, the plots;
- TASK.json / TASK.csv: every model's results together;
- TASK_vs_length.png, TASK_per_position.png, TASK_by_{shot,distance,depth}.png: all models per
  figure, each labelled with its parameter count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_mosaic.evaluation.report import label, table, write_outputs  # noqa: E402
from megatron_mosaic.evaluation.tasks import TASKS  # noqa: E402
from tools._cli import cli_error  # noqa: E402

# What guessing scores, so an accuracy can be read against it.
CHANCE = {
    "recall": "Chance: 1/{symbols} (any value symbol); 1/pairs for a model that only knows the answer is a value "
              "from this document.",
    "fewshot": "Chance: 1/4 among the document's four labels once they have appeared; at shot 0 no model can "
               "know the label.",
    "multidoc": "Chance: 1/{symbols} (any value symbol).",
}
FINAL = re.compile(r"final \| iteration (\d+)(?: \| validation loss ([\d.]+))?(?: \| training tokens/s ([\d,]+))?")


def training_summary(log_path: str) -> dict:
    """Iterations, final validation loss and mean training tokens/s from a pretrain log."""
    if not os.path.isfile(log_path):
        return {}
    found = {}
    for line in open(log_path, encoding="utf-8", errors="replace"):
        match = FINAL.search(line)
        if match:
            found = {"iterations": int(match.group(1)),
                     "valid_loss": float(match.group(2)) if match.group(2) else None,
                     "tokens_per_s": float(match.group(3).replace(",", "")) if match.group(3) else None}
    return found


def load_results(runs: str, models: Sequence[str]) -> dict[str, list[dict]]:
    """task -> results of every model that has them (model order kept)."""
    by_task: dict[str, list[dict]] = {}
    for model in models:
        for task in TASKS:
            path = os.path.join(runs, model, "eval", f"{task}.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    by_task.setdefault(task, []).extend(json.load(f))
    return by_task


def markdown(runs: str, models: Sequence[str], by_task: dict[str, list[dict]], plots: dict[str, list[str]]) -> str:
    lines = ["# In-context learning: Memory Mosaics v1, v2 and the GPT baseline", "",
             "| model | parameters | iterations | validation loss | training tokens/s |", "|---|---|---|---|---|"]
    params = {r["name"]: r["parameters"] for results in by_task.values() for r in results}
    for model in models:
        s = training_summary(os.path.join(runs, model, "train.log"))
        loss, speed = s.get("valid_loss"), s.get("tokens_per_s")
        lines.append(f"| {model} | {params.get(model, 0):,} | {s.get('iterations', '?')} | "
                     f"{'?' if loss is None else f'{loss:.4f}'} | {'?' if speed is None else f'{speed:,.0f}'} |")
    for task, results in by_task.items():
        lines += ["", f"## {task}: {TASKS[task].description}", "", "```", table(results), "```", ""]
        if task in CHANCE:
            lines += [CHANCE[task].format(symbols=results[0].get("num_symbols", "S")), ""]
        lines += [f"![{task}]({os.path.basename(p)})" for p in plots[task] if p.endswith(".png")]
    lines += ["", "Models: " + "; ".join(label(r) for r in next(iter(by_task.values()), []))]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="icl_report", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--runs", required=True, help="directory holding one sub-directory per model")
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--output", default=None, help="default: --runs")
    args = p.parse_args(argv)
    by_task = load_results(args.runs, args.models)
    if not by_task:
        return cli_error("icl_report", f"no results under {args.runs}/MODEL/eval/*.json for {', '.join(args.models)}")
    out = args.output or args.runs
    plots = {task: write_outputs(results, out, task) for task, results in by_task.items()}
    report = os.path.join(out, "report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write(markdown(args.runs, args.models, by_task, plots))
    for results in by_task.values():
        print(table(results), end="\n\n")
    print(f"report: {os.path.abspath(report)} (+ TASK.json/.csv and plots in {os.path.abspath(out)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
