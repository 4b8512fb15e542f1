"""Exact farthest-first traversal (greedy k-center), evaluated lazily: the engine under
:mod:`indexer.priority`.

Each pick is the row with the highest score ``(1 - w) * distance + w * uncertainty`` (distance: cosine
distance to the nearest seed or earlier pick), exactly as the naive loop that updates every row after
every pick would choose it, up to float32 rounding. A row's distance to the picked set only shrinks, so
a stale distance is an upper bound: rows wait in the order of their bounds, only a window at the head of
that order is kept up to date (one matrix-vector product of the window per pick), and the window's best
row is the next pick as soon as it beats the bound of the first row outside it. When keeping the window
up to date has cost more than bringing every row up to date at once (one matrix-matrix product, far
faster per row; ``_REFRESH_RATIO``), that is done and the order re-sorted.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["BLOCK_FLOATS", "FarthestFirst", "raise_best"]

BLOCK_FLOATS = 32 * 2**20
"""Similarity scores held at once when comparing blocks of vectors (128 MiB)."""
_REFRESH_RATIO = 32  # a refresh (matrix product) costs ~1/32 per row-pick of the window's vector products


class FarthestFirst:
    """Exact farthest-first over ``data``, evaluated lazily (see the module docstring).

    ``best[row]`` is the row's highest cosine to the seeds and to the first ``upto[row]`` picks, so the
    score it gives is an upper bound of the true one (more picks only bring a row nearer). Rows wait in
    ``queue`` in the order of those bounds; the rows of a window taken from the queue's head are kept up
    to date (their vectors side by side, one product per pick), and the window's best row is the exact
    next pick once its score reaches the bound of the first row still in the queue. When keeping the
    window up to date has cost more than bringing every row up to date at once would (a matrix product,
    ~8x faster per row than the window's vector products), every row is, and the queue is re-sorted.
    """

    def __init__(
        self,
        data: np.ndarray,
        best: np.ndarray,
        nearest: np.ndarray,
        uncertainty: np.ndarray | None,
        weight: float,
        near_duplicate: float | None,
    ) -> None:
        self.data = data
        self.best = best.astype(np.float32)
        self.nearest = nearest.copy()
        self.unc = uncertainty
        self.weight = weight
        self.near_duplicate = near_duplicate
        self.upto = np.zeros(len(data), dtype=np.int64)
        self.alive = np.ones(len(data), dtype=bool)
        self.picks: list[int] = []
        self.picked_vectors = np.empty((0, data.shape[1]), dtype=np.float32)  # grown by doubling
        self.picked_ids = np.empty(0, dtype=np.int64)
        self.picked_best: list[float] = []
        self.picked_nearest: list[int] = []
        self.picked_score: list[float] = []
        self.duplicates: list[int] = []
        self.refreshes = 0
        self._retire(np.arange(len(data)))
        self._requeue()

    def _score(self, rows: np.ndarray) -> np.ndarray:
        score = (1.0 - self.weight) * (1.0 - self.best[rows])
        if self.unc is not None:
            score = score + self.weight * self.unc[rows]
        return score.astype(np.float32)

    def _retire(self, rows: np.ndarray) -> np.ndarray:
        """Retire rows now at cosine >= near_duplicate to a labeled or picked task; returns the others."""
        if self.near_duplicate is None:
            return rows
        close = self.best[rows] >= self.near_duplicate
        if close.any():
            self.alive[rows[close]] = False
            self.duplicates += rows[close].tolist()
        return rows[~close]

    def _requeue(self) -> None:
        rows = np.flatnonzero(self.alive)
        self.queue = rows[np.lexsort((rows, -self._score(rows)))]
        self.head = 0  # queue[:head] are in the window or gone
        self.window = np.empty(0, dtype=np.int64)
        self.window_vectors = np.empty((0, self.data.shape[1]), dtype=np.float32)
        self.refreshed_at = len(self.picks)
        self.window_work = 0  # rows brought up to date one pick at a time since the last refresh

    def _catch_up(self, rows: np.ndarray) -> None:
        """Bring ``best``/``nearest`` of ``rows`` up to date with every pick (one product per staleness)."""
        total = len(self.picks)
        stale = rows[self.upto[rows] < total]
        if not len(stale):
            return
        for since in np.unique(self.upto[stale]).tolist():
            group = stale[self.upto[stale] == since]
            picked = self.picked_vectors[since:total]
            step = max(1, BLOCK_FLOATS // len(picked))
            for first in range(0, len(group), step):
                block = group[first : first + step]
                sims = self.data[block] @ picked.T
                at = np.argmax(sims, axis=1)
                top = sims[np.arange(len(block)), at]
                better = top > self.best[block]
                self.best[block[better]] = top[better]
                self.nearest[block[better]] = self.picked_ids[since:total][at[better]]
            self.upto[group] = total

    def run(self, budget: int, task_ids: np.ndarray) -> Iterable[int]:
        """Yield up to ``budget`` picks (row numbers), each the exact farthest (best-scoring) row."""
        while len(self.picks) < budget:
            bound = (
                float(self._score(self.queue[self.head : self.head + 1])[0]) if self.head < len(self.queue) else None
            )
            if len(self.window):
                scores = self._score(self.window)
                top = float(scores.max())
                if bound is None or top >= bound:
                    at = int(np.flatnonzero(scores == top)[np.argmin(self.window[scores == top])])
                    yield self._pick(at, top, task_ids)
                    continue
            elif bound is None:
                return  # nothing left
            alive = len(self.queue) - self.head + len(self.window)
            if len(self.window) >= 64 and _REFRESH_RATIO * self.window_work > alive * (
                len(self.picks) - self.refreshed_at
            ):
                self.refresh()
                continue
            grow = max(16, len(self.window))
            added = self.queue[self.head : self.head + grow]
            self.head += len(added)
            self._catch_up(added)
            added = self._retire(added)
            self._extend_window(added)

    def _extend_window(self, rows: np.ndarray) -> None:
        """Append rows to the window; its buffers double when full, so appending is amortised O(1)."""
        size, need = len(self.window), len(self.window) + len(rows)
        base = self.window_vectors.base if self.window_vectors.base is not None else self.window_vectors
        if need > len(base):
            room = max(64, 2 * need)
            vectors = np.empty((room, self.data.shape[1]), dtype=np.float32)
            vectors[:size] = self.window_vectors
            ids = np.empty(room, dtype=np.int64)
            ids[:size] = self.window
        else:
            vectors, ids = base, self.window.base if self.window.base is not None else self.window
        vectors[size:need] = self.data[rows]
        ids[size:need] = rows
        self.window, self.window_vectors = ids[:need], vectors[:need]

    def _pick(self, at: int, score: float, task_ids: np.ndarray) -> int:
        row = int(self.window[at])
        last = len(self.window) - 1  # the last entry takes the picked one's place: no copy of the window
        self.window[at], self.window_vectors[at] = self.window[last], self.window_vectors[last]
        self.window, self.window_vectors = self.window[:last], self.window_vectors[:last]
        self.alive[row] = False
        self.picked_best.append(float(self.best[row]))
        self.picked_nearest.append(int(self.nearest[row]))
        self.picked_score.append(score)
        count = len(self.picks)
        if count == len(self.picked_ids):
            room = max(64, 2 * count)
            self.picked_vectors = np.resize(self.picked_vectors, (room, self.data.shape[1]))
            self.picked_ids = np.resize(self.picked_ids, room)
        self.picked_vectors[count] = self.data[row]
        self.picked_ids[count] = task_ids[row]
        self.picks.append(row)
        # The window stays up to date: one product with the new pick.
        if len(self.window):
            sims = self.window_vectors @ self.data[row]
            better = sims > self.best[self.window]
            self.best[self.window[better]] = sims[better]
            self.nearest[self.window[better]] = task_ids[row]
            self.upto[self.window] = count + 1
            self.window_work += len(self.window)
            if self.near_duplicate is not None and better.any():
                close = self.best[self.window] >= self.near_duplicate
                if close.any():
                    self.alive[self.window[close]] = False
                    self.duplicates += self.window[close].tolist()
                    self.window, self.window_vectors = self.window[~close], self.window_vectors[~close]
        return row

    def refresh(self) -> None:
        """Bring every remaining row up to date and re-sort them."""
        self.refreshes += 1
        rows = np.flatnonzero(self.alive)
        self._catch_up(rows)
        self._retire(rows)
        self._requeue()

    def tail(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows not picked (nor duplicates), best score first, ties in row order, and their scores:
        the approximate tail."""
        self.refresh()
        rows = self.queue
        self.alive[rows] = False
        return rows, self._score(rows)


def raise_best(
    best: np.ndarray, nearest: np.ndarray, data: np.ndarray, seeds: np.ndarray, seed_ids: np.ndarray
) -> None:
    """Raise ``best`` to each row's highest cosine with ``seeds`` (``nearest`` to that seed's id), in blocks."""
    if not len(seeds) or not len(data):
        return
    step = max(1, BLOCK_FLOATS // len(seeds))
    for first in range(0, len(data), step):
        sims = data[first : first + step] @ seeds.T
        at = np.argmax(sims, axis=1)
        top = sims[np.arange(len(at)), at]
        better = top > best[first : first + step]
        block_best = best[first : first + step]
        block_nearest = nearest[first : first + step]
        block_best[better] = top[better]
        block_nearest[better] = seed_ids[at[better]]
