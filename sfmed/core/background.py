"""Background threads of a conversion: reads, tensor shuffling and write system calls overlap
(the I/O and the tensor copies release the GIL). Work stays in order, and the bytes in flight are
bounded, so memory stays about one tensor plus the bounds."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class BackgroundWriter:
    """Run write jobs in order on one thread; :meth:`submit` waits while too much is pending.

    An exception in a job is raised again by the next :meth:`submit` or by :meth:`drain`.
    """

    def __init__(self, max_pending_bytes: int = 512 << 20):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sfmed-write")
        self._pending: deque[tuple[Future, int]] = deque()
        self._bytes = 0
        self._limit = max_pending_bytes

    def submit(self, nbytes: int, fn, *args) -> None:
        """Queue ``fn(*args)`` (holding about ``nbytes`` of memory until it ran)."""
        while self._pending and self._bytes + nbytes > self._limit:
            self._pop()
        self._pending.append((self._pool.submit(fn, *args), nbytes))
        self._bytes += nbytes

    def _pop(self) -> None:
        fut, nbytes = self._pending.popleft()
        self._bytes -= nbytes
        fut.result()

    def drain(self) -> None:
        """Wait for every queued job (re-raising the first failure)."""
        while self._pending:
            self._pop()

    def close(self, wait_for_jobs: bool = True) -> None:
        """Drain (or, after a failure, drop) the queue and stop the thread."""
        try:
            if wait_for_jobs:
                self.drain()
        finally:
            for fut, _ in self._pending:
                fut.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)


def prefetched(items: Iterator[tuple[str, torch.Tensor]], max_pending_bytes: int = 384 << 20):
    """Iterate ``items`` (name, tensor) produced by a background thread, at most
    ``max_pending_bytes`` of tensors ahead of the consumer, so that reading the next tensors
    overlaps with writing the current ones. Errors in the producer are raised here."""
    cond = threading.Condition()
    queue: deque = deque()
    state = {"bytes": 0, "done": False, "error": None, "stop": False}

    def produce() -> None:
        try:
            for name, t in items:
                nbytes = t.numel() * t.element_size()
                with cond:
                    while (
                        queue and state["bytes"] + nbytes > max_pending_bytes and not state["stop"]
                    ):
                        cond.wait()
                    if state["stop"]:
                        return
                    queue.append((name, t, nbytes))
                    state["bytes"] += nbytes
                    cond.notify_all()
        except BaseException as e:  # handed to the consumer
            with cond:
                state["error"] = e
        finally:
            with cond:
                state["done"] = True
                cond.notify_all()

    thread = threading.Thread(target=produce, name="sfmed-read", daemon=True)
    thread.start()
    try:
        while True:
            with cond:
                while not queue and not state["done"]:
                    cond.wait()
                if queue:
                    name, t, nbytes = queue.popleft()
                    state["bytes"] -= nbytes
                    cond.notify_all()
                elif state["error"] is not None:
                    raise state["error"]
                else:
                    return
            yield name, t
    finally:
        with cond:
            state["stop"] = True
            queue.clear()
            cond.notify_all()
        thread.join()
