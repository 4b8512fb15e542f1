"""Seeded synthetic embeddings shaped like real ones: L2-normalised, in clusters of similar items."""

from __future__ import annotations

import numpy as np


def clustered(n: int, dim: int, *, clusters: int, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random unit centres; ``spread`` is the noise per dimension
    relative to 1/sqrt(dim), so the cosine to the centre is ~1/sqrt(1+spread^2) whatever ``dim``."""
    return clustered_with_members(n, dim, clusters=clusters, spread=spread, seed=seed)[0]


def clustered_with_members(
    n: int, dim: int, *, clusters: int, spread: float = 0.35, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`clustered`'s vectors and the cluster each was drawn around (same vectors for the same seed)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((clusters, dim), dtype=np.float32))
    out = np.empty((n, dim), dtype=np.float32)
    cluster = np.empty(n, dtype=np.int64)
    step = 100_000  # blocks keep the temporary noise small at a million vectors
    for start in range(0, n, step):
        stop = min(n, start + step)
        members = rng.integers(0, clusters, stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        out[start:stop] = _unit(centres[members] + noise)
        cluster[start:stop] = members
    return out, cluster


def near_copies(base: np.ndarray, *, count: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` rows of ``base`` picked at random, perturbed by ``noise`` (relative, as above) and
    renormalised: ``(copies, index of each copy's original in base)``."""
    rng = np.random.default_rng(seed)
    originals = rng.choice(len(base), size=count, replace=False)
    dim = base.shape[1]
    copies = _unit(base[originals] + rng.standard_normal((count, dim), dtype=np.float32) * (noise / np.sqrt(dim)))
    return copies, originals


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
