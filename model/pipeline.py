"""Keep a device busy: load -> preprocess -> same-shape batches -> device -> postprocess, overlapped.

On a GPU one image costs the model tens of milliseconds, as much as decoding, resizing and normalising
it on the CPU. Run one after the other, the device waits for the CPU and the CPU for the device; this
module runs them side by side:

* **load** (the caller's callable: fetch and decode, mostly waiting on I/R) and then **preprocess**
  (the model's: resize, normalise, to a tensor) run on ``load_threads`` threads; at most
  ``preprocess_threads`` of them preprocess at once (one per core by default). Pillow and torch
  release the GIL in their pixel loops, so threads run in parallel without copying images between
  processes.
* With ``preprocess_processes``, preprocessing runs in that many worker processes instead
  (``model.preprocess_pool``): the load threads keep the I/O and hand each child the loaded item (bytes,
  not pixels), the child preprocesses it and the tensor comes back through shared memory. The thread
  that feeds the device then shares its interpreter with no pixel work (on a GPU the launching of the
  model's kernels holds the GIL). ``preprocess`` must then be picklable, and decoding belongs in it.
* A **batcher** thread groups preprocessed items by tensor shape (images of different sizes padded
  into one batch change every box, see ``model.grounding_dino``) and stacks full groups into one
  tensor, in pinned memory when the device is a GPU, on the CPU into the memory of a batch the device
  is done with. When the device is idle and nothing full is ready, it sends the fullest group at
  once: the device never waits while images are ready.
* The **device** loop runs on the caller's thread: a non-blocking copy to the device, the forward
  pass, a non-blocking copy of the outputs back; the next batch is already stacked by then.
* **Postprocess** (thresholds, NMS, pixels) runs on its own thread once the outputs have arrived,
  while the device runs the next batch.

Every queue between the stages is bounded (``max_pending`` items loaded or waiting in groups, two
stacked batches, two batches in postprocessing), so memory stays flat however many items stream in.
Results come back as ``(index, result)`` in completion order; an item whose load or preprocessing
raised one of ``item_errors``, that took longer than ``item_timeout``, or that was not run before the
``deadline`` gets a :class:`Failed` with the reason and the others carry on. Any other exception stops
the run and is raised to the caller.

Model-specific work plugs in as three functions (:class:`Stages`); the detector and the embedder each
provide theirs. This module knows nothing of images, HTTP or Label Studio.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

import torch

from model.devices import usable_cores
from model.preprocess_pool import PreprocessPool, PreprocessTask, WorkerDied, WorkerTimedOut

__all__ = ["DEADLINE_PASSED", "Failed", "Pipeline", "PipelineStats", "Stages"]

log = logging.getLogger(__name__)

X = TypeVar("X")  # an input item as the caller has it (a task, a path)
S = TypeVar("S")  # a loaded item (a decoded image)
M = TypeVar("M")  # what postprocessing needs to know of one item (its size)
R = TypeVar("R")  # one item's result

PREFETCH_BATCHES = 2
"""Stacked batches waiting for the device: one to run next, one being stacked meanwhile."""
POSTPROCESS_BATCHES = 2
"""Batches whose outputs are being postprocessed while the device runs the next."""
SPARE_BATCHES = PREFETCH_BATCHES + 1
"""Stacked-batch buffers kept for reuse when the device is the CPU: as many as can be in use at once."""


@dataclass(frozen=True)
class Stages(Generic[S, M, R]):
    """The model-specific work, as three functions the pipeline schedules.

    ``preprocess`` turns one loaded item into a CPU tensor with a leading dimension of 1 (items batch
    together when the rest of the shape is equal) and whatever ``postprocess`` needs of it; it runs
    on several threads at once, so it must hold no lock the model needs, or in worker processes (then it is
    pickled: a module-level function or an instance of a module-level class). ``forward`` takes a stacked
    batch already on the device and returns tensors (possibly in tuples, lists or dicts), called from
    one thread only. ``postprocess`` takes those outputs, moved to the CPU, and the batch's ``meta``
    values, and returns one result per item in batch order.
    """

    preprocess: Callable[[S], tuple[torch.Tensor, M]]
    forward: Callable[[torch.Tensor], Any]
    postprocess: Callable[[Any, Sequence[M]], Sequence[R]]


@dataclass(frozen=True)
class Failed:
    """Why one item has no result; the other items of the run are unaffected."""

    reason: str


@dataclass
class PipelineStats:
    """Where a run's time went, summed over threads: tells which stage limits the throughput.

    ``device_wait_s`` is the time the device loop waited for a batch (after the first, which
    ``first_batch_s`` counts): near zero means the CPU side kept up. On a GPU ``forward_s`` is the
    time to queue the work, not to run it.
    """

    items: int = 0
    batches: int = 0
    failed: int = 0
    load_s: float = 0.0
    preprocess_s: float = 0.0
    stack_s: float = 0.0
    first_batch_s: float = 0.0
    device_wait_s: float = 0.0
    forward_s: float = 0.0
    postprocess_s: float = 0.0
    wall_s: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, name: str, value: float) -> None:
        """Thread-safe ``+=`` (several threads report the same stage)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, float]:
        return {f.name: round(getattr(self, f.name), 4) for f in fields(self)}


