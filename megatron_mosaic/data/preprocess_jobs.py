"""The runs behind ``tools/preprocess_data.py``: one pipeline (encode a document range, write it
with progress and rates, all or nothing), or ``--partitions P`` such pipelines in separate
processes over contiguous document ranges whose outputs are concatenated in order (byte-identical
to one partition).
"""

from __future__ import annotations

import glob
import itertools
import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from megatron_mosaic.data.corpus import DataError, DocumentError, SkipSummary, iter_raw_documents
from megatron_mosaic.data.encoder import (
    WINDOW_PER_WORKER,
    Encoder,
    EncoderConfig,
    batched,
    init_worker,
    ordered_parallel_map,
    worker_encode_batch,
)
from megatron_mosaic.data.indexed_writer import AtomicIndexedWriter
from megatron_mosaic.data.tokenizers import TokenizerError


@dataclass
class PreprocessStats:
    documents: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    tokens: dict = field(default_factory=dict)
    skipped: SkipSummary = field(default_factory=SkipSummary)
    outputs: list = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def docs_per_s(self) -> float:
        return self.documents / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class Job:
    """One pipeline: a contiguous document range of the input into one set of prefixes."""

    encoder: EncoderConfig
    paths: tuple[str, ...]
    input_format: str
    txt_mode: str
    prefixes: tuple[tuple[str, str], ...]  # (json key, output prefix)
    workers: int
    skip_bad_lines: bool
    log_interval: int
    doc_range: Optional[tuple[int, int]] = None
    label: str = ""
    progress_total: Optional[int] = None


def _progress_bar(job: Job, position: int):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in logs (the --log-interval lines remain).
    return tqdm(total=job.progress_total, unit="B", unit_scale=True, unit_divisor=1000,
                desc=job.label or "preprocess", position=position, file=sys.stderr,
                disable=None, mininterval=0.5, dynamic_ncols=True)


def _write_results(results: Iterable[list], writers: dict, job: Job, bar) -> PreprocessStats:
    """Append encoded documents in order; stop at (or count) bad ones; log rates."""
    stats = PreprocessStats()
    start = time.perf_counter()
    for batch in results:
        for result in batch:
            if isinstance(result, DocumentError):
                if not job.skip_bad_lines:
                    raise DataError(f"{result} (pass --skip-bad-lines to skip such documents)")
                stats.skipped.add(result)
                continue
            for key, writer in writers.items():
                writer.add_document(result.ids[key], result.lengths[key])
            stats.documents += 1
            stats.input_bytes += result.nbytes
            bar.update(result.nbytes + 1)  # + its newline, so the bar meets the file size
            if stats.documents % job.log_interval == 0:
                elapsed = time.perf_counter() - start
                bar.write(f"{job.label}Processed {stats.documents} documents "
                          f"({stats.documents / elapsed:.1f} docs/s, "
                          f"{stats.input_bytes / 1e6 / elapsed:.2f} MB/s).", file=sys.stderr)
        rate = stats.documents / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{stats.documents} docs, {rate:.1f} docs/s", refresh=False)
    stats.seconds = time.perf_counter() - start
    return stats


def run_job(job: Job, position: int = 0) -> PreprocessStats:
    """Encode ``job.doc_range`` of the input into ``job.prefixes``; all or nothing."""
    raws = iter_raw_documents(job.paths, job.input_format, job.txt_mode)
    if job.doc_range is not None:
        raws = itertools.islice(raws, *job.doc_range)
    writers = {}
    pool = bar = None
    try:
        if job.workers > 1:
            # Fork the workers before anything (tqdm's monitor) starts a thread.
            pool = multiprocessing.Pool(job.workers, initializer=init_worker, initargs=(job.encoder,))
            results = ordered_parallel_map(pool, worker_encode_batch, batched(raws),
                                           window=WINDOW_PER_WORKER * job.workers)
        else:
            results = map(Encoder(job.encoder).encode_batch, batched(raws))
        for key, prefix in job.prefixes:
            writers[key] = AtomicIndexedWriter(prefix, np.dtype(job.encoder.dtype).type)
        bar = _progress_bar(job, position)
        stats = _write_results(results, writers, job, bar)
        if stats.documents == 0 and job.doc_range is None:
            raise DataError(f"{', '.join(job.paths)}: no usable documents, nothing written")
        start = time.perf_counter()
        for writer in writers.values():
            writer.commit()
        stats.seconds += time.perf_counter() - start
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    stats.tokens = {key: w.tokens for key, w in writers.items()}
    stats.outputs = [prefix for _, prefix in job.prefixes]
    return stats


