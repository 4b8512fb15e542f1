#!/usr/bin/env python
"""``dinolabel-gpu ARGS...``: claim one GPU of those this container sees, then exec ``dinolabel ARGS...``.

Why: Compose cannot give each replica of a scaled service its own GPU. A device reservation with
``count: 1`` becomes NVIDIA_VISIBLE_DEVICES=0 in *every* replica (Docker turns a count into the ids
0..count-1), so ``--scale gpu-worker=4`` would put four workers on GPU 0. The compose file therefore
lets each worker container see all GPUs (``count: all``), and this wrapper picks one:

- GPUs are listed by UUID with ``nvidia-smi`` (injected by the NVIDIA container toolkit).
- A claim is an exclusive ``flock`` on ``<lock dir>/<uuid>.<slot>.lock``, held by the worker process
  itself (the descriptor survives the exec) and released by the kernel when it exits, however it
  exits. Slots are tried GPU by GPU before the next slot: with N replicas on G GPUs, every GPU gets
  N/G workers, rounded.
- The claimed GPU is passed as CUDA_VISIBLE_DEVICES=<uuid>, so the worker's ``auto`` device is it.

The lock directory (DINOLABEL_GPU_LOCK_DIR, default /data/locks) must be one volume shared by all
worker containers of the host. Nothing is claimed (plain exec) when CUDA_VISIBLE_DEVICES is already
set, when DINOLABEL_DEVICE names something other than ``auto``/``cuda``, or when no GPU is listed.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys

MAX_SLOTS = 64


def log(message: str) -> None:
    print(f"dinolabel-gpu: {message}", file=sys.stderr, flush=True)


def gpu_uuids() -> list[str]:
    """The GPUs this container sees, by UUID, in nvidia-smi's order; [] if it cannot tell."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log(f"cannot list GPUs with nvidia-smi ({exc})")
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip().startswith(("GPU-", "MIG-"))]


def claim(uuids: list[str], lock_dir: str) -> tuple[str, int, int] | None:
    """(uuid, slot, descriptor holding the lock) for the first free slot, least-loaded GPU first."""
    os.makedirs(lock_dir, exist_ok=True)
    for slot in range(MAX_SLOTS):
        for uuid in uuids:
            fd = os.open(os.path.join(lock_dir, f"{uuid}.{slot}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
            return uuid, slot, fd
    return None


def main(argv: list[str]) -> int:
    command = ["dinolabel", *argv[1:]]
    device = os.environ.get("DINOLABEL_DEVICE", "auto")
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None or device not in ("auto", "cuda"):
        log(f"no claim (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, DINOLABEL_DEVICE={device!r})")
    else:
        uuids = gpu_uuids()
        claimed = claim(uuids, os.environ.get("DINOLABEL_GPU_LOCK_DIR", "/data/locks")) if uuids else None
        if claimed is None:
            log(f"no GPU claimed among {len(uuids)} listed; starting without CUDA_VISIBLE_DEVICES")
        else:
            uuid, slot, fd = claimed
            os.set_inheritable(fd, True)  # the lock lives as long as the exec'd process
            os.environ["CUDA_VISIBLE_DEVICES"] = uuid
            log(f"GPU {uuids.index(uuid)} of {len(uuids)} ({uuid}), slot {slot}")
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv))
