"""Recall accuracy vs training steps for one model (examples/icl_baseline.sh).

    python examples/icl_baseline_report.py --run runs/icl/baseline/gpt --name gpt

reads RUN/eval/STEP/recall.json (tools/evaluate.py --output RUN/eval/STEP, one per saved
checkpoint) and writes RUN/steps.md, RUN/steps.csv and RUN/steps.png (the parameter count is in
the table and the legend).

    python examples/icl_baseline_report.py --run RUN --recency RUN/checkpoints/iter_0010000 --num-pairs 4

also checks one checkpoint against a shortcut the default recall documents allow: their queries
walk random permutations of the keys, so "the document's value seen longest ago" is often the
answer. With ``--query-order random`` (queries drawn uniformly, with repeats; the documents
trained on with BASELINE_QUERY_ORDER=random) that value is right only by chance, ~1/pairs.
It prints how often the model is right, how often its prediction is that value, and how often
that value is right (on tools/evaluate.py's documents: seed 4321, the training length).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_mosaic.evaluation.synthetic import QUERY_ORDERS, recall_options  # noqa: E402
from tools._cli import cli_error  # noqa: E402


def load_steps(run: str) -> list[dict]:
    """One row per evaluated checkpoint, by step: accuracy, answers, loss on answers, params."""
    root = os.path.join(run, "eval")
    rows = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        path = os.path.join(root, name, "recall.json")
        if not name.isdigit() or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            result = json.load(f)[0]
        for length in result["lengths"]:
            s = length["summary"]
            rows.append({"step": int(name), "length": length["length"], "answers": s["n"],
                         "accuracy": s["accuracy"], "answer_loss": -s["mean_logprob"],
                         "parameters": result["parameters"], "symbols": result.get("num_symbols")})
    return sorted(rows, key=lambda r: (r["step"], r["length"]))


def write(run: str, name: str, note: str, rows: list[dict]) -> list[str]:
    params, symbols = rows[0]["parameters"], rows[0]["symbols"]
    csv_path = os.path.join(run, "steps.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {name} ({params / 1e6:.2f}M parameters): recall accuracy vs training steps", "",
             note, "", f"Chance: 1/{symbols} = {1 / symbols:.3f}.", "",
             "| step | length | answers | accuracy | loss on answers |", "|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['length']} | {r['answers']} | {r['accuracy']:.3f} | {r['answer_loss']:.3f} |"
              for r in rows]
    md_path = os.path.join(run, "steps.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines + ["", "![accuracy vs steps](steps.png)", ""]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for length in sorted({r["length"] for r in rows}):
        points = [(r["step"], r["accuracy"]) for r in rows if r["length"] == length]
        ax.plot(*zip(*points), marker="o", label=f"{name} ({params / 1e6:.2f}M params), length {length}")
    ax.axhline(1 / symbols, color="grey", linestyle=":", label=f"chance 1/{symbols}")
    ax.set(xlabel="training step (8 sequences each)", ylabel="recall accuracy", ylim=(0, 1.02), title=note)
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8)
    png_path = os.path.join(run, "steps.png")
    fig.savefig(png_path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [md_path, csv_path, png_path]


def recency_shortcut(checkpoint: str, num_pairs: Optional[int], num_symbols: Optional[int], docs: int = 32,
                     query_order: str = "rounds") -> dict:
    """On ``docs`` recall documents: the model's accuracy, how often its argmax is the least
    recently seen of the document's values, and how often that value is the answer."""
    import torch

    from megatron_mosaic.evaluation.model_runner import load_model
    from megatron_mosaic.evaluation.tasks import generate_documents

    loaded = load_model(checkpoint, None, num_symbols)
    length = loaded.train_seq_length or 128
    options = recall_options(num_pairs, query_order)
    counts = {"queries": 0, "model_right": 0, "model_is_least_recent": 0, "least_recent_right": 0}
    for doc in generate_documents("recall", loaded.vocab, length, docs, 4321, **options):
        ids = [int(t) for t in doc.text.split()]
        values = set(ids[1:2 * doc.meta["pairs"]:2])
        with torch.no_grad():
            predicted = loaded.model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
        position = 0
        for segment in doc.segments:
            if segment.answer is not None:  # ids[position] answers the key at position - 1
                last_seen = {v: q for q, v in enumerate(ids[:position]) if v in values and q % 2 == 1}
                least_recent = min(last_seen, key=last_seen.get)
                counts["queries"] += 1
                counts["model_right"] += predicted[position - 1] == ids[position]
                counts["model_is_least_recent"] += predicted[position - 1] == least_recent
                counts["least_recent_right"] += least_recent == ids[position]
            position += len(segment.text.split())
    return {"parameters": loaded.parameters, **counts}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="icl_baseline_report", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--run", required=True, help="the model's run directory (holding eval/STEP/recall.json)")
    p.add_argument("--name", default="model")
    p.add_argument("--note", default="", help="one line on the recipe, shown in the table and the plot")
    p.add_argument("--recency", default=None, metavar="CHECKPOINT",
                   help="also check this checkpoint against the least-recently-seen-value shortcut")
    p.add_argument("--num-pairs", type=int, default=None, help="--recency: pairs per document (as trained)")
    p.add_argument("--num-symbols", type=int, default=None, help="--recency: symbols (as trained)")
    p.add_argument("--query-order", choices=QUERY_ORDERS, default="rounds",
                   help="--recency: the recall documents' query order (as trained)")
    args = p.parse_args(argv)
    if args.recency:
        c = recency_shortcut(args.recency, args.num_pairs, args.num_symbols, query_order=args.query_order)
        n = max(c["queries"], 1)
        print(f"{args.recency} ({c['parameters'] / 1e6:.2f}M parameters), {c['queries']} queries "
              f"({args.query_order} order): model right "
              f"{c['model_right'] / n:.3f}; its prediction is the least recently seen value {c['model_is_least_recent'] / n:.3f}; "
              f"that value alone is right {c['least_recent_right'] / n:.3f}")
        return 0
    rows = load_steps(args.run)
    if not rows:
        return cli_error("icl_baseline_report", f"no results under {args.run}/eval/STEP/recall.json")
    paths = write(args.run, args.name, args.note, rows)
    print(open(paths[0], encoding="utf-8").read().split("\n\n![")[0])
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
