"""Per-frame work on every core: a thread pool for OpenCV/numpy work that releases the GIL.

Used by curate, validate and report; why threads rather than processes is in docs/dataset_tools.md ("Speed").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import cv2


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def parallel_map(
    fn: Callable,
    items: Sequence,
    *,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "",
    min_parallel: int = 16,
) -> list:
    """``[fn(x) for x in items]`` on ``workers`` threads (order kept), with an optional tqdm bar.

    Meant for per-frame work that spends its time in OpenCV and numpy, which release the GIL
    (PNG decoding, filters), so threads use every core without the start-up, pickling and
    ``__main__``-guard pitfalls of a process pool. OpenCV's own thread pool is set to one
    thread meanwhile (restored afterwards) so the two do not oversubscribe the cores. Runs
    in the calling thread for one worker or fewer than ``min_parallel`` items.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    bar = tqdm(total=len(items), desc=desc, unit="frame", disable=not progress, mininterval=1.0)
    out = []
    try:
        if workers == 1 or len(items) < min_parallel:
            for item in items:
                out.append(fn(item))
                bar.update()
            return out
        cv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="frames") as pool:
                for result in pool.map(fn, items):
                    out.append(result)
                    bar.update()
        finally:
            cv2.setNumThreads(cv_threads)
        return out
    finally:
        bar.close()
