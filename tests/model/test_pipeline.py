"""model.pipeline: every item comes back once, batches are same-shape and bounded, failures stay local.

The stages here are plain functions over small tensors (a "model" that sums pixels), except the last
tests, which run the tiny Grounding DINO through the pipeline and compare it with ``detect``. The
preprocessing-in-processes tests run real child processes (one pool for the module, as a worker keeps
one for hours) and kill one.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from model import GroundingDinoDetector
from model.images import DecodeThen, ImageDecodeError, decode_image
from model.pipeline import Failed, Pipeline, PipelineStats, Stages
from tests.images import jpeg, png
from tests.model.child_stages import Stall, in_child, with_nice_value
from tests.model.test_grounding_dino import LOW, PHRASES, same
from tests.processes import wait_for

CPU = torch.device("cpu")


class BrokenImage(ValueError):
    """What a load raises for an item that should fail alone."""


class Recorder:
    """Stages over items ``(value, side)``: a ``side`` x ``side`` tensor filled with ``value``.

    Records every batch the "device" received and how many items were prepared but not yet
    postprocessed at any time (the pipeline's memory).
    """

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[float]] = []
        self.gate = gate
        self.alive = 0
        self.most_alive = 0
        self.lock = threading.Lock()

    def preprocess(self, item: tuple[float, int]) -> tuple[torch.Tensor, float]:
        value, side = item
        with self.lock:
            self.alive += 1
            self.most_alive = max(self.most_alive, self.alive)
        return torch.full((1, 1, side, side), float(value)), value

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(pixels[:, 0, 0, 0].tolist())
        return pixels.sum(dim=(1, 2, 3))

    def postprocess(self, sums: torch.Tensor, values: Sequence[float]) -> list[tuple[float, float]]:
        with self.lock:
            self.alive -= len(values)
        return list(zip(values, sums.tolist(), strict=True))

    def stages(self) -> Stages:
        return Stages(self.preprocess, self.forward, self.postprocess)


@pytest.fixture
def pipeline() -> Pipeline:
    made = Pipeline(CPU, load_threads=4, preprocess_threads=2)
    yield made
    made.close()


def test_every_item_comes_back_once_in_same_shape_batches(pipeline: Pipeline) -> None:
    items = [(float(i), 2 if i % 3 else 3) for i in range(23)]
    recorder = Recorder()
    stats = PipelineStats()
    results = dict(pipeline.run(items, lambda item: item, recorder.stages(), batch_size=4, stats=stats))
    assert sorted(results) == list(range(23))
    for index, (value, side) in enumerate(items):
        assert results[index] == (value, value * side * side)  # each item's own result, not a neighbour's
    by_value = dict(items)
    for batch in recorder.batches:
        assert 1 <= len(batch) <= 4
        assert len({by_value[v] for v in batch}) == 1, f"sizes mixed in one batch: {batch}"
    assert sorted(v for batch in recorder.batches for v in batch) == [v for v, _ in items]
    assert stats.items == 23 and stats.batches == len(recorder.batches) and stats.failed == 0


def test_the_device_takes_what_is_ready_rather_than_wait_for_a_full_batch(pipeline: Pipeline) -> None:
    # Item 3 loads only after the device has run items 0-2: a pipeline that waited for a full batch
    # of 4 would never get there (the run would hang).
    seen = threading.Event()
    recorder = Recorder()
    forward = recorder.forward

    def watching_forward(pixels: torch.Tensor) -> torch.Tensor:
        out = forward(pixels)
        if sorted(v for batch in recorder.batches for v in batch) == [0.0, 1.0, 2.0]:
            seen.set()
        return out

    def load(item: tuple[float, int]) -> tuple[float, int]:
        if item[0] == 3.0:
            assert seen.wait(10), "the device never got items 0-2 while item 3 was loading"
        return item

    stages = Stages(recorder.preprocess, watching_forward, recorder.postprocess)
    results = dict(pipeline.run([(float(i), 2) for i in range(4)], load, stages, batch_size=4))
    assert results == {i: (float(i), 4.0 * i) for i in range(4)}
    assert seen.is_set()


def test_a_failing_item_fails_alone_and_other_errors_stop_the_run(pipeline: Pipeline) -> None:
    def load(item: tuple[float, int]) -> tuple[float, int]:
        if item[0] == 2.0:
            raise BrokenImage("cannot decode image 2: truncated")
        return item

    items = [(float(i), 2) for i in range(6)]
    results = dict(pipeline.run(items, load, Recorder().stages(), batch_size=2, item_errors=(BrokenImage,)))
    assert results[2] == Failed("cannot decode image 2: truncated")
    assert all(results[i] == (float(i), 4.0 * i) for i in (0, 1, 3, 4, 5))

    with pytest.raises(BrokenImage, match="truncated"):
        list(pipeline.run(items, load, Recorder().stages(), batch_size=2))
    assert not [t for t in threading.enumerate() if t.name == "pipeline-batcher"]


def test_a_load_past_its_timeout_fails_and_the_rest_are_served(pipeline: Pipeline) -> None:
    release = threading.Event()

    def load(item: tuple[float, int]) -> tuple[float, int]:
        if item[0] == 1.0:
            release.wait(30)  # a download that hangs
        return item

    try:
        items = [(float(i), 2) for i in range(5)]
        results = dict(pipeline.run(items, load, Recorder().stages(), batch_size=2, item_timeout=0.5))
    finally:
        release.set()
    assert results[1] == Failed("not loaded within 0.5 s")
    assert all(results[i] == (float(i), 4.0 * i) for i in (0, 2, 3, 4))


def test_time_queued_behind_other_loads_does_not_count_against_the_timeout() -> None:
    # One load thread, six loads of 0.5 s: the last starts 2.5 s after it was queued, yet each load
    # itself takes well under the 2 s limit, so none may time out.
    pipeline = Pipeline(CPU, load_threads=1, preprocess_threads=1)

    def load(item: tuple[float, int]) -> tuple[float, int]:
        time.sleep(0.5)
        return item

    try:
        items = [(float(i), 2) for i in range(6)]
        results = dict(pipeline.run(items, load, Recorder().stages(), batch_size=2, item_timeout=2.0))
    finally:
        pipeline.close()
    assert results == {i: (float(i), 4.0 * i) for i in range(6)}


def test_past_the_deadline_nothing_more_runs(pipeline: Pipeline) -> None:
    recorder = Recorder()
    results = dict(pipeline.run([(1.0, 2), (2.0, 2)], lambda i: i, recorder.stages(), batch_size=2, deadline=0.0))
    assert results == {
        0: Failed("deadline passed before the model ran"),
        1: Failed("deadline passed before the model ran"),
    }
    assert recorder.batches == []


def test_memory_stays_bounded_however_many_items_stream_in(pipeline: Pipeline) -> None:
    recorder = Recorder()
    count = 0
    for _ in pipeline.run(((float(i), 2 + i % 3) for i in range(400)), lambda i: i, recorder.stages(), batch_size=4):
        count += 1
    assert count == 400
    # max_pending (4 x 4 + 4 load threads) + 2 stacked batches + 2 in postprocessing + 1 on the device
    assert recorder.most_alive <= 4 * 4 + 4 + 5 * 4


def test_closing_the_results_early_stops_the_run(pipeline: Pipeline) -> None:
    loads = []
    results = pipeline.run(
        ((float(i), 2) for i in range(10_000)), lambda i: loads.append(i) or i, Recorder().stages(), batch_size=2
    )
    first = next(results)
    results.close()
    assert first[0] in (0, 1)
    assert len(loads) < 100
    assert not [t for t in threading.enumerate() if t.name == "pipeline-batcher"]


def test_a_batch_the_model_returns_as_its_output_is_not_stacked_over(pipeline: Pipeline) -> None:
    # On the CPU a batch's memory takes a later batch once the forward pass is done, unless an output
    # shares it: this "model" returns its input, and batch 0 is postprocessed only after the device has
    # run batch 1, by when the batcher has stacked batches 2 and 3 (same shape) into whatever was spare.
    second = threading.Event()
    forwards: list[torch.Tensor] = []
    postprocessed: list[list[float]] = []

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        forwards.append(pixels)
        if len(forwards) == 2:
            second.set()
        return pixels

    def postprocess(outputs: torch.Tensor, values: Sequence[float]) -> list[float]:
        if not postprocessed:  # batch 0 (one postprocessing thread: batches come in order)
            assert second.wait(10), "the device never ran the second batch"
            time.sleep(0.3)  # the batcher stacks the next batches meanwhile
        postprocessed.append(list(values))
        return outputs[:, 0, 0, 0].tolist()

    items = [(float(i), 2) for i in range(10)]
    stages = Stages(Recorder().preprocess, forward, postprocess)
    results = dict(pipeline.run(items, lambda item: item, stages, batch_size=2))
    assert results == {i: float(i) for i in range(10)}


# --- the detector through the pipeline ---------------------------------------------------------------------

# Stored size and EXIF orientation: 6 and 8 turn a stored 80x60 into a displayed 60x80.
VARIED = [(64, 48, None), (128, 96, 3), (48, 64, 6), (90, 60, None), (80, 60, 8), (64, 48, 6), (40, 80, None)]


def test_the_pipeline_finds_what_detect_finds(tiny_detector: GroundingDinoDetector) -> None:
    files = [jpeg(w, h, seed, orientation=o) for seed, (w, h, o) in enumerate(VARIED)]
    images = [decode_image(data, max_pixels=10**6) for data in files]
    old = tiny_detector.detect(images, PHRASES, LOW, batch_size=4)
    pipeline = Pipeline(tiny_detector.device, load_threads=3, preprocess_threads=2)
    try:
        stages = tiny_detector.stages(PHRASES, LOW)
        decode = lambda data: decode_image(data, max_pixels=10**6)  # noqa: E731
        new = dict(pipeline.run(files, decode, stages, batch_size=4))
        alone = dict(pipeline.run(files, decode, stages, batch_size=1))
    finally:
        pipeline.close()
    assert sum(len(found) for found in old) >= len(files), "the tiny model finds boxes at a low threshold"
    assert [img.size for img in images][2] == (64, 48)  # EXIF applied before the model sees the image
    for index, found in enumerate(old):
        assert same(found, new[index]), f"image {index} {VARIED[index]}"
        assert found == alone[index] or same(found, alone[index])
    assert not same(old[0], old[5]), "different images give different boxes"


def test_the_pipeline_finds_what_detect_finds_with_preprocessing_in_processes(
    tiny_detector: GroundingDinoDetector, processes: Pipeline
) -> None:
    files = [jpeg(w, h, seed, orientation=o) for seed, (w, h, o) in enumerate(VARIED)]
    images = [decode_image(data, max_pixels=10**6) for data in files]
    old = tiny_detector.detect(images, PHRASES, LOW, batch_size=4)
    stages = tiny_detector.stages(PHRASES, LOW)
    in_children = Stages(DecodeThen(stages.preprocess, max_pixels=10**6), stages.forward, stages.postprocess)
    new = dict(processes.run(files, lambda data: data, in_children, batch_size=4))
    assert sum(len(found) for found in old) >= len(files), "the tiny model finds boxes at a low threshold"
    for index, found in enumerate(old):
        assert same(found, new[index]), f"image {index} {VARIED[index]}"


def test_preprocessing_in_processes_gives_the_threads_tensors_bit_for_bit(
    tiny_detector: GroundingDinoDetector, processes: Pipeline
) -> None:
    # Varied sizes and EXIF, draft decoding included (its decode_size travels to the children too).
    files = [jpeg(w, h, seed, orientation=o) for seed, (w, h, o) in enumerate(VARIED)]
    files.append(jpeg(480, 640, 9, orientation=6))  # shown 640x480: draft-decoded at 1/4 (input 106x80)
    preprocessor = tiny_detector.preprocessor
    expected = {}
    for decode_size in (None, preprocessor.input_size):
        step = DecodeThen(preprocessor, max_pixels=10**6, decode_size=decode_size)
        expected[decode_size] = [step(data) for data in files]
        stages = Stages(step, lambda pixels: pixels, lambda pixels, sizes: list(zip(pixels, sizes, strict=True)))
        found = dict(processes.run(files, lambda data: data, stages, batch_size=1))
        for index, (pixels, size) in enumerate(expected[decode_size]):
            assert torch.equal(found[index][0], pixels[0]) and found[index][1] == size, f"image {index}"
    exact, draft = expected[None][-1], expected[preprocessor.input_size][-1]
    assert exact[1] == draft[1] == (640, 480) and exact[0].shape == draft[0].shape == (1, 3, 80, 106)
    assert not torch.equal(exact[0], draft[0]), "the children decoded the draft at a reduced scale"


def test_a_corrupt_image_fails_alone_with_the_threads_reason_in_processes(
    tiny_detector: GroundingDinoDetector, processes: Pipeline
) -> None:
    files = [png(64, 48, 0), b"<html>not found</html>", png(97, 61, 1), png(400, 300, 4)[:300], png(80, 60, 2)]
    stages = tiny_detector.stages(PHRASES, LOW)
    stages = Stages(DecodeThen(stages.preprocess, max_pixels=10**6), stages.forward, stages.postprocess)
    threads = Pipeline(CPU, load_threads=2, preprocess_threads=2)
    try:
        expected = dict(threads.run(files, lambda d: d, stages, batch_size=2, item_errors=(ImageDecodeError,)))
    finally:
        threads.close()
    found = dict(processes.run(files, lambda d: d, stages, batch_size=2, item_errors=(ImageDecodeError,)))
    assert isinstance(found[1], Failed) and "an HTML or XML document" in found[1].reason
    assert isinstance(found[3], Failed) and "truncated" in found[3].reason
    assert found[1] == expected[1] and found[3] == expected[3]
    for index in (0, 2, 4):
        assert same(found[index], expected[index]) and found[index], f"image {index}"
    # An error that is not an item's stops the run, raised as itself.
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        list(processes.run(files, lambda d: d, stages, batch_size=2))


def test_in_processes_every_item_comes_back_once_preprocessed_in_a_child(processes: Pipeline) -> None:
    items = [(float(i), 2 if i % 3 else 3) for i in range(23)]
    stats = PipelineStats()
    results = dict(processes.run(items, lambda item: item, _SUMS, batch_size=4, stats=stats))
    assert sorted(results) == list(range(23))
    children = set(processes.preprocess_pids())
    assert len(children) == 2 and os.getpid() not in children
    for index, (value, side) in enumerate(items):
        found_value, pid, total = results[index]
        assert (found_value, total) == (value, value * side * side)  # its own tensor, not a neighbour's
        assert pid in children
    assert stats.items == 23 and stats.failed == 0 and stats.preprocess_s > 0


def test_in_processes_memory_stays_bounded_and_is_given_back(processes: Pipeline) -> None:
    # Each prepared item is a mapping of its child's memfd until it is stacked into a batch: at most
    # max_pending (4 x 4 + 4 load threads) at once, and none left once the run is over.
    gc.collect()  # tensors of earlier runs that ended in an exception (kept by its traceback's cycle)
    before = _mapped_tensors()
    mapped: list[int] = []

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        mapped.append(_mapped_tensors() - before)
        return pixels.sum(dim=(1, 2, 3))

    stages = Stages(in_child, forward, _SUMS.postprocess)
    items = ((float(i), 2 + i % 3) for i in range(200))
    assert sum(1 for _ in processes.run(items, lambda item: item, stages, batch_size=4)) == 200
    assert 0 < max(mapped) <= 4 * 4 + 4
    gc.collect()
    assert _mapped_tensors() == before


def test_a_preprocessing_process_killed_mid_item_fails_that_item_alone_and_is_replaced(
    processes: Pipeline, tmp_path: Path
) -> None:
    marker = tmp_path / "stalled-pid"
    before = processes.preprocess_pids()
    killed: list[int] = []

    def kill_the_stalled_child() -> None:
        pid = int(wait_for(lambda: marker.exists() and marker.read_text(), 60, "a child to stall"))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_the_stalled_child)
    killer.start()
    items = [(1.0, 2), (-1.0, 2), (2.0, 3), (3.0, 2), (4.0, 2)]
    stages = Stages(Stall(str(marker)), _SUMS.forward, _SUMS.postprocess)
    try:
        results = dict(processes.run(items, lambda item: item, stages, batch_size=2))
    finally:
        killer.join()
    assert results[1] == Failed("the process preprocessing this image died (killed by signal 9)")
    assert [results[i][::2] for i in (0, 2, 3, 4)] == [(1.0, 4.0), (2.0, 18.0), (3.0, 12.0), (4.0, 16.0)]
    after = processes.preprocess_pids()
    assert killed[0] in before and killed[0] not in after and len(after) == 2
    # The replacement works: a second run on the same pool is served whole.
    again = dict(processes.run(items[2:], lambda item: item, _SUMS, batch_size=2))
    assert sorted(again) == [0, 1, 2] and all(pid in after for _, pid, _ in again.values())


def test_an_item_past_its_timeout_in_a_child_fails_and_the_child_is_replaced(
    processes: Pipeline, tmp_path: Path
) -> None:
    marker = tmp_path / "stalled-pid"
    items = [(1.0, 2), (-1.0, 2), (2.0, 2)]
    stages = Stages(Stall(str(marker)), _SUMS.forward, _SUMS.postprocess)
    results = dict(processes.run(items, lambda item: item, stages, batch_size=2, item_timeout=5.0))
    assert results[1] == Failed("not loaded within 5 s")
    assert [results[i][::2] for i in (0, 2)] == [(1.0, 4.0), (2.0, 8.0)]
    stalled = int(marker.read_text())
    # The batcher may fail the item before the pool has replaced the child: wait for the replacement.
    pids = processes.preprocess_pids
    wait_for(lambda: stalled not in pids() and len(pids()) == 2, 10, "the stalled child to be replaced")
    assert dict(processes.run(items[:1], lambda item: item, _SUMS, batch_size=1))[0][::2] == (1.0, 4.0)


def test_closing_the_pipeline_stops_its_processes() -> None:
    pipeline = Pipeline(CPU, load_threads=2, preprocess_processes=2)
    assert dict(pipeline.run([(1.0, 2)], lambda item: item, _SUMS, batch_size=1))[0][::2] == (1.0, 4.0)
    children = pipeline.preprocess_pids()
    pipeline.close()
    assert len(children) == 2
    assert all(wait_for(lambda pid=pid: _gone(pid), 10, f"process {pid} to end") for pid in children)


def test_a_preprocess_that_cannot_be_pickled_is_refused_before_the_run(processes: Pipeline) -> None:
    stages = Stages(lambda item: in_child(item), _SUMS.forward, _SUMS.postprocess)
    with pytest.raises(TypeError, match="picklable preprocess function"):
        processes.run([(1.0, 2)], lambda item: item, stages, batch_size=1)
    # Items already decoded in memory may stay on the threads of the same pipeline.
    assert dict(processes.run([(1.0, 2)], lambda i: i, stages, batch_size=1, in_processes=False))[0][0] == 1.0


@pytest.fixture(scope="module")
def processes() -> Iterator[Pipeline]:
    """One pipeline with two preprocessing processes for the module, reused run after run."""
    made = Pipeline(CPU, load_threads=4, preprocess_processes=2)
    yield made
    made.close()


def _mapped_tensors() -> int:
    """Tensors of this process that live in a preprocessing process's memfd (one mapping each)."""
    return sum("dinolabel-preprocessed" in line for line in Path("/proc/self/maps").read_text().splitlines())


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for the fork server to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


_SUMS = Stages(
    in_child,
    lambda pixels: pixels.sum(dim=(1, 2, 3)),
    lambda sums, metas: [(value, pid, total) for (value, pid), total in zip(metas, sums.tolist(), strict=True)],
)


def _nice_value() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.parametrize("processes", [0, 1], ids=["threads", "processes"])
def test_images_are_prepared_at_a_lower_priority_than_the_device_is_fed(processes: int) -> None:
    # The load threads (or preprocessing processes) yield the cores to the thread running the forward
    # pass, which keeps the caller's nice value.
    base = _nice_value()
    pipeline = Pipeline(CPU, load_threads=2, preprocess_processes=processes, niceness=5)
    forward_nice: list[int] = []

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        forward_nice.append(_nice_value())
        return pixels.sum(dim=(1, 2, 3))

    def postprocess(sums: torch.Tensor, metas: list[tuple[float, int]]) -> list[int]:
        return [nice for _, nice in metas]

    def load(item: tuple[float, int]) -> tuple[float, int]:
        loaded.append(_nice_value())
        return item

    loaded: list[int] = []
    try:
        results = dict(pipeline.run([(1.0, 2)] * 6, load, Stages(with_nice_value, forward, postprocess), batch_size=2))
    finally:
        pipeline.close()
    assert sorted(results) == list(range(6))
    expected = min(19, base + 5)
    assert set(loaded) == {expected}
    assert set(results.values()) == {expected}  # where the preprocessing ran: a load thread or a child
    assert forward_nice and set(forward_nice) == {base}
