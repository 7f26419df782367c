"""--async-save: checkpoints written in the background by megatron-core's asynchronous
dist-checkpointing. Training goes on during the write, every checkpoint equals the synchronous
run's at the same iteration, a resume from them is bit-exact, and a kill during a background
write keeps the previous checkpoint (the restart resumes from it)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import torch

from tests.faults import procs
from tests.faults.common import MOCK, read, straight_then_restartable
from tests.faults.test_elastic import checkpoint_tensors, losses

ITERS = 16
# A larger model than the other fault tests: its checkpoint takes long enough to write that
# training visibly goes on meanwhile, and a kill can land inside the write.
BIG = [a for a in MOCK]
for flag, value in (("--hidden-size", "256"), ("--ffn-hidden-size", "768"), ("--num-layers", "4")):
    BIG[BIG.index(flag) + 1] = value
ARGS = [*BIG, "--train-iters", str(ITERS), "--save-interval", "4"]
JOB_TIMEOUT = 600


def _tensors_at(save: str, iteration: int):
    from megatron_mosaic.training.checkpointing import TRACKER_FILENAME

    # Read one iteration through a throw-away tracker (the reader follows the tracker).
    view = save + f"_view_{iteration}"
    os.makedirs(view, exist_ok=True)
    target = os.path.join(view, f"iter_{iteration:07d}")
    if not os.path.exists(target):
        os.symlink(os.path.join(save, f"iter_{iteration:07d}"), target)
    with open(os.path.join(view, TRACKER_FILENAME), "w") as f:
        f.write(str(iteration))
    return checkpoint_tensors(view)[1]


def _equal(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_async_save_resume_and_kill_during_the_background_write(tmp_path):
    job, straight, save, log, tag, proc = straight_then_restartable(tmp_path, ARGS, "async", JOB_TIMEOUT,
                                                                    "--async-save")
    deadline = time.monotonic() + JOB_TIMEOUT
    in_window = None  # (iteration being written when killed, the latest then, log offset)

    def wait(condition):
        while not condition():
            assert proc.poll() is None and time.monotonic() < deadline, read(log)[-3000:]
            time.sleep(0.002)

    since = 0  # log offset of the current attempt
    try:
        for attempt in range(3):
            # Once a checkpoint is complete, kill a worker as soon as the next save is handed to
            # the background, before that save is complete.
            wait(lambda: "saved checkpoint" in read(log)[since:])
            offset = len(read(log))
            wait(lambda: "in the background" in read(log)[offset:])
            workers = sorted(procs.children_of(proc.pid))
            os.kill(workers[attempt % 2], signal.SIGKILL)
            text = read(log)
            writing = re.findall(r"saving checkpoint \S+/iter_(\d+) in the background", text)[-1]
            latest = re.findall(r"saved checkpoint \S+/iter_(\d+)\n", text)
            if f"saved checkpoint {save}/iter_{writing}" not in text[offset:]:
                in_window = (int(writing), int(latest[-1]), len(text))
                break
            # Too late: that save completed before the kill. Try again after the restart.
            since = len(text)
            wait(lambda: "loaded checkpoint from" in read(log)[since:])
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"async run did not finish:\n{read(log)[-3000:]}") from None
    finally:
        left = procs.reap(proc, tag)
    text = read(log)
    assert proc.returncode == 0, text[-4000:]
    assert left == [], left
    assert in_window is not None, "no kill landed inside a background write (three tries)"
    written, previous, killed_at = in_window
    # Training went on while a checkpoint was being written.
    assert re.search(r"in the background\n iteration +\d+/", text), text[-3000:]
    # The killed write never became the latest: the restart resumed from the previous one.
    restart = text[killed_at:]
    assert f"loaded checkpoint from {save} (saved at iteration {previous})" in restart, restart[:3000]
    assert f"removed {save}/iter_{written:07d}.partial: a save that was interrupted" in restart
    assert not os.path.exists(os.path.join(save, f"iter_{written:07d}.partial"))

    # Bit-exact: the final checkpoint, every printed loss, and every background-written
    # checkpoint equal the synchronous run's at the same iteration (the write saw a snapshot).
    it_a, tensors_a, _ = checkpoint_tensors(straight)
    it_b, tensors_b, _ = checkpoint_tensors(save)
    assert it_a == it_b == ITERS
    assert _equal(tensors_a, tensors_b) == []
    assert losses(job.output) == losses(text)
    for iteration in (4, 8, 12):
        if os.path.isdir(os.path.join(save, f"iter_{iteration:07d}")):
            assert _equal(_tensors_at(straight, iteration), _tensors_at(save, iteration)) == [], iteration
