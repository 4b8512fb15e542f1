"""How should a preprocessed tensor come back from a child process? Parent CPU per image, three ways.

Why this script exists: preprocessing in processes (``model/preprocess_pool.py``) is only worth it if
bringing the tensor back costs the parent (the process whose thread feeds the GPU) less than the
preprocessing it gave away. A Grounding DINO input is ~10 MB of float32 (3x800x1066). Three ways,
each a child that makes one such tensor per request and the parent that receives it and copies it into
a batch (what the pipeline's stacking does):

* ``memfd``: ``PreprocessPool`` as the pipeline uses it (the child writes the tensor into a fresh memfd,
  the descriptor crosses the socket, the parent maps it);
* ``torch``: ``torch.multiprocessing``'s reductions (the child moves the tensor into shared memory, the
  parent fetches the descriptor from the child's resource sharer and maps it);
* ``pickle``: the tensor's bytes pickled through the pipe (the baseline to beat).

Run from the repository root (about 20 s)::

    .venv/bin/python bench/preprocess_transfer.py [--images 60] [--shape 3,800,1066]
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import resource
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import OtherLoad, busy, machine_info, tree_cpu_seconds, write_report
from model.preprocess_pool import PreprocessPool, PreprocessTask

REPO = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", message="The given buffer is not writable")  # read only, as pickled bytes are


class Make:
    """The child's work: one tensor of ``shape`` per request (same cost in every method)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __call__(self, value: float) -> tuple[torch.Tensor, None]:
        return torch.full((1, *self.shape), value), None


def _child(conn: Any, shape: tuple[int, ...], method: str) -> None:
    """A child for the ``torch`` and ``pickle`` methods: answers each request with one tensor."""
    importlib.import_module("torch.multiprocessing")  # registers its reductions with multiprocessing's pickler
    torch.set_num_threads(1)
    make = Make(shape)
    while True:
        try:
            value = conn.recv()
        except EOFError:
            return
        tensor, _ = make(value)
        conn.send(tensor if method == "torch" else tensor.numpy().tobytes())


def parent_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(method: str, images: int, shape: tuple[int, ...]) -> dict[str, Any]:
    batch = torch.empty((1, *shape))
    receive: Callable[[float], torch.Tensor]
    if method == "memfd":
        pool = PreprocessPool(1)
        task = PreprocessTask.of(Make(shape))
        receive = lambda value: pool.run(task, value)[0]  # noqa: E731
        pids, stop = pool.pids(), pool.close
    else:
        importlib.import_module("torch.multiprocessing")  # to rebuild what the child shares
        context = multiprocessing.get_context("forkserver")
        conn, child_end = multiprocessing.Pipe()
        process = context.Process(target=_child, args=(child_end, shape, method), daemon=True)
        process.start()
        child_end.close()

        def receive(value: float) -> torch.Tensor:
            conn.send(value)
            answer = conn.recv()
            return answer if method == "torch" else torch.frombuffer(answer, dtype=torch.float32)

        pids = [process.pid]

        def stop() -> None:
            conn.close()
            process.join(5)

    for i in range(3):  # warm-up: imports, first mappings
        batch.view(-1).copy_(receive(float(i)).view(-1))
    meter = OtherLoad(lambda: parent_cpu() + sum(tree_cpu_seconds(pid) for pid in pids))
    child = sum(tree_cpu_seconds(pid) for pid in pids)
    cpu, started = parent_cpu(), time.perf_counter()
    for i in range(images):
        batch.view(-1).copy_(receive(float(i)).view(-1))
    wall, cpu = time.perf_counter() - started, parent_cpu() - cpu
    child = sum(tree_cpu_seconds(pid) for pid in pids) - child
    assert float(batch.view(-1)[-1]) == float(images - 1)
    stop()
    return {
        "method": method,
        "parent_cpu_ms_per_image": round(cpu / images * 1000, 2),
        "child_cpu_ms_per_image": round(child / images * 1000, 2),
        "wall_ms_per_image": round(wall / images * 1000, 2),
        "other_processes_cores": meter.cores(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--shape", default="3,800,1066", help="one image's tensor (Grounding DINO: 3,800,1066)")
    parser.add_argument("--methods", default="memfd,torch,pickle")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "preprocess_transfer.json")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = []
    for method in args.methods.split(","):
        row = measure(method, args.images, shape)
        rows.append(row)
        print(
            f"{method:6} parent {row['parent_cpu_ms_per_image']:6.2f} CPU ms/image, child "
            f"{row['child_cpu_ms_per_image']:6.2f}, wall {row['wall_ms_per_image']:6.2f} ms/image | "
            + busy(row["other_processes_cores"]),
            flush=True,
        )
    report = {"benchmark": "preprocess_transfer", "shape": list(shape), "images": args.images, "results": rows}
    write_report(args.out, {**report, "machine": machine_info(), "wall_s": round(time.perf_counter() - started, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
