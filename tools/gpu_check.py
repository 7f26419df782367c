"""Check the whole stack on one device: what the CPU test suite cannot prove about a GPU.

    python tools/gpu_check.py                       # one GPU: the checks, then T = 4k, 16k, 32k
    python tools/gpu_check.py --device cpu          # dry run at small shapes (the test suite runs it)

In order, each printing PASS / FAIL / SKIP and its time:
1. memory math (scan, value peek, retrieval under every visibility rule, packed documents) on
   the device in fp32 and under bf16 autocast, against the float64 loop references (CPU);
2. v1, v2 and GPT forward + backward on the device, fp32 and bf16: finite, bf16 close to fp32;
   then v2 steps with a new long-term delay each, packed and single documents: no graph
   compiled after the first step of each kind (on CUDA the scan and FlexAttention compile);
3. the layer benchmark (tools/layer_benchmark.py) at the --lengths: tokens/s, peak memory, MFU,
   time and FLOP ratios to GPT; then the retrieval kernels (tools/bench_retrieval.py): sdpa vs
   FlexAttention on packed documents, and which one the device should default to;
4. a short bf16 ``pretrain_mosaic.py`` run under torchrun (NCCL on a GPU, gloo on the CPU) that
   saves, exits, and resumes: the resumed losses must equal the uninterrupted run's;
5. ``--transformer-impl transformer_engine`` and ``--fp8-format hybrid`` runs, when
   transformer_engine is importable (SKIP otherwise).
The figures come before the training runs: on a GPU every new graph compiles first (the scan,
each FlexAttention rule), which can take minutes of a short loan, and the figures are what the
README needs from it; the kernels they time are checked against the references first.
Exit status 1 when any check fails. Nothing is downloaded (mock data, no tokenizer).

A time budget (``--budget-s``; 330 s by default on a GPU, none on the CPU) keeps one run inside
a borrowed machine's minutes: once it is spent, the checks and benchmark rows not yet started
print SKIP (time budget spent) instead of running, and the last line names them, so a run cut
short still reports everything it did measure. tools/gpu_session.sh is the recipe that carries
megatron-core to a GPU machine and runs this there.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir))
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?\| loss ([0-9.]+)")


def check_memory_math(device: torch.device) -> None:
    from tools.gpu_check_math import check_all

    for dtype in (torch.float32, torch.bfloat16):
        check_all(device, dtype)


class Budget:
    """Seconds this run may still spend (None: no limit)."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0