@dataclass
class _Batch:
    indices: list[int]
    pixels: torch.Tensor
    metas: list[Any]


@dataclass
class _Failures:
    items: list[tuple[int, Failed]]


@dataclass
class _Abort:
    error: BaseException


DEADLINE_PASSED = Failed("deadline passed before the model ran")
"""What an item not run before the run's deadline gets."""

_END = object()
_WAKE = -1  # inbox message: the device loop has started waiting; re-check what can be sent


class Pipeline:
    """Thread pools and policy for running :class:`Stages` over a stream of items on one device.

    Built once per model and reused by every run (threads are started once). Runs may come from
    several threads; each call to ``forward`` must be made safe by the caller (a model lock), the
    rest is.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        load_threads: int = 8,
        preprocess_threads: int | None = None,
        max_pending: int | None = None,
        torch_threads: int | None = None,
        preprocess_processes: int = 0,
        niceness: int = 0,
    ) -> None:
        """``preprocess_threads`` defaults to the cores this process may use; ``max_pending`` (items
        loaded and waiting for a batch) to ``4 x batch size + load_threads`` per run.

        ``torch_threads``: intra-op threads of torch's CPU ops on the pipeline's load threads, where
        preprocessing runs. When the device is a GPU the default shares the cores among the images
        preprocessed at once (``cores // min(load_threads, preprocess_threads)``, at least 1): each
        thread already works on its own image, and torch's default of one thread per core for every
        op would multiply them (on 16 cores, 8 x 16 threads spinning on the cores that the thread
        feeding the GPU needs). Unchanged on the CPU, where the model's forward pass uses them.
        torch keeps this setting per thread once a thread has used it, but also makes it the
        default of threads that have not used torch yet.

        ``preprocess_processes``: when above 0, runs preprocess in that many worker processes (one
        torch thread each), started here and kept until :meth:`close`; ``preprocess_threads`` and
        ``torch_threads`` then do not apply.

        ``niceness``: added to the nice value of the pipeline's threads (loading, stacking,
        postprocessing; Linux threads have their own) and of the preprocessing processes, so that the
        thread feeding the device (the caller's) wins the cores when all are busy. On the 2-core bench
        machine the device's launching ran 2-2.5x slower beside preprocessing at equal priority
        (``bench/pipeline_efficiency.py``). A nice value cannot be lowered back without privileges: the
        threads keep it for the pipeline's life.
        """
        cores = usable_cores()
        self.preprocess_threads = preprocess_threads or cores
        if load_threads < 1 or self.preprocess_threads < 1:
            raise ValueError("load_threads and preprocess_threads must be at least 1")
        self.device = device
        self.load_threads = load_threads
        self.max_pending = max_pending
        self._pin = device.type == "cuda"
        # The pipeline's threads run at the nice value of the thread building it plus ``niceness``.
        self._nice = min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + niceness)
        self._loads = ThreadPoolExecutor(
            max_workers=load_threads, thread_name_prefix="pipeline-load", initializer=self._lower_priority
        )
        self._post = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="pipeline-post", initializer=self._lower_priority
        )
        self._cpu_slots = threading.BoundedSemaphore(self.preprocess_threads)
        shared = max(1, cores // min(load_threads, self.preprocess_threads))
        self.torch_threads = torch_threads if torch_threads is not None else (shared if self._pin else None)
        self._thread_state = threading.local()
        self._pool = PreprocessPool(preprocess_processes, niceness=niceness) if preprocess_processes > 0 else None
        self._spares: deque[torch.Tensor] = deque(maxlen=SPARE_BATCHES)
        self._spares_lock = threading.Lock()

    @property
    def preprocess_processes(self) -> int:
        """Worker processes that preprocess (0: preprocessing runs on the load threads)."""
        return self._pool.processes if self._pool is not None else 0

    def preprocess_pids(self) -> list[int]:
        """The preprocessing processes' ids (none on threads): their CPU time is the pipeline's too."""
        return self._pool.pids() if self._pool is not None else []

    def _lower_priority(self) -> None:
        """This thread's nice value raised by ``niceness`` (Linux threads have their own): every thread of
        the pipeline but the caller's, which runs the forward passes."""
        thread = threading.get_native_id()
        # A new thread inherits the nice value of the thread that started it (a load thread is started
        # by the batcher): raised once to the pipeline's value, never further.
        if os.getpriority(os.PRIO_PROCESS, thread) < self._nice:
            os.setpriority(os.PRIO_PROCESS, thread, self._nice)

    def _set_torch_threads(self) -> None:
        """Once per load thread: its torch intra-op threads, if this pipeline sets them."""
        if self.torch_threads is not None and not getattr(self._thread_state, "set", False):
            torch.set_num_threads(self.torch_threads)
            self._thread_state.set = True

    def _batch_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Memory to stack a batch into: pinned for a GPU, else a spare of that shape when there is one.

        A fresh tensor of a batch's size (80 MB for 8 images at 800x1066) is mapped anew by the
        allocator and every page of it faulted in: on the bench machine that cost 70 of the 80 ms a
        batch took to stack. Pinned memory needs no help: torch's host allocator keeps it, and knows when
        an asynchronous copy out of it has ended.
        """
        if self._pin:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        with self._spares_lock:
            for position, spare in enumerate(self._spares):
                if spare.shape == shape and spare.dtype == dtype:
                    del self._spares[position]
                    return spare
        return torch.empty(shape, dtype=dtype)

    def _spare(self, pixels: torch.Tensor, outputs: Any) -> None:
        """Keep a batch's buffer once the (CPU) device is done with it, unless an output shares its memory
        (a model that returns a view of its input would see it overwritten)."""
        if self._pin:
            return
        storages = _storages(outputs)
        if storages is None or pixels.untyped_storage().data_ptr() in storages:
            return
        with self._spares_lock:
            self._spares.append(pixels)  # the oldest spare goes when full

    def close(self) -> None:
        """Stop the threads and processes (pending loads are cancelled)."""
        self._spares.clear()
        self._loads.shutdown(wait=False, cancel_futures=True)
        self._post.shutdown(wait=False, cancel_futures=True)
        if self._pool is not None:
            self._pool.close()

    def run(
        self,
        items: Iterable[X],
        load: Callable[[X], S],
        stages: Stages[S, M, R],
        *,
        batch_size: int,
        item_errors: tuple[type[BaseException], ...] = (),
        item_timeout: float | None = None,
        deadline: float | None = None,
        stats: PipelineStats | None = None,
        in_processes: bool = True,
    ) -> Iterator[tuple[int, R | Failed]]:
        """Yield ``(index in items, result or Failed)`` for every item, as batches complete.

        ``item_timeout`` bounds, in seconds, the wait for one item's load and preprocessing from the
        moment its load started (time queued behind other loads does not count). ``deadline``
        (``time.time()`` seconds) stops the run: batches not yet on the device and items not yet
        loaded fail with "deadline passed". Closing the iterator early stops the run too.

        On a pipeline with ``preprocess_processes``, ``in_processes=False`` preprocesses this run on the
        load threads: for items already decoded, whose pixels would cost more to ship than to resize.
        A preprocessing process that dies fails only the item it held, with the reason.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        stats = stats if stats is not None else PipelineStats()
        task = PreprocessTask.of(stages.preprocess) if self._pool is not None and in_processes else None
        run = _Run(self, items, load, stages, batch_size, item_errors, item_timeout, deadline, stats, task)
        return run.results()


class _Run(Generic[X, S, M, R]):
    """The state of one :meth:`Pipeline.run`: the batcher thread and the device loop around it."""

    def __init__(
        self,
        pipeline: Pipeline,
        items: Iterable[X],
        load: Callable[[X], S],
        stages: Stages[S, M, R],
        batch_size: int,
        item_errors: tuple[type[BaseException], ...],
        item_timeout: float | None,
        deadline: float | None,
        stats: PipelineStats,
        task: PreprocessTask | None,
    ) -> None:
        self.pipeline = pipeline
        self.items = iter(items)
        self.load = load
        self.stages = stages
        self.batch_size = batch_size
        self.item_errors = item_errors
        self.item_timeout = item_timeout
        self.deadline = deadline
        self.stats = stats
        self.task = task  # preprocess, pickled for the pipeline's processes; None: on the load threads
        self.capacity = pipeline.max_pending or 4 * batch_size + pipeline.load_threads
        self.inbox: queue.SimpleQueue[int] = queue.SimpleQueue()  # indices of finished items, or _WAKE
        self.batches: queue.Queue[Any] = queue.Queue(maxsize=PREFETCH_BATCHES)
        self.stop = threading.Event()
        self.device_waiting = threading.Event()
        self.started = time.perf_counter()
        self.load_started: dict[int, float] = {}  # written by the load threads (one key each)

    # --- device loop (the caller's thread) ----------------------------------------------------------------

    def results(self) -> Iterator[tuple[int, R | Failed]]:
        batcher = threading.Thread(target=self._batcher, name="pipeline-batcher", daemon=True)
        batcher.start()
        post: deque[tuple[list[int], Future[Sequence[R]]]] = deque()
        first = True
        try:
            while True:
                message = self._next_message(first)
                first = False
                if message is _END:
                    break
                if isinstance(message, _Abort):
                    raise message.error
                if isinstance(message, _Failures):
                    self.stats.add("failed", len(message.items))
                    yield from message.items
                    continue
                if self._past_deadline():
                    self.stats.add("failed", len(message.indices))
                    yield from ((index, DEADLINE_PASSED) for index in message.indices)
                    continue
                post.append((message.indices, self._forward(message)))
                while len(post) >= POSTPROCESS_BATCHES or (post and post[0][1].done()):
                    yield from self._collect(*post.popleft())
            while post:
                yield from self._collect(*post.popleft())
        finally:
            self.stop.set()
            self.inbox.put(_WAKE)
            batcher.join()  # it notices ``stop`` within 0.1 s wherever it waits
            self.stats.wall_s = time.perf_counter() - self.started

    def _next_message(self, first: bool) -> Any:
        try:
            return self.batches.get_nowait()
        except queue.Empty:
            pass
        waited = time.perf_counter()
        self.device_waiting.set()
        self.inbox.put(_WAKE)
        message = self.batches.get()
        self.device_waiting.clear()
        self.stats.add("first_batch_s" if first else "device_wait_s", time.perf_counter() - waited)
        return message

    def _forward(self, batch: _Batch) -> Future[Sequence[R]]:
        """Copy in, run, start the copy out; postprocessing waits for the copy on its own thread."""
        started = time.perf_counter()
        device = self.pipeline.device
        outputs = self.stages.forward(batch.pixels.to(device, non_blocking=True))
        ready: torch.cuda.Event | None = None
        if device.type == "cuda":
            outputs = _to_cpu(outputs)
            ready = torch.cuda.Event()
            ready.record()
        elif device.type == "cpu":  # the forward pass has read the batch: its memory can take a later one
            self.pipeline._spare(batch.pixels, outputs)
        self.stats.add("forward_s", time.perf_counter() - started)
        self.stats.add("batches", 1)
        return self.pipeline._post.submit(self._postprocess, outputs, ready, batch.metas)

    def _postprocess(self, outputs: Any, ready: torch.cuda.Event | None, metas: list[Any]) -> Sequence[R]:
        if ready is not None:
            ready.synchronize()
        started = time.perf_counter()
        results = self.stages.postprocess(outputs, metas)
        if len(results) != len(metas):
            raise RuntimeError(f"postprocess returned {len(results)} results for a batch of {len(metas)}")
        self.stats.add("postprocess_s", time.perf_counter() - started)
        return results

    def _collect(self, indices: list[int], done: Future[Sequence[R]]) -> Iterator[tuple[int, R | Failed]]:
        results = done.result()
        self.stats.add("items", len(indices))
        yield from zip(indices, results, strict=True)

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    # --- batcher thread -----------------------------------------------------------------------------------

    def _batcher(self) -> None:
        self.pipeline._lower_priority()  # stacking, like loading and postprocessing, runs ahead of the device
        in_flight: dict[int, Future[tuple[torch.Tensor, Any]]] = {}
        try:
            self._batch_items(in_flight)
        except BaseException as exc:  # handed to the caller's thread, which raises it
            self._send(_Abort(exc))
        finally:
            for future in in_flight.values():
                future.cancel()

    def _batch_items(self, in_flight: dict[int, Future[tuple[torch.Tensor, Any]]]) -> None:
        groups: dict[Hashable, list[tuple[int, torch.Tensor, Any]]] = {}  # insertion order = age
        waiting = 0  # items sitting in groups
        next_index = 0
        exhausted = False
        while not self.stop.is_set():
            while not exhausted and len(in_flight) + waiting < self.capacity and not self._past_deadline():
                try:
                    item = next(self.items)
                except StopIteration:
                    exhausted = True
                    break
                future = self.pipeline._loads.submit(self._prepare, next_index, item)
                in_flight[next_index] = future
                future.add_done_callback(lambda _, index=next_index: self.inbox.put(index))
                next_index += 1
            if self._past_deadline():
                self._fail_the_rest(in_flight, groups, next_index)
                break
            if exhausted and not in_flight:
                for key in list(groups):
                    self._send_group(groups.pop(key))
                break
            if waiting >= self.capacity:  # only groups left in memory and none full: send the oldest
                waiting -= self._send_group(groups.pop(next(iter(groups))))
                continue
            message = self._wait(in_flight)
            if message is not None and message != _WAKE and message in in_flight:
                prepared = self._outcome(message, in_flight.pop(message))
                if prepared is not None:
                    key = (tuple(prepared[0].shape[1:]), prepared[0].dtype)
                    groups.setdefault(key, []).append((message, *prepared))
                    waiting += 1
                    if len(groups[key]) >= self.batch_size:
                        waiting -= self._send_group(groups.pop(key))
                del prepared  # held here, a sent item's tensor would outlive its group (max_pending + 1)
            self._expire(in_flight)
            if groups and self.device_waiting.is_set() and self.batches.empty():
                fullest = max(groups, key=lambda k: len(groups[k]))  # max keeps the oldest among equals
                waiting -= self._send_group(groups.pop(fullest))
        self._send(_END)

    def _prepare(self, index: int, item: X) -> tuple[torch.Tensor, Any]:
        """Load then preprocess one item on a load thread; preprocessing takes one of the CPU slots, or
        runs in one of the pipeline's processes (this thread waits for it without the GIL)."""
        self.load_started[index] = time.monotonic()  # item_timeout counts from here, not from the queue
        started = time.perf_counter()
        loaded = self.load(item)
        loaded_at = time.perf_counter()
        self.stats.add("load_s", loaded_at - started)
        pool = self.pipeline._pool
        if self.task is not None and pool is not None:
            left = None
            if self.item_timeout is not None:
                left = self.load_started[index] + self.item_timeout - time.monotonic()
            tensor, meta, seconds = pool.run(self.task, loaded, timeout=left)
            del loaded
            self.stats.add("preprocess_s", seconds)  # the child's own time, as the thread path counts it
        else:
            self.pipeline._set_torch_threads()
            with self.pipeline._cpu_slots:
                begun = time.perf_counter()
                tensor, meta = self.stages.preprocess(loaded)
            del loaded  # the decoded image can go before the item waits for its batch
            self.stats.add("preprocess_s", time.perf_counter() - begun)
        if tensor.ndim < 1 or tensor.shape[0] != 1:
            raise ValueError(
                f"preprocess must return a tensor with a leading dimension of 1, got {tuple(tensor.shape)}"
            )
        return tensor, meta

    def _wait(self, in_flight: dict[int, Future[Any]]) -> int | None:
        """The next inbox message, waiting at most until the next item times out or the deadline."""
        limits = []
        if self.deadline is not None:
            limits.append(self.deadline - time.time())
        started = [self.load_started[i] for i in list(in_flight) if i in self.load_started]
        if self.item_timeout is not None and started:
            limits.append(min(started) + self.item_timeout - time.monotonic())
        try:
            return self.inbox.get(timeout=max(0.0, min(limits)) if limits else None)
        except queue.Empty:
            return None

    def _outcome(self, index: int, future: Future[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, Any] | None:
        """The prepared item, or None when it failed alone (the failure is sent on)."""
        try:
            return future.result()
        except WorkerTimedOut:  # the child's limit is the item's: the reason the batcher gives for it
            self._send(_Failures([(index, Failed(f"not loaded within {self.item_timeout:g} s"))]))
            return None
        except (*self.item_errors, WorkerDied) as exc:
            self._send(_Failures([(index, Failed(str(exc)))]))
            return None

    def _expire(self, in_flight: dict[int, Future[Any]]) -> None:
        if self.item_timeout is None:
            return
        now = time.monotonic()
        late = [i for i in list(in_flight) if now - self.load_started.get(i, now) >= self.item_timeout]
        for index in late:
            in_flight.pop(index).cancel()
        if late:
            reason = f"not loaded within {self.item_timeout:g} s"
            self._send(_Failures([(index, Failed(reason)) for index in late]))

    def _fail_the_rest(
        self,
        in_flight: dict[int, Future[Any]],
        groups: dict[Hashable, list[tuple[int, torch.Tensor, Any]]],
        next_index: int,
    ) -> None:
        indices = [index for group in groups.values() for index, _, _ in group] + list(in_flight)
        for future in in_flight.values():
            future.cancel()
        indices += range(next_index, next_index + sum(1 for _ in self.items))
        self._send(_Failures([(index, DEADLINE_PASSED) for index in sorted(indices)]))

    def _send_group(self, group: list[tuple[int, torch.Tensor, Any]]) -> int:
        """Stack one group (into pinned memory for a GPU) and hand it to the device loop."""
        started = time.perf_counter()
        tensors = [tensor for _, tensor, _ in group]
        shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
        stacked = self.pipeline._batch_buffer(shape, tensors[0].dtype)
        torch.cat(tensors, out=stacked)
        self.stats.add("stack_s", time.perf_counter() - started)
        self._send(_Batch([index for index, _, _ in group], stacked, [meta for _, _, meta in group]))
        return len(group)

    def _send(self, message: Any) -> None:
        """Hand a message to the device loop; give up when the run was stopped (it no longer reads)."""
        while not self.stop.is_set():
            try:
                self.batches.put(message, timeout=0.1)
                return
            except queue.Full:
                continue


def _storages(outputs: Any) -> set[int] | None:
    """Where the tensors in ``outputs`` (tuples, lists, dicts) keep their data; None when it holds
    anything else that might hold a tensor."""
    if isinstance(outputs, torch.Tensor):
        return {outputs.untyped_storage().data_ptr()}
    if outputs is None or isinstance(outputs, int | float | str | bool):
        return set()
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if not isinstance(outputs, tuple | list):
        return None
    found: set[int] = set()
    for value in outputs:
        inner = _storages(value)
        if inner is None:
            return None
        found |= inner
    return found


def _to_cpu(outputs: Any) -> Any:
    """Start non-blocking copies of every tensor in ``outputs`` (tuples, lists, dicts) to the CPU."""
    if isinstance(outputs, torch.Tensor):
        return outputs.to("cpu", non_blocking=True)
    if isinstance(outputs, tuple | list):
        return type(outputs)(_to_cpu(value) for value in outputs)
    if isinstance(outputs, dict):
        return {key: _to_cpu(value) for key, value in outputs.items()}
    return outputs
