"""Refit tools/estimate_memory.py's activation coefficients after a change to the layers.

    python tools/fit_activation_memory.py [--model mosaic-v2 mosaic-v1] [--seq-length 1024]

For each model and each shape of a small grid (d 64/128, H 4/8, short-term window 64/256,
ffn 4d) it measures, on one CPU process in fp32, the floats per token one layer keeps for
backward: ``SavedTensorMeter`` bytes of a 2-layer model minus those of a 1-layer model (the
embedding and the output layer cancel), with no recomputation and with ``selective``. It then
solves, by least squares, the per-token model of estimate_memory.py at TP=1:

    layer floats = (R + S_d) d + S_f f + S_c + H (a + b max(w, 64))
    selective    = layer floats - core_d d - H (a + b max(w, 64))

keeping R, S_f and G (the TP/SP split, measured separately) as they are, and prints the
fitted S_d, S_c, head = (a, b) and core_d beside the current ones, with the worst relative
error of the fit. Copy them into COEFFICIENTS by hand; tests/training/test_estimate_memory.py
then checks the estimate against real 2-rank runs at other shapes. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from tools.estimate_memory import COEFFICIENTS  # noqa: E402

GRID = list(itertools.product((64, 128), (4, 8), (64, 256)))  # d, heads, window


def _layer_floats(model: str, d: int, heads: int, window: int, seq: int, selective: bool) -> float:
    from megatron_mosaic.model.context import micro_batch_context
    from megatron_mosaic.training.activation_memory import SavedTensorMeter
    from megatron_mosaic.training.arguments import parse_args
    from megatron_mosaic.training.initialize import single_rank_megatron
    from megatron_mosaic.training.model_builder import build_model, pad_vocab_size

    held = []
    for layers in (1, 2):
        argv = ["--mock-data", "--vocab-size", "256", "--model", model, "--num-layers", str(layers),
                "--hidden-size", str(d), "--num-attention-heads", str(heads), "--ffn-hidden-size", str(4 * d),
                "--seq-length", str(seq), "--micro-batch-size", "1", "--short-term-window", str(window),
                "--long-term-delay-range", "32", "32", "--hidden-dropout", "0", "--attention-dropout", "0",
                "--train-iters", "1", "--no-document-masking"]
        argv += ["--recompute-granularity", "selective"] if selective else []
        with single_rank_megatron(seed=1234):
            args = parse_args(argv, 1)
            args.padded_vocab_size = pad_vocab_size(args.vocab_size, 1)
            (chunk,) = build_model(args)
            tokens = torch.randint(0, 200, (1, seq), generator=torch.Generator().manual_seed(0))
            with SavedTensorMeter(chunk.parameters()) as meter:
                chunk(tokens, labels=tokens, packed_seq_params=micro_batch_context(tokens, 32))
            held.append(meter.bytes)
    return (held[1] - held[0]) / 4 / seq


def fit(model: str, seq: int) -> dict:
    c = COEFFICIENTS[model]
    rows, rhs, selective = [], [], []
    for d, heads, window in GRID:
        full = _layer_floats(model, d, heads, window, seq, selective=False)
        rows.append([d, 1.0, heads, heads * max(window, 64)])
        rhs.append(full - c["R"] * d - c["S_f"] * 4 * d)
        if c["core_d"]:
            selective.append((d, heads, window, full, _layer_floats(model, d, heads, window, seq, True)))
        print(f"  {model} d={d} H={heads} w={window}: {full:,.1f} floats/token/layer", flush=True)
    solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                                  torch.tensor(rhs, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1)
    s_d, s_c, a, b = solution.tolist()
    if not c["head"][1]:  # a model without a window term (v1): its b stays 0, refit without it
        solution = torch.linalg.lstsq(torch.tensor([r[:3] for r in rows], dtype=torch.float64),
                                      torch.tensor(rhs, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1)
        (s_d, s_c, a), b = solution.tolist(), 0.0
    predicted = [s_d * r[0] + s_c + a * r[2] + b * r[3] for r in rows]
    error = max(abs(p - y) / (y + 1e-9) for p, y in zip(predicted, rhs))
    core = [(full - sel - heads * (a + b * max(window, 64))) / d for d, heads, window, full, sel in selective]
    return {"S_d": s_d, "S_c": s_c, "head": (a, b), "core_d": sum(core) / len(core) if core else 0.0,
            "worst": error}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=["mosaic-v2", "mosaic-v1"], choices=sorted(COEFFICIENTS))
    parser.add_argument("--seq-length", type=int, default=1024)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    for model in opts.model:
        got, now = fit(model, opts.seq_length), COEFFICIENTS[model]
        print(f"{model}: fitted S_d={got['S_d']:.2f} S_c={got['S_c']:.1f} head=({got['head'][0]:.1f}, "
              f"{got['head'][1]:.3f}) core_d={got['core_d']:.2f} (worst fit error {got['worst']:.1%}); "
              f"now S_d={now['S_d']} S_c={now['S_c']} head={now['head']} core_d={now['core_d']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