def _partition_main(job: Job, position: int, queue) -> None:
    try:
        queue.put((position, "ok", run_job(job, position)))
    except (DataError, TokenizerError) as err:
        queue.put((position, "error", str(err)))
    except BaseException:
        queue.put((position, "error", traceback.format_exc()))


def _collect(procs: list, queue) -> dict:
    """Each partition's (status, payload), read before joining (a child blocks until its
    result is read); a child that dies without reporting becomes an error, not a hang."""
    import queue as queue_module

    results: dict = {}
    while len(results) < len(procs):
        try:
            position, status, payload = queue.get(timeout=1.0)
            results[position] = (status, payload)
        except queue_module.Empty:
            for i, proc in enumerate(procs):
                if i not in results and not proc.is_alive() and queue.empty():
                    results[i] = ("error", f"partition {i} exited with code {proc.exitcode} without a result")
    for proc in procs:
        proc.join()
    return results


def _merge(parts: list[PreprocessStats], jobs: list[Job], job: Job) -> PreprocessStats:
    """Concatenate the partitions' datasets, in order, into the final prefixes."""
    stats = PreprocessStats()
    writers = {key: AtomicIndexedWriter(prefix, np.dtype(job.encoder.dtype).type) for key, prefix in job.prefixes}
    try:
        for part, part_job in zip(parts, jobs):
            stats.documents += part.documents
            stats.input_bytes += part.input_bytes
            stats.skipped.merge(part.skipped)
            for key, prefix in part_job.prefixes:
                writers[key].add_dataset(prefix)
        for writer in writers.values():
            writer.commit()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    stats.tokens = {key: w.tokens for key, w in writers.items()}
    return stats


def run_partitions(job: Job, partitions: int) -> PreprocessStats:
    """Split the documents into contiguous ranges, encode them concurrently, concatenate."""
    total = sum(1 for _ in iter_raw_documents(job.paths, job.input_format, job.txt_mode))
    bounds = [round(i * total / partitions) for i in range(partitions + 1)]
    pid = os.getpid()
    jobs = [
        Job(job.encoder, job.paths, job.input_format, job.txt_mode,
             tuple((key, f"{prefix}.partition{i}-incomplete-{pid}") for key, prefix in job.prefixes),
             job.workers // partitions, job.skip_bad_lines, job.log_interval,
             doc_range=(bounds[i], bounds[i + 1]), label=f"[partition {i}] ")
        for i in range(partitions)
    ]
    queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_partition_main, args=(j, i, queue)) for i, j in enumerate(jobs)]
    start = time.perf_counter()
    for proc in procs:
        proc.start()
    try:
        results = _collect(procs, queue)
        errors = [payload for _, (status, payload) in sorted(results.items()) if status != "ok"]
        if errors:
            raise DataError(errors[0])
        parts = [results[i][1] for i in range(partitions)]
        if not sum(part.documents for part in parts):
            raise DataError(f"{', '.join(job.paths)}: no usable documents, nothing written")
        stats = _merge(parts, jobs, job)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        # Partition outputs, and the temporary files of a partition that was interrupted.
        for part_job in jobs:
            for _, prefix in part_job.prefixes:
                for path in glob.glob(glob.escape(prefix) + ".bin*") + glob.glob(glob.escape(prefix) + ".idx*"):
                    os.remove(path)
    stats.seconds = time.perf_counter() - start
    stats.outputs = [prefix for _, prefix in job.prefixes]
    return stats
