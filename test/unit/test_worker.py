"""SlotWorker: the newest job replaces a waiting one, jobs run one at a time off the caller's thread, stop is clean."""

from __future__ import annotations

import threading

from forest_perception.worker import SlotWorker


def test_newest_job_replaces_the_waiting_one_and_jobs_run_in_order():
    release = threading.Event()
    done: list[int] = []
    started = threading.Event()

    def handle(job: int) -> None:
        if job == 0:
            started.set()
            release.wait(5.0)
        done.append(job)

    worker = SlotWorker("test", handle)
    try:
        assert worker.submit(0) is None
        assert started.wait(5.0) and worker.busy
        assert worker.submit(1) is None  # the slot was empty: job 0 is running, not waiting
        assert worker.submit(2) == 1  # replaces the waiting job and says which
        assert worker.pending == 2
        release.set()
        for _ in range(500):
            if done == [0, 2] and not worker.busy:
                break
            threading.Event().wait(0.01)
        assert done == [0, 2] and not worker.busy
    finally:
        assert worker.stop(5.0)
    assert not worker.alive


def test_stop_drops_the_waiting_job_and_the_start_hook_runs_first():
    order: list[str] = []
    gate = threading.Event()
    worker = SlotWorker("test", lambda job: (order.append(job), gate.wait(5.0)), on_start=lambda: order.append("start"))
    worker.submit("a")
    for _ in range(500):
        if "a" in order:
            break
        threading.Event().wait(0.01)
    worker.submit("b")
    gate.set()
    assert worker.stop(5.0)
    assert order[:2] == ["start", "a"] and order.count("b") <= 1


def test_a_failing_job_goes_to_on_error_which_decides_whether_the_thread_goes_on():
    errors: list[str] = []
    done: list[int] = []

    def handle(job: int) -> None:
        if job < 0:
            raise ValueError(f"bad job {job}")
        done.append(job)

    worker = SlotWorker("test", handle, on_error=lambda exc: errors.append(str(exc)) or "stop" not in str(exc))
    try:
        worker.submit(-1)
        for _ in range(500):
            if errors:
                break
            threading.Event().wait(0.01)
        worker.submit(7)
        for _ in range(500):
            if done:
                break
            threading.Event().wait(0.01)
        assert errors == ["bad job -1"] and done == [7] and worker.alive
    finally:
        worker.stop(5.0)
