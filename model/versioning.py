"""The ``model_version`` string Label Studio stores with each prediction.

It must change whenever the boxes could change (checkpoint, revision, thresholds, precision) and be
computable *before* the model is loaded, because ``/setup`` has to answer within 3 s and must return
exactly what ``/predict`` will later put in its results (otherwise Label Studio stores duplicates).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from model.postprocess import DetectionParams


def checkpoint_fingerprint(checkpoint: str) -> str:
    """For a local folder, the names, sizes and mtimes of its files; for a hub id, the id itself.

    Hub checkpoints are identified by id (and the revision setting): pin a revision in production
    so that an upstream update cannot change boxes under an unchanged version.
    """
    folder = Path(checkpoint)
    if not folder.is_dir():
        return checkpoint
    entries = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir() if p.is_file())
    return json.dumps([str(folder.resolve()), entries])


def model_version(checkpoint: str, *, revision: str | None, params: DetectionParams, precision: str) -> str:
    """``<checkpoint name>-<10 hex digits>``, e.g. ``grounding-dino-tiny-3f2a9c01be``."""
    payload = json.dumps(
        {
            "checkpoint": checkpoint_fingerprint(checkpoint),
            "revision": revision,
            "params": asdict(params),
            "precision": precision,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
    name = Path(checkpoint.rstrip("/")).name or "grounding-dino"
    return f"{name}-{digest}"
