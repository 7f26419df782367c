"""Before/after of the memory code in one process: the v2 layer as it is, and with the functions
of ``memory/{scan,values,features,bandwidth,retrieval}.py`` and the functions and methods of
``model/{memories,extractors}.py`` as they were at a git revision, timed interleaved with the
GPT layer (the README's per-layer before/after table).

    python tools/bench_memory_revision.py REV [--repeats 15] [--shapes quickstart long]

Only functions and methods of those files are swapped (while the old model steps), so the
revision must have the same parameters and code around them. Prints, per shape, medians in ms, time
per FLOP relative to GPT (t/f) and aten ops per fwd+bwd step for both. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("memory.scan", "memory.values", "memory.features", "memory.bandwidth", "memory.retrieval",
           "model.memories", "model.extractors")


def old_functions(rev: str) -> dict:
    """{current function: the same-named function of ``rev``} for the MODULES: their module-level
    functions and the methods of their same-named classes."""
    swap = {}
    for name in MODULES:
        modname = f"megatron_mosaic.{name}"
        new = __import__(modname, fromlist=["_"])
        path = f"megatron_mosaic/{name.replace('.', '/')}.py"
        source = subprocess.check_output(["git", "-C", REPO, "show", f"{rev}:{path}"], text=True)
        old = types.ModuleType(f"{modname}_at_{rev}")
        old.__package__ = modname.rpartition(".")[0]  # its relative imports resolve to today's package
        sys.modules[old.__name__] = old  # dataclasses look their module up by name
        exec(compile(source, f"{rev}:{path}", "exec"), old.__dict__)
        for attr, value in vars(new).items():
            if isinstance(value, types.FunctionType) and value.__module__ == modname and attr in old.__dict__:
                swap[value] = old.__dict__[attr]
            elif isinstance(value, type) and value.__module__ == modname and isinstance(old.__dict__.get(attr), type):
                for method, fn in vars(value).items():
                    if isinstance(fn, types.FunctionType) and isinstance(vars(old.__dict__[attr]).get(method),
                                                                         types.FunctionType):
                        swap[fn] = vars(old.__dict__[attr])[method]
    return swap


def rebind(table: dict) -> None:
    """Point every megatron_mosaic module's references to the keys of ``table``, and its classes'
    methods, at the values (callers import functions by name: the modules' own bindings are not
    enough)."""
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("megatron_mosaic"):
            for attr, value in list(vars(module).items()):
                if isinstance(value, types.FunctionType) and value in table:
                    setattr(module, attr, table[value])
                elif isinstance(value, type) and value.__module__ == module.__name__:
                    for method, fn in list(vars(value).items()):
                        if isinstance(fn, types.FunctionType) and fn in table:
                            setattr(value, method, table[fn])


def main() -> None:
    from megatron_mosaic.training.initialize import single_rank_megatron
    from tools.bench_layers import SHAPES
    from tools.layer_benchmark import aten_ops, build, layer_flops, step, tokens_for

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rev", help="git revision whose memory functions are the 'before'")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    a = parser.parse_args()
    torch.set_num_threads(1)
    swap = old_functions(a.rev)
    back = {new: old for old, new in swap.items()}

    def timed(kind: str, model, tokens, delay) -> float:
        if kind == "before":
            rebind(swap)
        try:
            start = time.perf_counter()
            step(model, tokens, delay, False)
            return time.perf_counter() - start
        finally:
            if kind == "before":
                rebind(back)

    with single_rank_megatron():
        print(f"before = memory functions of {a.rev}; load {os.getloadavg()[0]:.1f}")
        for name in a.shapes:
            B, T, d, H, window, delay = SHAPES[name]
            for packed in (False, True):
                models = {"gpt": build("gpt", d, H, window, delay), "before": build("v2", d, H, window, delay),
                          "after": build("v2", d, H, window, delay)}
                tokens = tokens_for(B, T, packed)
                times = {k: [] for k in models}
                for repeat in range(a.repeats + 1):  # the first round warms up
                    for kind, model in models.items():
                        seconds = timed(kind, model, tokens, delay)
                        if repeat:
                            times[kind].append(seconds)
                ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
                flop = layer_flops(models["after"], "v2", T, window, delay) / layer_flops(models["gpt"], "gpt", T, window, delay)
                rebind(swap)
                ops_before = aten_ops(models["before"], tokens, delay, False)
                rebind(back)
                ops_after = aten_ops(models["after"], tokens, delay, False)
                print(f"{name:<10} {'packed' if packed else 'single':<6} gpt {ms['gpt']:7.1f}  "
                      f"v2 before {ms['before']:7.1f} t/f {ms['before'] / ms['gpt'] / flop:.2f} ops {ops_before}  "
                      f"after {ms['after']:7.1f} t/f {ms['after'] / ms['gpt'] / flop:.2f} ops {ops_after}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
