"""Decode and preprocess in worker processes, so that the thread feeding the device competes with nothing.

Why processes: threads preprocessing beside the device loop share its process's GIL and interpreter;
on the quiet 2-core machine the fake device's GIL-held launching ran 1.55x slower beside them, and on an
H200 forward passes ran 30-40% slower beside 8 preprocessing threads (README, "Keeping a GPU busy").
In a child process the pixel work competes with the device loop for cores only.

How:

* ``processes`` children from the ``forkserver`` context: torch is imported once, in the fork server,
  so starting or replacing a child takes milliseconds, and no child inherits the parent's threads or
  its CUDA state. Each child runs torch with one intra-op thread (each works on its own image). They
  live as long as the pool (a worker's life, hours), never one pool per call.
* A pipeline's load thread takes an idle child, sends it the preprocessing function (pickled once per
  run and kept by the child, so the same function is unpickled once per child) and the item's payload
  (the fetched bytes, never decoded pixels), and waits, without the GIL, for the answer.
* The child answers with the tensor in a fresh ``memfd`` whose descriptor crosses the same socket: the
  parent maps it and the tensor owns the mapping (its memory goes when the last view of it does). No
  pixel is pickled or copied in the parent, and nothing lands in ``/dev/shm``, whose 64 MB docker
  default holds five images of Grounding DINO's input size.
* An exception of the function comes back as itself (same type, same message: a corrupt image fails
  with the reason the thread path gives). A child that dies fails the one item it held
  (:class:`WorkerDied`) and is replaced; a child past the item's time limit is killed and replaced.

Linux only (``os.memfd_create``). This module knows nothing of images: the function and its payload
are the caller's.
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import torch

__all__ = ["PreprocessPool", "PreprocessTask", "WorkerDied", "WorkerTimedOut"]

log = logging.getLogger(__name__)

FUNCTIONS_KEPT = 8
"""Unpickled functions a child keeps (one per distinct preprocessing; a worker has one or two)."""
PRELOAD = ("torch", "numpy", "PIL.Image", "model.images")
"""Imported once by the fork server, so that every child starts with them."""
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # pages mapped at once, not fault by fault


class WorkerDied(RuntimeError):
    """The process preprocessing an item died (killed, out of memory): that item fails, the pool goes on."""


class WorkerTimedOut(WorkerDied):
    """The item took longer than its time limit in a child; the child was killed and replaced."""


@dataclass(frozen=True)
class PreprocessTask:
    """A function pickled once for a run, named by its digest so that a child unpickles it once."""

    key: bytes
    blob: bytes

    @classmethod
    def of(cls, function: Callable[[Any], tuple[torch.Tensor, Any]]) -> PreprocessTask:
        try:
            blob = pickle.dumps(function, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"preprocessing in processes needs a picklable preprocess function (a module-level function or "
                f"an instance of a module-level class), got {function!r}: {type(exc).__name__}: {exc}"
            ) from exc
        return cls(hashlib.sha256(blob).digest(), blob)


class PreprocessPool:
    """``processes`` child processes that run one preprocessing call each at a time. Thread-safe."""

    def __init__(self, processes: int, *, torch_threads: int = 1, niceness: int = 0) -> None:
        """``niceness`` is added to each child's nice value: above 0 the parent's threads (the one feeding
        the device first) win the cores when all are busy."""
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        if not hasattr(os, "memfd_create"):
            raise RuntimeError("preprocessing in processes needs Linux (os.memfd_create); use threads here")
        self.processes = processes
        self.torch_threads = torch_threads
        self.niceness = niceness
        self.replaced = 0  # children replaced after dying or timing out
        self._context = _context()
        self._lock = threading.Lock()
        self._closed = False
        self._workers: set[_Worker] = set()
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for _ in range(processes):
            self._idle.put(self._start())

    def pids(self) -> list[int]:
        """The children's process ids (for tests, and for benchmarks that count their CPU time)."""
        with self._lock:
            return sorted(w.process.pid for w in self._workers if w.process.pid is not None)

    def run(
        self, task: PreprocessTask, payload: Any, *, timeout: float | None = None
    ) -> tuple[torch.Tensor, Any, float]:
        """``task``'s function applied to ``payload`` in a child: ``(tensor, meta, seconds it took there)``.

        Blocks until a child is free and has answered. The function's own exception is raised as is;
        :class:`WorkerDied` when the child died meanwhile, :class:`WorkerTimedOut` when ``timeout``
        seconds passed, waiting for a free child included (a child still at work is then killed: the
        item fails, not the next one).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        worker = self._acquire(deadline)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            self._release(worker)  # untouched: it stays
            raise WorkerTimedOut("no time was left for preprocessing")
        try:
            outcome = worker.call(task, payload, left)
        except BaseException:
            self._replace(worker)  # its state is unknown (dead, busy, mid-answer): never reused
            raise
        self._release(worker)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _acquire(self, deadline: float | None) -> _Worker:
        """An idle, live child (one found dead while idle is replaced: no item was lost with it)."""
        while True:
            try:
                worker = self._idle.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise WorkerTimedOut("no preprocessing process became free in time") from None
            if self._closed:
                self._idle.put(worker)  # stopped; it wakes the next waiter, which fails alike
                raise RuntimeError("the preprocessing pool is closed")
            if worker.process.is_alive():
                return worker
            self._replace(worker)

    def close(self) -> None:
        """Stop every child: idle ones at once, busy ones are killed (their items fail). Threads waiting
        for a child then fail too, as does any later :meth:`run`."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        idle: list[_Worker] = []
        while True:
            try:
                idle.append(self._idle.get_nowait())
            except queue.Empty:
                break
        for worker in idle:
            self._stop(worker)
        for worker in workers:
            if worker not in idle:
                worker.process.kill()  # its thread sees it die, and puts it back stopped
        for worker in idle:
            self._idle.put(worker)

    def _start(self) -> _Worker:
        worker = _Worker(self._context, self.torch_threads, self.niceness)
        with self._lock:
            self._workers.add(worker)
        return worker

    def _release(self, worker: _Worker) -> None:
        if self._closed:
            self._stop(worker)
        self._idle.put(worker)

    def _replace(self, worker: _Worker) -> None:
        self._stop(worker)
        if self._closed:
            self._idle.put(worker)  # stopped: wakes a waiter, which fails (the pool is closed)
            return
        with self._lock:
            self.replaced += 1
        log.warning("preprocessing process %s stopped (%s); starting another", worker.process.pid, worker.how())
        self._idle.put(self._start())

    def _stop(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.discard(worker)
        worker.stop()


class _Worker:
    """One child and the parent's end of its socket; used by one thread at a time."""

    def __init__(self, context: Any, torch_threads: int, niceness: int) -> None:
        self.conn, child_end = multiprocessing.Pipe(duplex=True)  # a socket pair: descriptors can cross it
        self.process = context.Process(
            target=_serve, args=(child_end, torch_threads, niceness), name="dinolabel-preprocess", daemon=True
        )
        self.process.start()
        child_end.close()

    def call(
        self, task: PreprocessTask, payload: Any, timeout: float | None
    ) -> tuple[torch.Tensor, Any, float] | BaseException:
        try:
            self.conn.send((task.key, task.blob, payload))
            if not self.conn.poll(timeout):
                self.process.kill()
                raise WorkerTimedOut(f"preprocessing took longer than {timeout:.3g} s; its process was stopped")
            reply = self.conn.recv()
            if reply[0] == "error":
                return reply[1]
            _, shape, dtype, meta, seconds = reply
            tensor = _mapped(reduction.recv_handle(self.conn), shape, dtype)
        except (EOFError, ConnectionError) as exc:
            raise WorkerDied(f"the process preprocessing this image died ({self.how()})") from exc
        return tensor, meta, seconds

    def how(self) -> str:
        """How the child ended, in words: "killed by signal 9", "exit code 1", "still running"."""
        self.process.join(1.0)
        code = self.process.exitcode
        if code is None:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def stop(self) -> None:
        """Close the socket (an idle child exits at once) and make sure the child is gone."""
        self.conn.close()
        self.process.join(2.0)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(2.0)


def _context() -> Any:
    """The fork server when the platform has one (fast starts, torch imported once), else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))  # no effect once the server runs (then it has them already)
    return context


def _mapped(fd: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The child's tensor, mapped from its memfd (closed here: the mapping keeps the memory)."""
    try:
        count = math.prod(shape)
        size = count * dtype.itemsize
        if os.fstat(fd).st_size != size:
            raise RuntimeError(f"a preprocessing process sent {os.fstat(fd).st_size} bytes for {shape} {dtype}")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = mmap.mmap(fd, size, flags=_MAP_FLAGS, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)  # the tensor keeps ``buffer``


# --- the child ------------------------------------------------------------------------------------------------


def _serve(conn: Connection, torch_threads: int, niceness: int) -> None:
    """A child's loop: apply each function to each payload until the parent closes the socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    if niceness:
        os.nice(niceness)
    torch.set_num_threads(torch_threads)
    functions: dict[bytes, Callable[[Any], tuple[torch.Tensor, Any]]] = {}
    while True:
        try:
            key, blob, payload = conn.recv()
        except (EOFError, OSError):
            return
        started = time.perf_counter()
        try:
            function = functions.pop(key, None) or pickle.loads(blob)
            functions[key] = function  # most recently used last
            while len(functions) > FUNCTIONS_KEPT:
                del functions[next(iter(functions))]
            tensor, meta = function(payload)
            fd = _to_memfd(tensor)
        except Exception as exc:  # the item's failure, reported as the thread path would raise it
            conn.send(("error", _portable(exc)))
            continue
        try:
            conn.send(("ok", tuple(tensor.shape), tensor.dtype, meta, time.perf_counter() - started))
            reduction.send_handle(conn, fd, os.getppid())
        finally:
            os.close(fd)


def _to_memfd(tensor: torch.Tensor) -> int:
    """A new memfd holding the tensor's bytes (one kernel copy; the child keeps no mapping)."""
    data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    fd = os.memfd_create("dinolabel-preprocessed", os.MFD_CLOEXEC)
    try:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _portable(exc: Exception) -> BaseException:
    """``exc`` if it survives pickling (same type and message in the parent), else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