def _pretrain(workdir: str, extra: list[str], timeout: float) -> dict[int, float]:
    """Run pretrain_mosaic.py under torchrun (1 process); returns {iteration: loss}."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               os.path.join(REPO, "pretrain_mosaic.py"),
               "--model", "mosaic-v2", "--mock-data", "--vocab-size", "128", "--num-layers", "2",
               "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "192",
               "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "4",
               "--short-term-window", "16", "--long-term-delay-range", "4", "16", "--long-term-inference-delay", "8",
               "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--log-interval", "1",
               "--eval-iters", "0", "--per-position-eval-iters", "0", "--no-progress-bar", "--bf16"] + extra
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # its own process group: a run cut short by the timeout takes torchrun's workers with it
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise AssertionError(f"pretrain_mosaic.py exited {proc.returncode}:\n{stderr[-3000:]}")
    return {int(i): float(loss) for i, loss in LOSS.findall(stdout + stderr)}


def check_training(device: torch.device, extra: list[str] = (), resume: bool = True,
                   budget: Budget = Budget(None)) -> None:
    def run(workdir: str, arguments: list[str]) -> dict[int, float]:  # 300 s at most, never past the budget
        if budget.spent():
            raise OutOfTime()
        try:
            return _pretrain(workdir, arguments, min(300.0, budget.left()))
        except subprocess.TimeoutExpired:
            if budget.spent():
                raise OutOfTime("time budget spent during a run") from None
            raise

    with tempfile.TemporaryDirectory() as workdir:
        straight = run(workdir, ["--train-iters", "4"] + list(extra))
        if sorted(straight) != [1, 2, 3, 4]:
            raise AssertionError(f"expected the losses of iterations 1-4, got {straight}")
        print("    losses " + " ".join(f"{straight[i]:.4f}" for i in sorted(straight)))
        if not resume:
            return
        save = os.path.join(workdir, "ckpt")
        resumed = ["--train-iters", "4", "--save", save, "--load", save, "--exit-interval", "2"] + list(extra)
        first = run(workdir, resumed)
        second = run(workdir, resumed)
        if sorted(first) != [1, 2] or sorted(second) != [3, 4]:
            raise AssertionError(f"the resume ran iterations {sorted(first)} then {sorted(second)}, not 1-2, 3-4")
        got = {**first, **second}
        if got != straight:
            raise AssertionError(f"resumed losses {got} differ from the uninterrupted run's {straight}")


def check_transformer_engine(device: torch.device, budget: Budget) -> None:
    if device.type != "cuda" or importlib.util.find_spec("transformer_engine") is None:
        raise Skip("transformer_engine is not importable" if device.type == "cuda" else "needs CUDA")
    # FP8 GEMMs need dimensions divisible by 16: d and the FFN width are, and the memories' fused
    # projection (gate and decay included) is padded to it (model/fused_projection.py).
    sizes = ["--hidden-size", "256", "--num-attention-heads", "16", "--ffn-hidden-size", "768"]
    check_training(device, sizes + ["--transformer-impl", "transformer_engine"], resume=False, budget=budget)
    check_training(device, sizes + ["--transformer-impl", "transformer_engine", "--fp8-format", "hybrid"],
                   resume=False, budget=budget)


def check_benchmark(device: torch.device, lengths: list[int], repeats: int, budget: Budget) -> None:
    from megatron_mosaic.training.initialize import single_rank_megatron
    from tools.layer_benchmark import print_device_table

    from tools.bench_retrieval import compare

    with single_rank_megatron(seed=0):
        print_device_table(device, lengths, repeats, budget.spent)
    gpu = device.type == "cuda"
    compare(device, lengths, repeats, heads=16 if gpu else 4, dim=128 if gpu else 16, out_of_time=budget.spent)


class Skip(Exception):
    """A check that does not apply here (says why)."""


class OutOfTime(Skip):
    """A check not run, or cut short, because the time budget is spent."""

    def __init__(self, why: str = "time budget spent") -> None:
        super().__init__(why)


def run_checks(checks: list[tuple[str, Callable[[], None]]], budget: Budget = Budget(None)) -> int:
    failed, unrun = 0, []
    for name, check in checks:
        start = time.perf_counter()
        print(f"[{name}]", flush=True)
        try:
            if budget.spent():
                raise OutOfTime()
            check()
            status = "PASS"
        except Skip as why:
            status = f"SKIP ({why})"
            if isinstance(why, OutOfTime):
                unrun.append(name)
        except Exception as err:  # report and go on: one run shows every failure
            status = f"FAIL: {type(err).__name__}: {err}"
            failed += 1
        print(f"[{name}] {status} ({time.perf_counter() - start:.1f} s)", flush=True)
    verdict = f"{failed} check(s) failed" if failed else "all checks passed"
    if unrun:
        verdict += f"; not run for time: {' '.join(unrun)}"
    print(f"gpu_check: {verdict}")
    return 1 if failed else 0


def main() -> int:
    from tools.gpu_check_models import check_models, check_no_recompiles

    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default=default, help=f"cuda or cpu (default here: {default})")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="benchmark sequence lengths (default: 4096 16384 32768 on a GPU, 256 512 on the CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="benchmark repeats (default: 5 GPU, 2 CPU)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["math", "models", "recompiles", "bench", "training", "te"])
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting checks and benchmark rows after this many seconds "
                             "(default: 330 on a GPU, no limit on the CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available here (use --device cpu for the dry run)")
        torch.cuda.set_device(device.index or 0)
    gpu = device.type == "cuda"
    lengths = args.lengths or ([4096, 16384, 32768] if gpu else [256, 512])
    repeats = args.repeats or (5 if gpu else 2)
    seconds = args.budget_s if args.budget_s is not None else (330.0 if gpu else None)
    budget = Budget(seconds)
    print(f"gpu_check on {torch.cuda.get_device_name() if gpu else 'cpu'}, torch {torch.__version__}"
          + (f", time budget {seconds:.0f} s" if seconds is not None else ""))
    checks = [
        ("math", lambda: check_memory_math(device)),
        ("models", lambda: check_models(device)),
        ("recompiles", lambda: check_no_recompiles(device)),
        ("bench", lambda: check_benchmark(device, lengths, repeats, budget)),
        ("training", lambda: check_training(device, budget=budget)),
        ("te", lambda: check_transformer_engine(device, budget)),
    ]
    return run_checks([(n, c) for n, c in checks if n not in args.skip], budget)


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make the repository importable
        sys.path.insert(0, REPO)
    sys.exit(main())
