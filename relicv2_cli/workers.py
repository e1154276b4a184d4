"""A pool of processes for OpenCV work on the CPU (saliency masks, `data prepare`'s re-encoding)."""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.pool import Pool

import cv2


def _init_worker() -> None:
    cv2.setNumThreads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool


@contextmanager
def cv2_pool(workers: int) -> Iterator[Pool | None]:
    """`workers` processes with one OpenCV thread each, or None for one worker, which then works in
    this process, also on one OpenCV thread (so that both give the same results) until the block
    ends. Closed and joined when the block ends normally, terminated when it raises."""
    threads = cv2.getNumThreads()
    if workers <= 1:
        cv2.setNumThreads(1)
        try:
            yield None
        finally:
            cv2.setNumThreads(threads)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    pool = ctx.Pool(workers, initializer=_init_worker)
    try:
        yield pool
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()
