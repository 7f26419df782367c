"""Before/after of the Mosaic v2 layer in one process: the layer of the working tree against the
same layer built by the ``megatron_mosaic`` package of a git revision, timed interleaved with the
GPT layer (the README's per-layer before/after table); each is its model's decoder alone, forward
and backward (tools/layer_benchmark.layer_step, as tools/bench_layers.py times it).

    python tools/bench_memory_revision.py REV [--repeats 15] [--shapes quickstart long] [--percentile 50]

The revision's package is taken whole (``git archive``) into a temporary directory and imported
under another name, so any change is compared, structure and parameters included; both models
are built from the same seed and step on the same tokens. Interleaving makes the ratio robust to
this machine's drifting speed. Prints, per shape and document kind, the step time in ms (the
median, or ``--percentile``), time per FLOP relative to the GPT layer (t/f; analytic FLOPs of
the working tree's layer) and aten ops per fwd+bwd, before and after. Not a test.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_revision(rev: str, workdir: str):
    """The ``megatron_mosaic`` package of ``rev``, imported as ``megatron_mosaic_<rev>``."""
    name = "megatron_mosaic_" + re.sub(r"\W", "_", rev)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "megatron_mosaic"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", workdir], input=archive, check=True)
    os.rename(os.path.join(workdir, "megatron_mosaic"), os.path.join(workdir, name))
    for folder, _, files in os.walk(os.path.join(workdir, name)):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                with open(path) as f:
                    source = f.read()
                with open(path, "w") as f:  # its absolute imports of itself
                    f.write(re.sub(r"\bmegatron_mosaic\b", name, source))
    sys.path.insert(0, workdir)
    return importlib.import_module(name)


def main() -> None:
    from megatron_mosaic.training.initialize import single_rank_megatron
    from tools.bench_layers import SHAPES
    from tools.layer_benchmark import aten_ops, build, layer_flops, layer_step, time_steps, tokens_for

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rev", help="git revision whose v2 layer is the 'before'")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--percentile", type=float, default=50.0,
                        help="which step time to report (50: the median; lower: less of the machine's noise)")
    a = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir, single_rank_megatron():
        old = import_revision(a.rev, workdir)
        print(f"before = megatron_mosaic at {a.rev}; load {os.getloadavg()[0]:.1f}; "
              f"{a.percentile:g}th percentile of {a.repeats} interleaved steps")
        for name in a.shapes:
            B, T, d, H, window, delay = SHAPES[name]
            for packed in (False, True):
                models = {"gpt": build("gpt", d, H, window, delay),
                          "before": build("v2", d, H, window, delay, package=old),
                          "after": build("v2", d, H, window, delay)}
                tokens = tokens_for(B, T, packed)
                steps = {k: layer_step(m, tokens, delay, False) for k, m in models.items()}
                ms = {k: 1000 * v for k, v in time_steps(steps, tokens.device, a.repeats, a.percentile).items()}
                flop = layer_flops(models["after"], "v2", T, window, delay) / layer_flops(models["gpt"], "gpt", T, window, delay)
                ops = {k: aten_ops(models[k], tokens, delay, False) for k in ("before", "after")}
                print(f"{name:<10} {'packed' if packed else 'single':<6} gpt {ms['gpt']:7.1f}  "
                      f"v2 before {ms['before']:7.1f} t/f {ms['before'] / ms['gpt'] / flop:.2f} ops {ops['before']}  "
                      f"after {ms['after']:7.1f} t/f {ms['after'] / ms['gpt'] / flop:.2f} ops {ops['after']}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
