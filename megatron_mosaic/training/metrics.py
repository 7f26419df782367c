"""What a run reports: log lines, a progress bar, TensorBoard scalars, the per-position loss curve.

Only global rank 0 writes anything; the training loop has already reduced every number so all
ranks hold the same values.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from typing import Optional, Sequence

import torch


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


class TrainingReporter:
    """Log lines every ``log_interval`` iterations, a tqdm bar on a terminal, TensorBoard scalars.

    Throughput counts only the time inside training steps (the caller times each step), so
    evaluations and checkpoint saves do not distort tokens/s, ms/iter or the ETA.
    """

    def __init__(self, *, rank: int, train_iters: int, start_iteration: int, log_interval: int,
                 tokens_per_iteration: int, tensorboard_dir: Optional[str], progress_bar: bool,
                 flops_per_sample: Optional[float] = None, world_size: int = 1,
                 seq_length: Optional[int] = None):
        self.enabled = rank == 0
        self.flops_per_sample = flops_per_sample  # --log-throughput
        self.world_size = world_size
        self.seq_length = seq_length  # tokens per sample, when steps report their samples
        self.last_scalars: dict[str, float] = {}  # the numbers of the last log line
        self.train_iters = train_iters
        self.log_interval = log_interval
        self.tokens_per_iteration = tokens_per_iteration
        self._window = [0, 0.0, 0.0, 0]  # iterations, seconds, loss sum, samples since last log
        self.total_iters = 0
        self.total_seconds = 0.0
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=train_iters, initial=start_iteration, unit="it", dynamic_ncols=True)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    @property
    def mean_tokens_per_s(self) -> Optional[float]:
        """Throughput over every training step of this run."""
        if self.total_iters == 0 or self.total_seconds <= 0.0:
            return None
        return self.tokens_per_iteration * self.total_iters / self.total_seconds

    def iteration_done(self, iteration: int, loss: float, lr: float, grad_norm: float,
                       consumed_samples: int, step_seconds: float, samples: int = 0) -> int:
        """Record one finished iteration (1-based ``iteration``); log when the interval is due.

        Returns the iterations the log line covers (0 when none is due), the same on every rank."""
        self._window[0] += 1
        self._window[1] += step_seconds
        self._window[2] += loss
        self._window[3] += samples
        self.total_iters += 1
        self.total_seconds += step_seconds
        due = not (iteration % self.log_interval and iteration != self.train_iters)
        window = self._window[0]
        if not self.enabled:
            if due:
                self._window = [0, 0.0, 0.0, 0]
            return window if due else 0
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, iteration)
            self.writer.add_scalar("train/lr", lr, iteration)
            self.writer.add_scalar("train/grad_norm", grad_norm, iteration)
        if not due:
            return 0
        iters, seconds, loss_sum, window_samples = self._window
        self._window = [0, 0.0, 0.0, 0]
        ms_per_iter = 1000.0 * seconds / iters
        # Samples actually trained (a batch-size ramp changes them); else the nominal batch.
        tokens = (window_samples * self.seq_length if window_samples and self.seq_length
                  else self.tokens_per_iteration * iters)
        tokens_per_s = tokens / max(seconds, 1e-9)
        eta = (self.train_iters - iteration) * ms_per_iter / 1000.0
        line = (f" iteration {iteration:>7d}/{self.train_iters} | consumed samples {consumed_samples:>9d} "
                f"| loss {loss_sum / iters:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} "
                f"| tokens/s {tokens_per_s:,.0f} | ms/iter {ms_per_iter:.1f} | ETA {format_duration(eta)}")
        self.last_scalars = {"train/tokens_per_s": tokens_per_s, "train/ms_per_iter": ms_per_iter,
                             "train/loss": loss_sum / iters, "train/lr": lr}
        if self.flops_per_sample is not None and window_samples:
            # Megatron-LM's "throughput per GPU (TFLOP/s/GPU)": model FLOPs / time / devices.
            tflops = (self.flops_per_sample * window_samples
                      / (max(seconds, 1e-9) * 1e12 * self.world_size))
            line += f" | TFLOP/s/device {tflops:.3g}"
            self.last_scalars["throughput"] = tflops
        self.print(line)
        if self.writer is not None:
            self.writer.add_scalar("train/tokens_per_s", tokens_per_s, iteration)
            self.writer.add_scalar("train/ms_per_iter", ms_per_iter, iteration)
        return iters

    def validation(self, iteration: int, loss: float, tag: str = "validation") -> None:
        ppl = math.exp(min(loss, 50.0))
        self.print(f" {tag} at iteration {iteration} | loss {loss:.4f} | perplexity {ppl:.3f}")
        if self.writer is not None:
            self.writer.add_scalar(f"{tag}/loss", loss, iteration)
            self.writer.add_scalar(f"{tag}/perplexity", ppl, iteration)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def write_per_position_loss(out_dir: str, loss_sum: torch.Tensor, counts: torch.Tensor,
                            title: str = "validation loss per token position") -> tuple[str, str]:
    """CSV (position, loss, tokens) and a PNG plot of the mean loss at each position (T,).

    The curve is the paper's in-context-learning picture: loss falls with position as the
    memories fill with the sequence's own pairs.
    """
    os.makedirs(out_dir, exist_ok=True)
    mean = (loss_sum.double() / counts.double().clamp(min=1)).tolist()
    csv_path = os.path.join(out_dir, "per_position_loss.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["position", "loss", "tokens"])
        for pos, (value, count) in enumerate(zip(mean, counts.tolist())):
            writer.writerow([pos, f"{value:.6f}", int(count)])
    png_path = os.path.join(out_dir, "per_position_loss.png")
    _plot(mean, counts.tolist(), png_path, title)
    return csv_path, png_path


def log_binned(values: Sequence[float], counts: Sequence[float]) -> tuple[list[float], list[float]]:
    """Token-weighted means over positions 1, 2, 3-4, 5-8, ... (1-based): a readable curve from
    per-position means that are noisy at a few hundred sequences. Returns (bin centres, means)."""
    bins, low = [], 1
    while low <= len(values):
        bins.append([low, min(2 * low - 1, len(values))])
        low *= 2
    if len(bins) > 1 and 2 * (bins[-1][1] - bins[-1][0] + 1) < bins[-2][1] - bins[-2][0] + 1:
        last = bins.pop()  # a short last bin would be as noisy as a single position
        bins[-1][1] = last[1]
    centres, means = [], []
    for low, high in bins:
        weight = sum(counts[low - 1:high])
        if weight > 0:
            total = sum(v * c for v, c in zip(values[low - 1:high], counts[low - 1:high]))
            centres.append((low * high) ** 0.5)
            means.append(total / weight)
    return centres, means


def _plot(mean: Sequence[float], counts: Sequence[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = list(range(1, len(mean) + 1))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(positions, mean, linewidth=0.8, alpha=0.35, label="per position")
    ax.plot(*log_binned(mean, counts), marker="o", linewidth=1.8, label="log-spaced bins")
    ax.set_xscale("log")
    ax.set_xlabel("token position in the sequence (1-based, log scale)")
    ax.set_ylabel("mean validation loss (nats)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
