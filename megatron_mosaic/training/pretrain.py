"""``pretrain_mosaic.py``'s body: set up, train with periodic eval/save, final evaluation.

``pretrain(args)`` runs inside an existing (or new) process group and returns a summary dict,
so tests drive exactly the code path users run.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import os
import signal
import sys
import time
from typing import Any, Iterator, Optional, Sequence

import torch.distributed as dist

from megatron_mosaic.training.arguments import args_to_dict, parse_args, tokens_per_iteration
from megatron_mosaic.training.checkpoint_state import CheckpointMismatchError, check_checkpoint_matches
from megatron_mosaic.training.checkpointing import load_checkpoint, save_checkpoint
from megatron_mosaic.training.data import build_data, make_iterators
from megatron_mosaic.training.checkpoint_safety import (
    check_save_dir,
    global_checkpoint_bytes,
    resolve_load,
)
from megatron_mosaic.training.exit_control import ExitController
from megatron_mosaic.training import process_guard
from megatron_mosaic.training.async_checkpoint import AsyncCheckpointWriter
from megatron_mosaic.training.faults import agree, report_error
from megatron_mosaic.training.initialize import (
    destroy_distributed,
    initialize_distributed,
    world_size_from_env,
)
from megatron_mosaic.training.loop import (
    TrainingDivergedError,
    TrainState,
    evaluate,
    train_step,
)
from megatron_mosaic.training.metrics import TrainingReporter, write_per_position_loss
from megatron_mosaic.training.model_builder import build_model, pad_vocab_size, wrap_for_training
from megatron_mosaic.training.batch_schedule import init_batch_schedule
from megatron_mosaic.training.flops import model_flops_per_sample
from megatron_mosaic.training.observability import Observability
from megatron_mosaic.training.megatron_optimizer import MegatronOptimizer
from megatron_mosaic.training.optimizer import build_scheduler


class Run:
    """A training run's objects; ``fit()`` trains, ``finish()`` evaluates and reports."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rank = dist.get_rank()
        self.data = agree(lambda: build_data(args), "reading the data")
        args.padded_vocab_size = pad_vocab_size(self.data.vocab_size, args.tensor_model_parallel_size,
                                                args.make_vocab_size_divisible_by)
        args.eod_token_id = self.data.eod_token_id
        self.load_path = self._check_load() if args.load else None
        if self.load_path is not None:
            check_checkpoint_matches(args)
        sharded = getattr(args, "use_distributed_optimizer", False)
        self.model = wrap_for_training(build_model(args), use_distributed_optimizer=sharded,
                                       overlap_grad_reduce=getattr(args, "overlap_grad_reduce", False),
                                       overlap_param_gather=getattr(args, "overlap_param_gather", False),
                                       bf16=args.bf16)
        self.optimizer = MegatronOptimizer(self.model, args)
        self.scheduler = build_scheduler(self.optimizer, args)
        if args.save:
            self._check_save()
        self.obs = Observability(args, self.rank)
        if args.timing_log_level > 0:  # Megatron's schedules and grad sync time themselves
            self.model[0].config.timers = self.obs.timers
        init_batch_schedule(args, self.rank)
        self.state = TrainState()
        if self.load_path is not None:
            self._load()
        flops = model_flops_per_sample(args, self.model) if args.log_throughput else None
        self.reporter = TrainingReporter(
            rank=self.rank, train_iters=args.train_iters, start_iteration=self.state.iteration,
            log_interval=args.log_interval, tokens_per_iteration=tokens_per_iteration(args),
            tensorboard_dir=args.tensorboard_dir, progress_bar=args.progress_bar,
            flops_per_sample=flops, world_size=dist.get_world_size(), seq_length=args.seq_length)
        self.losses: list[float] = []
        self.async_writer = AsyncCheckpointWriter() if getattr(args, "async_save", False) else None
        self.saved_iteration: Optional[int] = None
        self.last_validation: Optional[tuple[int, float]] = None

    def _load(self) -> None:
        """--load: everything to resume; with --finetune the weights only, from iteration 0."""
        args = self.args
        keep_optim = not (args.no_load_optim or args.finetune)
        loaded = load_checkpoint(args.load, self.model, self.optimizer if keep_optim else None,
                                 self.scheduler if keep_optim else None,
                                 load_rng=not (args.no_load_rng or args.finetune))
        if not args.finetune:
            self.state = TrainState(loaded["iteration"], loaded["consumed_samples"])
        if loaded["args"] is not None:
            what = "weights for finetuning" if args.finetune else "checkpoint"
            self.log(f" loaded {what} from {args.load} (saved at iteration {loaded['iteration']})")

    def _check_load(self) -> Optional[str]:
        """The checkpoint --load names, verified file by file before any model exists; None
        (said on rank 0) when the directory holds none yet. A missing path is an error."""
        args = self.args
        path = agree(lambda: resolve_load(args.load, args.save), "checking --load")
        if path is None:
            self.log(f" no checkpoint in {args.load}, starting from scratch")
        return path

    def _check_save(self) -> None:
        """--save: a writable directory with room for one checkpoint, before training starts;
        leftovers of saves a crash interrupted are removed."""
        args = self.args
        needed = global_checkpoint_bytes(self.model, with_optimizer=not getattr(args, "no_save_optim", False))
        local_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
        agree(lambda: check_save_dir(args.save, needed, clean=local_first), "checking --save")

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def save(self) -> None:
        if not self.args.save or self.saved_iteration == self.state.iteration:
            return
        self.finish_saves(blocking=True)  # --async-save: one save in the background at a time
        no_optim = self.args.no_save_optim  # Megatron-LM: neither optimizer nor scheduler
        with self.obs.timed("save-checkpoint"):
            path = save_checkpoint(self.args.save, self.state.iteration, self.model,
                                   None if no_optim else self.optimizer,
                                   None if no_optim else self.scheduler,
                                   args=args_to_dict(self.args),
                                   consumed_samples=self.state.consumed_samples,
                                   save_rng=not self.args.no_save_rng,
                                   async_writer=self.async_writer)
        self.saved_iteration = self.state.iteration
        if self.async_writer is None:
            self.reporter.print(f" saved checkpoint {path}")
        else:
            self.reporter.print(f" saving checkpoint {path} in the background")

    def finish_saves(self, blocking: bool = False) -> None:
        """--async-save: complete the background saves every rank has written (all of them
        with ``blocking``); each becomes the latest checkpoint now (a collective call)."""
        if self.async_writer is not None:
            for path in self.async_writer.finalize(blocking=blocking):
                self.reporter.print(f" saved checkpoint {path}")

    def _log_extras(self, iteration: int, iterations: int) -> None:
        """At a log line: timers (collective), memory scalars, wandb."""
        timers = self.obs.timers_report(iterations)
        if timers:
            self.reporter.print(timers)
        self.obs.scalars(iteration, self.reporter.last_scalars, self.reporter.writer)

    def _valid_iterators(self) -> list[Iterator[dict]]:
        # Restarted at sample 0 each time: every evaluation sees the same batches.
        return make_iterators(self.args, self.data.valid, 0, len(self.model), cycle=True)

    def validate(self) -> float:
        """Validation loss now (not recomputed if this iteration was already evaluated)."""
        if self.last_validation is not None and self.last_validation[0] == self.state.iteration:
            return self.last_validation[1]
        with self.obs.evaluation():
            loss, _ = evaluate(self.args, self.model, self._valid_iterators(), self.args.eval_iters)
        self.reporter.validation(self.state.iteration, loss)
        self.last_validation = (self.state.iteration, loss)
        return loss

    def fit(self) -> Optional[str]:
        """Train to --train-iters; returns the early-exit reason, if any."""
        args = self.args
        exit_control = ExitController(handle_sigterm=args.exit_signal_handler,
                                      duration_mins=args.exit_duration_in_mins,
                                      exit_interval=args.exit_interval)
        iterators = make_iterators(args, self.data.train, self.state.consumed_samples,
                                   len(self.model))
        try:
            while self.state.iteration < args.train_iters:
                self.obs.step_start(self.state.iteration)
                start = time.perf_counter()
                result = train_step(args, self.model, self.optimizer, self.scheduler, iterators,
                                    self.state, timer=self.obs.timer)
                self.losses.append(result.loss)
                it = self.state.iteration
                self.obs.step_end(it)
                self.finish_saves()
                logged = self.reporter.iteration_done(it, result.loss, result.lr, result.grad_norm,
                                                      self.state.consumed_samples,
                                                      step_seconds=time.perf_counter() - start,
                                                      samples=result.samples)
                if logged:
                    self._log_extras(it, logged)
                # finish() evaluates the last iteration anyway (with the per-position pass).
                if (args.eval_iters and self.data.valid is not None and it % args.eval_interval == 0
                        and it != args.train_iters):
                    self.validate()
                if args.save_interval and it % args.save_interval == 0:
                    self.save()
                reason = exit_control.should_exit(it)
                if reason:
                    self.reporter.print(f" exiting at iteration {it}: {reason}")
                    if args.save:
                        self.save()
                    else:
                        self.reporter.print(" WARNING: no --save given, nothing was saved")
                    self.finish_saves(blocking=True)
                    return reason
        except TrainingDivergedError:
            self.finish_saves(blocking=True)  # the checkpoint being written is of finite weights
            raise
        finally:
            exit_control.release()
        self.save()
        self.finish_saves(blocking=True)
        return None

    def _per_position_data(self) -> tuple[argparse.Namespace, list[Iterator[dict]]]:
        """Arguments and validation batches of the per-position pass: the training ones, or at
        --eval-seq-length a validation set cut to that length (the schedules, the pipeline's
        tensor shapes and the per-position sums all follow args.seq_length)."""
        args = self.args
        if args.eval_seq_length == args.seq_length:
            return args, self._valid_iterators()
        long_args = copy.copy(args)
        long_args.seq_length = args.eval_seq_length
        long_args.train_iters = 0  # build_data needs a training set; keep it to one batch
        valid = build_data(long_args).valid
        return long_args, make_iterators(long_args, valid, 0, len(self.model), cycle=True)

    @property
    def output_dir(self) -> Optional[str]:
        """Where the run's own files go: --tensorboard-dir, else --save; None when the user
        asked for neither (an ad-hoc run must not litter the directory it was started in)."""
        return self.args.tensorboard_dir or self.args.save or None

    def _per_position(self) -> dict[str, Any]:
        """Validation loss per token position, written as CSV + PNG; also the mean loss."""
        args, iterators = self._per_position_data()
        loss, per_position = evaluate(args, self.model, iterators, args.per_position_eval_iters,
                                      per_position=True)
        out: dict[str, Any] = {"per_position_seq_length": args.seq_length}
        if args.per_position_eval_iters == args.eval_iters and args is self.args:  # same batches: reuse
            self.reporter.validation(self.state.iteration, loss)
            self.last_validation = (self.state.iteration, loss)
        if self.rank == 0:
            out["per_position_csv"], out["per_position_png"] = write_per_position_loss(
                self.output_dir, per_position[0], per_position[1],
                title=f"{args.model}: validation loss per position (iteration "
                      f"{self.state.iteration}, length {args.seq_length})")
        return out

    def finish(self) -> dict[str, Any]:
        """Final validation loss and the per-position curve; prints where everything is."""
        args = self.args
        summary: dict[str, Any] = {"iteration": self.state.iteration, "losses": self.losses,
                                   "consumed_samples": self.state.consumed_samples,
                                   "tokens_per_s": self.reporter.mean_tokens_per_s}
        # Without an output directory the pass is skipped, not run for nothing: its only
        # products are the files (validate() below gives the final loss either way).
        per_position = self.data.valid is not None and args.per_position_eval_iters
        if per_position and self.output_dir is not None:
            summary.update(self._per_position())
        if self.data.valid is not None and args.eval_iters:
            summary["valid_loss"] = self.validate()
        if self.rank == 0:
            parts = [f" final | iteration {self.state.iteration}"]
            if "valid_loss" in summary:
                parts.append(f"validation loss {summary['valid_loss']:.4f}")
            if summary["tokens_per_s"] is not None:
                parts.append(f"training tokens/s {summary['tokens_per_s']:,.0f} (mean over "
                             f"{self.reporter.total_iters} iterations)")
            self.reporter.print(" | ".join(parts))
            if args.save:
                self.reporter.print(f" checkpoint:           {os.path.abspath(args.save)}")
            if args.tensorboard_dir:
                self.reporter.print(f" tensorboard logs:     {os.path.abspath(args.tensorboard_dir)}")
            if "per_position_png" in summary:
                self.reporter.print(f" per-position loss:    "
                                    f"{os.path.abspath(summary['per_position_png'])} (+ .csv)")
            elif per_position:
                self.reporter.print(" per-position loss:    not written; with --tensorboard-dir DIR "
                                    "it goes to DIR/per_position_loss.png (+ .csv)")
        self.reporter.close()
        self.obs.close()
        return summary


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate with validated ``args`` (initialises distributed state if needed)."""
    initialize_distributed(args)
    run = Run(args)
    start = time.time()
    reason = run.fit()
    summary = run.finish()
    summary.update(exit_reason=reason, seconds=time.time() - start)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, validate (exit 2 on bad arguments), train; 1 if the run diverged."""
    return run_cli(parse_args(argv, world_size_from_env()))


def run_cli(args: argparse.Namespace) -> int:
    """Train; a user error (data, paths, checkpoints, a full disk, divergence) is one ``ERROR:``
    line on rank 0 and exit status 1. Any other exception is a bug: its traceback is kept.
    However it ends, no helper process of this worker is left behind (process_guard)."""
    process_guard.install()
    # A hung rank tells where it waits: `kill -USR1 PID` prints every thread's stack to stderr
    # (forked DataLoader workers inherit it), and the job goes on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        pretrain(args)
    except Exception as err:
        if not report_error(err, getattr(args, "distributed_timeout_minutes", None)):
            raise
        return 1
    except KeyboardInterrupt:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print("ERROR: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        try:
            destroy_distributed()
        finally:
            process_guard.reap_children()
    return 0
