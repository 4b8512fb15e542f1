"""Labeling priority: the order in which a project's unlabeled tasks are worth an annotator's time.

Four parts, in the order they take places in the queue:

1. **More like these** (optional): query vectors (example tasks, the boxes of a label, uploaded images).
   Each task's match is its highest cosine to any query. Each of the q queries brings its
   ``like_count * LIKE_POOL_FACTOR / q`` nearest tasks into a pool (as DINOv2's data curation retrieves
   per query image); the pool is clustered with faiss k-means (``like_clusters``) and dealt out
   round-robin, cluster by cluster (each cluster best match first, clusters in the order of their best
   match), so one burst of look-alikes cannot take the whole front of the queue. The first
   ``like_count`` that are not near duplicates of a labeled or earlier front task become ranks 0, 1, ...
2. **Diverse**: farthest-first traversal (greedy k-center), seeded with the labeled tasks and the "like"
   picks: each next task is the one farthest (cosine distance, 1 - cos) from everything labeled or
   ranked before it. With per-task ``uncertainty`` u in [0, 1] and weight w, the next task is instead
   the one with the highest ``score = (1 - w) * distance + w * u`` (w = 0: pure diversity; w = 1:
   uncertainty alone, diversity only breaking ties). Distances keep shrinking as tasks are ranked, so
   an uncertain task moves ahead of far-away ones, but not of much farther ones.
3. **Approximate tail**: after ``exact_head`` exact picks, the remaining tasks by their score against
   everything labeled or ranked so far, highest first. This is "distance to the picked set", not a
   re-run of the greedy: bench/priority.py measures its coverage. The default head is scaled to the
   project (:func:`exact_head_for`): its cost is ~N x head x d multiply-adds, so 5000 exact picks up to
   20k tasks and 1000 from 100k tasks on keep 100k tasks in seconds and 1M in about a minute.
4. **Duplicates**, last: a task in ``duplicates`` (a :class:`~indexer.duplicates.DuplicateReport` or a
   ``task -> duplicate_of`` mapping) whose original is labeled or ranked, and every task whose nearest
   labeled or higher-ranked task is at cosine >= ``near_duplicate`` (0.9, the embedding duplicate
   threshold) is marked with the task it duplicates. Copies of unlabeled tasks come first, in the rank
   order of their originals (they become useless once the original is labeled); copies of labeled
   tasks come last.

**Exact, lazily** (:mod:`indexer.farthest_first`): each pick is the farthest task left, up to float32
rounding (tested against the naive O(N^2) loop), but only the tasks that could be the next pick are
brought up to date after each pick. In high dimensions distances concentrate, so that can still cost
O(N) per pick: hence the exact head (``exact_head``, 1000 to 5000 by default) and the approximate tail.

**Incremental** (:func:`place`): new tasks are inserted where the greedy would have taken them against
the existing order (the first rank whose pick score their own score at that point reaches, their
distance computed to the labeled tasks and everything ranked before that point, new tasks placed before
them included). The tasks after an insertion keep their order and their explanations (an exact re-rank
could reorder them and find them nearer to the new task): approximate, and tested close to a full
re-rank. Deleted or newly labeled tasks: :meth:`Ranking.without` (also approximate). A full
:func:`rank` is cheap enough to redo regularly.

Distances are cosine distances between L2-normalised vectors; nothing here reads the environment.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np

from indexer.duplicates import DEFAULT_EMBEDDING_THRESHOLD, DuplicateReport
from indexer.farthest_first import FarthestFirst, raise_best

__all__ = [
    "DEFAULT_EXACT_HEAD",
    "DEFAULT_LIKE_CLUSTERS",
    "DEFAULT_LIKE_COUNT",
    "DEFAULT_NEAR_DUPLICATE",
    "DEFAULT_UNCERTAINTY_WEIGHT",
    "EXACT_WORK",
    "LIKE_POOL_FACTOR",
    "MIN_EXACT_HEAD",
    "Ranking",
    "coverage",
    "exact_head_for",
    "place",
    "rank",
]

log = logging.getLogger(__name__)

DEFAULT_NEAR_DUPLICATE = DEFAULT_EMBEDDING_THRESHOLD
"""Cosine to a labeled or higher-ranked task at which a task counts as its near duplicate (0.9)."""
DEFAULT_UNCERTAINTY_WEIGHT = 0.3
"""w in ``score = (1 - w) * distance + w * uncertainty`` when uncertainties are given."""
DEFAULT_LIKE_COUNT = 100
"""Tasks that "more like these" moves to the front."""
DEFAULT_LIKE_CLUSTERS = 8
"""k-means clusters the "more like these" matches are balanced across."""
LIKE_POOL_FACTOR = 4
"""The best ``like_count * LIKE_POOL_FACTOR`` matches are clustered; the front is drawn from them."""
DEFAULT_EXACT_HEAD = 5_000
"""Most picks the exact greedy makes by default before the approximate tail (bench/priority.py measures both)."""
MIN_EXACT_HEAD = 1_000
"""Fewest picks the exact greedy makes by default, however many tasks there are."""
EXACT_WORK = 100_000_000
"""Tasks x exact picks the default head may cost (the final distances alone are that many dot products):
5000 picks up to 20k tasks, 1000 from 100k tasks on."""


# Where a task's place came from (the ``reason`` of its explanation).
LIKE, DIVERSE, TAIL, DUPLICATE = "like", "diverse", "tail", "duplicate"
UNCERTAIN = "uncertain"
"""The category :meth:`Ranking.ranks` gives a diverse or tail task that its uncertainty moved ahead."""
_ROUNDING = 1e-6  # scores are float32: differences below this are ties


@dataclass(frozen=True)
class Ranking:
    """Every unlabeled task in rank order (``task_ids[r]`` has rank ``r``, 0 = label first), with why.

    Arrays are aligned with ``task_ids``; ``-1`` / NaN mean "none".
    """

    task_ids: np.ndarray  # int64
    reason: np.ndarray  # str: like, diverse, tail, duplicate
    distance: np.ndarray  # float32: cosine distance to ``nearest`` when placed (NaN: nothing to compare)
    nearest: np.ndarray  # int64: nearest labeled or higher-ranked task when placed
    duplicate_of: np.ndarray  # int64
    uncertainty: np.ndarray  # float32: the detector's uncertainty (NaN: the task had none)
    like: np.ndarray  # float32: best cosine to the "like these" queries
    score: np.ndarray  # float32: the greedy's score when picked (what :func:`place` compares against)
    exact_head: int  # ranks below this came from the exact greedy ("like" front included)
    labeled: frozenset[int] = frozenset()
    uncertainty_weight: float = 0.0  # w of the scores (0 when no uncertainty was given)

    def __len__(self) -> int:
        return len(self.task_ids)

    def rank_of(self) -> dict[int, int]:
        return {int(task): position for position, task in enumerate(self.task_ids.tolist())}

    def explain(self, position: int) -> dict[str, Any]:
        """JSON-friendly facts about the task at rank ``position``."""

        def number(value: float) -> float | None:
            return None if math.isnan(value) else round(float(value), 4)

        def task(value: int) -> int | None:
            return None if value < 0 else int(value)

        nearest = task(self.nearest[position])
        return {
            "task_id": int(self.task_ids[position]),
            "rank": position,
            "reason": str(self.reason[position]),
            "distance": number(self.distance[position]),
            "nearest": nearest,
            "nearest_is_labeled": None if nearest is None else nearest in self.labeled,
            "duplicate_of": task(self.duplicate_of[position]),
            "uncertainty": number(self.uncertainty[position]),
            "uncertainty_moved": self._moved(position),
            "like": number(self.like[position]),
            "text": self.text(position),
        }

    def explanations(self) -> list[dict[str, Any]]:
        return [self.explain(position) for position in range(len(self))]

    def text(self, position: int) -> str:
        """One short line for a person (the Data Manager's reason column)."""
        reason = str(self.reason[position])
        distance, nearest = float(self.distance[position]), int(self.nearest[position])
        near = (
            ""
            if nearest < 0
            else f"{distance:.3f} from task {nearest}" + (" (labeled)" if nearest in self.labeled else "")
        )
        if reason == DUPLICATE:
            original = int(self.duplicate_of[position])
            kind = "labeled " if original in self.labeled else ""
            similarity = "" if math.isnan(distance) else f", cosine {1 - distance:.3f}"
            out = f"duplicate of {kind}task {original}{similarity}"
        elif reason == LIKE:
            out = f"like these: match {float(self.like[position]):.3f}" + (f"; {near}" if near else "")
        elif nearest < 0:
            out = "first pick: nothing labeled yet"
        else:
            out = ("new: " if reason == DIVERSE else "approximate order: ") + near
        if not math.isnan(float(self.uncertainty[position])):
            out += f"; uncertainty {float(self.uncertainty[position]):.2f}"
            if self._moved(position):
                out += " (moved it ahead)"
        return out

    def moved_by_uncertainty(self) -> np.ndarray:
        """Per rank: did the task's uncertainty move it ahead? True when its score without the uncertainty
        term is not above the score of the task ranked next (up to float32 rounding): without it, that task
        would have been picked first, or tied with it (distances only shrink, so the next task scored at
        least that much when this one was picked). Front ("like") tasks and duplicates are never moved."""
        own = self.score.astype(np.float64) - self.uncertainty_weight * np.nan_to_num(self.uncertainty)
        following = np.append(self.score[1:], -np.inf).astype(np.float64)
        ranked = (self.reason == DIVERSE) | (self.reason == TAIL)
        positive = np.nan_to_num(self.uncertainty) > 0
        return ranked & positive & (self.uncertainty_weight > 0) & (own <= following + _ROUNDING)

    def _moved(self, position: int) -> bool:
        if self.reason[position] not in (DIVERSE, TAIL) or self.uncertainty_weight <= 0:
            return False
        u = float(self.uncertainty[position])
        if math.isnan(u) or u <= 0 or position + 1 >= len(self):
            return False
        own = float(self.score[position]) - self.uncertainty_weight * u
        return own <= float(self.score[position + 1]) + _ROUNDING

    def ranks(self) -> dict[int, tuple[int, str]]:
        """``task_id -> (rank, reason)`` with the reason's category (like, diverse, tail, duplicate, or
        uncertain for a task its uncertainty moved ahead): what ``backend.ls_priority.write_priority``
        writes into Label Studio, which costs one call per distinct reason. The per-task detail is
        :meth:`text` / :meth:`explain`."""
        reasons = np.where(self.moved_by_uncertainty(), UNCERTAIN, self.reason)
        return {
            int(task): (position, str(reason))
            for position, (task, reason) in enumerate(zip(self.task_ids.tolist(), reasons.tolist(), strict=True))
        }

    def without(self, task_ids: Iterable[int]) -> Ranking:
        """The ranking with tasks removed (deleted, or labeled since) and the rest renumbered.

        Approximate: the tasks that had one of them as ``nearest`` keep their place and explanation.
        """
        gone = np.fromiter(task_ids, dtype=np.int64)
        keep = ~np.isin(self.task_ids, gone)
        head = int(keep[: self.exact_head].sum())
        return _select(self, keep, head)


def rank(
    task_ids: np.ndarray,
    vectors: np.ndarray,
    labeled: Collection[int] = (),
    *,
    duplicates: DuplicateReport | Mapping[int, int] | None = None,
    uncertainty: np.ndarray | Mapping[int, float] | None = None,
    uncertainty_weight: float = DEFAULT_UNCERTAINTY_WEIGHT,
    like: np.ndarray | None = None,
    like_count: int = DEFAULT_LIKE_COUNT,
    like_clusters: int = DEFAULT_LIKE_CLUSTERS,
    near_duplicate: float | None = DEFAULT_NEAR_DUPLICATE,
    exact_head: int | Literal["auto"] | None = "auto",
    seed: int = 0,
) -> Ranking:
    """Rank every unlabeled task of ``task_ids``.

    Args:
        task_ids: int64 (n,), unique; labeled tasks included (their vectors seed the greedy).
        vectors: float32 (n, d), L2-normalised, row i belongs to ``task_ids[i]``.
        labeled: labeled task ids; ids without a row are ignored except as duplicates' originals.
        duplicates: exact/near duplicate groups (keepers are the originals), or ``task -> original``.
        uncertainty: per task in [0, 1] (array aligned with ``task_ids``, or a mapping); a task without
            one (absent, NaN) is scored without the term, so uncertainty only ever moves a task ahead.
        uncertainty_weight: w in ``score = (1 - w) * distance + w * uncertainty`` (0.3).
        like: float32 (q, d) query vectors for "more like these"; None: no front.
        like_count: tasks moved to the front by ``like`` (100).
        like_clusters: k-means clusters the front is balanced across (8).
        near_duplicate: cosine to a labeled or higher-ranked task at which a task is pushed to the end
            as its duplicate (0.9); None: only ``duplicates`` are.
        exact_head: exact greedy picks before the approximate tail; "auto": :func:`exact_head_for` the
            number of tasks left to rank (5000 up to 20k, 1000 from 100k on); None: all (exact throughout).
        seed: k-means seed (the result is deterministic for a given input and seed).
    """
    started = time.perf_counter()
    ids, data = _check(task_ids, vectors)
    if not 0.0 <= uncertainty_weight <= 1.0:
        raise ValueError(f"uncertainty_weight must be in [0, 1], got {uncertainty_weight}")
    if near_duplicate is not None and not 0.0 < near_duplicate <= 1.0:
        raise ValueError(f"near_duplicate must be a cosine in (0, 1], got {near_duplicate}")
    if exact_head != "auto" and exact_head is not None and exact_head < 0:
        raise ValueError(f"exact_head must be >= 0, got {exact_head}")
    labeled_set = frozenset(int(task) for task in labeled)
    is_labeled = np.isin(ids, np.fromiter(labeled_set, dtype=np.int64, count=len(labeled_set)))
    unc = _uncertainty(uncertainty, ids)
    weight = uncertainty_weight if unc is not None else 0.0
    position_of = {int(task): i for i, task in enumerate(ids.tolist())}

    # Known duplicates of labeled tasks or of other unlabeled tasks leave the candidates at once.
    original = _originals(duplicates, position_of, labeled_set, is_labeled)
    unlabeled = np.flatnonzero(~is_labeled)
    known_dup = unlabeled[original[unlabeled] != -1]
    candidates = unlabeled[original[unlabeled] == -1]

    # State per candidate: best cosine to anything labeled/ranked and which task that is.
    best = np.full(len(candidates), -1.0, dtype=np.float32)
    nearest = np.full(len(candidates), -1, dtype=np.int64)
    seeds = np.flatnonzero(is_labeled)
    candidate_data = data[candidates]  # one copy, rows in candidate order
    raise_best(best, nearest, candidate_data, data[seeds], ids[seeds])

    order: list[int] = []  # positions (into ids) in rank order
    reasons: list[str] = []
    placed_distance: list[float] = []
    placed_nearest: list[int] = []
    placed_score: list[float] = []
    dup_pos: list[int] = []
    dup_of: list[int] = []
    dup_sim: list[float] = []
    like_scores = None

    alive = np.ones(len(candidates), dtype=bool)
    if near_duplicate is not None:
        _retire_duplicates(alive, best, nearest, near_duplicate, candidates, dup_pos, dup_of, dup_sim)

    if like is not None:
        queries = _check_queries(like, data.shape[1])
        like_scores = np.full(len(ids), np.nan, dtype=np.float32)
        matches = _best_cosine(data, queries)
        like_scores[unlabeled] = matches[unlabeled]
        front = _like_front(candidate_data, queries, alive, matches[candidates], like_count, like_clusters, seed)
        accepted: list[int] = []
        for row in front:
            if len(accepted) == like_count:
                break
            # Each front pick is compared with everything labeled or picked before it, like the greedy.
            similarity, holder = float(best[row]), int(nearest[row])
            if accepted:
                to_front = candidate_data[accepted] @ candidate_data[row]
                at = int(np.argmax(to_front))
                if to_front[at] > similarity:
                    similarity, holder = float(to_front[at]), int(ids[candidates[accepted[at]]])
            alive[row] = False
            if near_duplicate is not None and similarity >= near_duplicate:
                dup_pos.append(int(candidates[row]))
                dup_of.append(holder)
                dup_sim.append(similarity)
                continue
            accepted.append(row)
            order.append(int(candidates[row]))
            reasons.append(LIKE)
            placed_distance.append(_distance(similarity, holder))
            placed_nearest.append(holder)
            placed_score.append(np.inf)
        if accepted:  # the rest now measure their distance to the front too: one product
            raise_best(best, nearest, candidate_data, candidate_data[accepted], ids[candidates[accepted]])
            if near_duplicate is not None:
                _retire_duplicates(alive, best, nearest, near_duplicate, candidates, dup_pos, dup_of, dup_sim)

    # The greedy over the remaining candidates.
    rest = candidates[alive]
    budget = len(rest) if exact_head is None else exact_head
    head_budget = exact_head_for(len(rest)) if budget == "auto" else int(budget)
    greedy = FarthestFirst(
        candidate_data if alive.all() else candidate_data[alive],  # no second copy when nothing was retired
        best[alive],
        nearest[alive],
        None if unc is None else np.nan_to_num(unc[rest]),
        weight,
        near_duplicate,
    )
    for row in greedy.run(head_budget, ids[rest]):
        order.append(int(rest[row]))
        reasons.append(DIVERSE)
        placed_distance.append(_distance(greedy.picked_best[-1], greedy.picked_nearest[-1]))
        placed_nearest.append(greedy.picked_nearest[-1])
        placed_score.append(greedy.picked_score[-1])
    head = len(order)
    # The tail and the duplicates as arrays: no Python step per task (100k-1M of them).
    tail_rows, tail_score = greedy.tail()
    final_best, final_nearest = greedy.best, greedy.nearest
    tail_nearest = final_nearest[tail_rows]
    greedy_dups = np.asarray(greedy.duplicates, dtype=np.int64)
    known_root = original[known_dup]
    known_sim = np.full(len(known_dup), np.nan)
    has_row = known_root >= 0
    known_sim[has_row] = np.einsum("ij,ij->i", data[known_dup[has_row]], data[known_root[has_row]])
    dup_positions = np.concatenate([np.asarray(dup_pos, dtype=np.int64), rest[greedy_dups], known_dup])
    dup_original = np.concatenate(
        [
            np.asarray(dup_of, dtype=np.int64),
            final_nearest[greedy_dups],
            np.where(has_row, ids[np.maximum(known_root, 0)], -2 - known_root),
        ]
    )
    dup_similarity = np.concatenate([np.asarray(dup_sim, dtype=np.float64), final_best[greedy_dups], known_sim])

    # Duplicates last: copies of ranked tasks in their originals' order, then copies of labeled tasks.
    ranked_positions = np.concatenate([np.asarray(order, dtype=np.int64), rest[tail_rows]])
    original_rank = _rank_in(ids[ranked_positions], dup_original)
    dup_order = np.lexsort((dup_positions, np.maximum(original_rank, 0), original_rank < 0))
    dup_positions, dup_original, dup_similarity = (
        dup_positions[dup_order],
        dup_original[dup_order],
        dup_similarity[dup_order],
    )

    positions = np.concatenate([ranked_positions, dup_positions])
    n_dup = len(dup_positions)
    reason = np.concatenate(
        [
            np.array(reasons, dtype=object),
            np.full(len(tail_rows), TAIL, dtype=object),
            np.full(n_dup, DUPLICATE, dtype=object),
        ]
    )
    is_dup = np.zeros(len(positions), dtype=bool)
    is_dup[len(ranked_positions) :] = True
    duplicate_of = np.full(len(positions), -1, dtype=np.int64)
    duplicate_of[is_dup] = dup_original
    ranking = Ranking(
        task_ids=ids[positions],
        reason=reason,
        distance=np.concatenate(
            [
                np.asarray(placed_distance, dtype=np.float32),
                np.where(tail_nearest >= 0, 1.0 - final_best[tail_rows], np.nan).astype(np.float32),
                (1.0 - dup_similarity).astype(np.float32),
            ]
        ),
        nearest=np.concatenate([np.asarray(placed_nearest, dtype=np.int64), tail_nearest, dup_original]),
        duplicate_of=duplicate_of,
        uncertainty=np.full(len(positions), np.nan, dtype=np.float32) if unc is None else unc[positions],
        like=np.full(len(positions), np.nan, dtype=np.float32) if like_scores is None else like_scores[positions],
        score=np.concatenate(
            [np.asarray(placed_score, dtype=np.float32), tail_score.astype(np.float32), np.full(n_dup, -np.inf)]
        ).astype(np.float32),
        exact_head=head,
        uncertainty_weight=weight,
        labeled=labeled_set,
    )
    log.info(
        "ranked %d tasks (%d labeled, %d exact, %d duplicates) in %.2f s",
        len(ranking),
        int(is_labeled.sum()),
        head,
        int(is_dup.sum()),
        time.perf_counter() - started,
    )
    return ranking


def exact_head_for(tasks: int) -> int:
    """The default exact head for ranking ``tasks`` tasks: as many picks as ``EXACT_WORK`` allows, at least
    ``MIN_EXACT_HEAD`` and at most ``DEFAULT_EXACT_HEAD``. Later picks come from the approximate tail,
    whose coverage bench/priority.py compares with the exact order's."""
    return max(MIN_EXACT_HEAD, min(DEFAULT_EXACT_HEAD, EXACT_WORK // max(tasks, 1)))


def place(
    ranking: Ranking,
    new_task_ids: np.ndarray,
    new_vectors: np.ndarray,
    *,
    task_ids: np.ndarray,
    vectors: np.ndarray,
    uncertainty: np.ndarray | Mapping[int, float] | None = None,
    uncertainty_weight: float = DEFAULT_UNCERTAINTY_WEIGHT,
    near_duplicate: float | None = DEFAULT_NEAR_DUPLICATE,
) -> Ranking:
    """Insert new tasks into ``ranking`` without re-ranking the others (see the module's docstring).

    ``task_ids``/``vectors`` must hold the vectors of the ranking's labeled tasks and ranked tasks (other
    rows are ignored). New tasks are placed one after another, in the order given, each seeing the new
    tasks placed before it. A task already ranked is moved (placed again).
    """
    new_ids, new_data = _check(new_task_ids, new_vectors)
    ids, data = _check(task_ids, vectors)
    ranking = ranking.without(new_ids.tolist())
    unc = _uncertainty(uncertainty, new_ids)
    weight = uncertainty_weight if unc is not None else 0.0
    row_of = {int(task): i for i, task in enumerate(ids.tolist())}

    labeled = np.array(sorted(task for task in ranking.labeled if task in row_of), dtype=np.int64)
    placed = ranking.reason != DUPLICATE  # the queue that new tasks can go into
    placed_ids = ranking.task_ids[placed]
    missing = [int(task) for task in placed_ids.tolist() if int(task) not in row_of]
    if missing:
        raise ValueError(f"vectors of ranked tasks are missing, e.g. task {missing[0]}")
    to_labeled = new_data @ data[[row_of[int(t)] for t in labeled]].T if len(labeled) else None
    to_placed = new_data @ data[[row_of[int(t)] for t in placed_ids]].T
    to_new = new_data @ new_data.T
    n_placed = len(placed_ids)
    front = int(np.sum(ranking.reason[placed] == LIKE))
    pick_score = ranking.score[placed].astype(np.float64)

    inserted: list[tuple[int, int]] = []  # (slot among the old queue, index into new) in placement order
    facts: dict[int, tuple[float, int]] = {}  # new index -> (best cosine to what is ahead, that task)
    duplicates: list[tuple[int, int, float]] = []
    for j in range(len(new_ids)):
        # best[t]: the new task's best cosine to the labeled tasks and what is ranked before slot t.
        curve = np.full(n_placed + 1, -1.0, dtype=np.float64)
        curve[1:] = to_placed[j]
        who = np.concatenate([[-1], placed_ids])
        for slot, k in inserted:
            if to_new[j, k] > curve[slot]:
                curve[slot] = to_new[j, k]
                who[slot] = new_ids[k]
        running = np.maximum.accumulate(curve)
        holder = who[_running_argmax(curve)]
        if to_labeled is not None and len(labeled):
            at = int(np.argmax(to_labeled[j]))
            stronger = to_labeled[j, at] >= running
            holder = np.where(stronger, labeled[at], holder)
            running = np.maximum(running, to_labeled[j, at])
        distance = 1.0 - running
        score = (1.0 - weight) * distance + (weight * float(np.nan_to_num(unc[j])) if unc is not None else 0.0)
        slots = np.arange(front, n_placed + 1)
        reach = np.append(pick_score, -np.inf)[slots]
        ahead = slots[score[slots] >= reach]
        slot = int(ahead[0]) if len(ahead) else n_placed
        if near_duplicate is not None and running[slot] >= near_duplicate:
            duplicates.append((j, int(holder[slot]), float(running[slot])))
            continue
        inserted.append((slot, j))
        facts[j] = (float(running[slot]), int(holder[slot]))

    # The new queue: old placed tasks with the new ones in front of their slots, the old duplicates, then the
    # new duplicates. Rows index one table: the old ranking's rows, then the new placed, then the new duplicates.
    table = {
        "task_ids": [ranking.task_ids],
        "reason": [ranking.reason],
        "distance": [ranking.distance],
        "nearest": [ranking.nearest],
        "duplicate_of": [ranking.duplicate_of],
        "uncertainty": [ranking.uncertainty],
        "like": [ranking.like],
        "score": [ranking.score],
    }
    placed_new = [j for _, j in inserted]
    similarity = np.array([facts[j][0] for j in placed_new], dtype=np.float64)
    holders = np.array([facts[j][1] for j in placed_new], dtype=np.int64)
    new_unc = np.full(len(placed_new), np.nan) if unc is None else unc[placed_new].astype(np.float64)
    dup_new = [j for j, _, _ in duplicates]
    dup_holder = np.array([holder for _, holder, _ in duplicates], dtype=np.int64)
    dup_similarity = np.array([sim for _, _, sim in duplicates], dtype=np.float64)
    rows = {
        "task_ids": (new_ids[placed_new], new_ids[dup_new]),
        "reason": (np.full(len(placed_new), DIVERSE, dtype=object), np.full(len(dup_new), DUPLICATE, dtype=object)),
        "distance": (np.where(holders >= 0, 1.0 - similarity, np.nan), 1.0 - dup_similarity),
        "nearest": (holders, dup_holder),
        "duplicate_of": (np.full(len(placed_new), -1), dup_holder),
        "uncertainty": (new_unc, np.full(len(dup_new), np.nan)),
        "like": (np.full(len(placed_new), np.nan), np.full(len(dup_new), np.nan)),
        "score": (
            (1 - weight) * (1.0 - similarity) + (weight * np.nan_to_num(new_unc) if unc is not None else 0.0),
            np.full(len(dup_new), -np.inf),
        ),
    }
    for name, (new_part, dup_part) in rows.items():
        table[name] += [new_part, dup_part]
    columns = {name: np.concatenate(parts) for name, parts in table.items()}
    first_new, first_dup = len(ranking), len(ranking) + len(placed_new)
    slots = np.array([slot for slot, _ in inserted], dtype=np.int64)
    order = np.concatenate(
        [
            np.insert(np.flatnonzero(placed), slots, first_new + np.arange(len(placed_new))),  # equal slots keep order
            np.flatnonzero(~placed),
            first_dup + np.arange(len(dup_new)),
        ]
    )
    head = ranking.exact_head + int(np.sum(slots < ranking.exact_head))
    return Ranking(
        task_ids=columns["task_ids"][order].astype(np.int64),
        reason=columns["reason"][order],
        distance=columns["distance"][order].astype(np.float32),
        nearest=columns["nearest"][order].astype(np.int64),
        duplicate_of=columns["duplicate_of"][order].astype(np.int64),
        uncertainty=columns["uncertainty"][order].astype(np.float32),
        like=columns["like"][order].astype(np.float32),
        score=columns["score"][order].astype(np.float32),
        exact_head=head,
        labeled=ranking.labeled,
        uncertainty_weight=weight if unc is not None else ranking.uncertainty_weight,
    )


def coverage(vectors: np.ndarray, picks: np.ndarray, seeds: np.ndarray | None = None) -> float:
    """Mean cosine distance of ``vectors`` rows to their nearest row among ``picks`` (and ``seeds``).

    The k-center objective's average version: lower means the picks (plus what was labeled) represent
    the data better. ``picks``/``seeds`` are row indices into ``vectors``.
    """
    chosen = np.asarray(picks, dtype=np.int64)
    if seeds is not None:
        chosen = np.concatenate([np.asarray(seeds, dtype=np.int64), chosen])
    best = np.full(len(vectors), -1.0, dtype=np.float32)
    nearest = np.zeros(len(vectors), dtype=np.int64)
    raise_best(best, nearest, vectors, vectors[chosen], chosen)
    return float(np.mean(1.0 - best))


# --- "more like these" ---------------------------------------------------------------------------------------


def _like_front(
    data: np.ndarray,
    queries: np.ndarray,
    alive: np.ndarray,
    matches: np.ndarray,
    count: int,
    clusters: int,
    seed: int,
) -> list[int]:
    """Rows of ``data`` (the candidates) in front order: the pool of best matches, round-robin across
    k-means clusters; the caller takes the first ``count`` that are not near duplicates."""
    if count < 1 or clusters < 1:
        raise ValueError("like_count and like_clusters must be at least 1")
    open_rows = np.flatnonzero(alive)
    if not len(open_rows):
        return []
    # Each query brings its own nearest tasks (as DINOv2's curation retrieves per query image), so one
    # query that sits in a dense burst cannot fill the pool alone.
    per_query = max(1, math.ceil(count * LIKE_POOL_FACTOR / len(queries)))
    picked: set[int] = set()
    open_data = data[open_rows]
    for query in queries:
        sims = open_data @ query
        top = np.lexsort((open_rows, -sims))[:per_query]
        picked.update(open_rows[top].tolist())
    pool = np.array(sorted(picked), dtype=np.int64)
    pool = pool[np.lexsort((pool, -matches[pool]))]
    k = min(clusters, len(pool))
    if k > 1:
        kmeans = faiss.Kmeans(data.shape[1], k, niter=20, seed=seed, min_points_per_centroid=1, verbose=False)
        kmeans.train(np.ascontiguousarray(data[pool]))
        _, assigned = kmeans.index.search(np.ascontiguousarray(data[pool]), 1)
        label = assigned.ravel()
    else:
        label = np.zeros(len(pool), dtype=np.int64)
    queues = [pool[label == c].tolist() for c in np.unique(label)]  # each already best match first
    queues.sort(key=lambda rows: (-matches[rows[0]], rows[0]))
    front: list[int] = []
    while any(queues):
        for rows in queues:
            if rows:
                front.append(rows.pop(0))
    return front


# --- helpers -------------------------------------------------------------------------------------------------


def _best_cosine(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    best = np.full(len(data), -1.0, dtype=np.float32)
    raise_best(best, np.zeros(len(data), dtype=np.int64), data, queries, np.arange(len(queries)))
    return best


def _retire_duplicates(
    alive: np.ndarray,
    best: np.ndarray,
    nearest: np.ndarray,
    threshold: float,
    candidates: np.ndarray,
    dup_pos: list[int],
    dup_of: list[int],
    dup_sim: list[float],
) -> None:
    close = np.flatnonzero(alive & (best >= threshold))
    alive[close] = False
    dup_pos += candidates[close].tolist()
    dup_of += nearest[close].tolist()
    dup_sim += best[close].astype(float).tolist()


def _originals(
    duplicates: DuplicateReport | Mapping[int, int] | None,
    position_of: Mapping[int, int],
    labeled: frozenset[int],
    is_labeled: np.ndarray,
) -> np.ndarray:
    """Per row: the row of the task it duplicates (root of the chain), -1 if none, or -2 - task id for an
    original that is labeled but has no row. A copy whose original is unknown is no copy here."""
    out = np.full(len(is_labeled), -1, dtype=np.int64)
    if duplicates is None:
        return out
    if isinstance(duplicates, DuplicateReport):
        parent = {
            dup: group.keeper for result in duplicates.stages for group in result.groups for dup in group.duplicates
        }
    else:
        parent = {int(task): int(of) for task, of in duplicates.items()}
    for task in parent:
        if task not in position_of:
            continue
        root, seen = task, {task}
        while root in parent:
            root = parent[root]
            if root in seen:
                raise ValueError(f"duplicates form a cycle through task {root}")
            seen.add(root)
        if root in position_of:
            out[position_of[task]] = position_of[root]
        elif root in labeled:
            out[position_of[task]] = -2 - root
    return out


def _uncertainty(values: np.ndarray | Mapping[int, float] | None, ids: np.ndarray) -> np.ndarray | None:
    """Per row in [0, 1], NaN for a task without one (absent from a mapping, or NaN): it is scored without
    the uncertainty term, as a task the detector is sure about. None: no uncertainties at all."""
    if values is None:
        return None
    if isinstance(values, Mapping):
        out = np.full(len(ids), np.nan, dtype=np.float32)
        if values:
            keys = np.fromiter((int(task) for task in values), dtype=np.int64, count=len(values))
            given = np.fromiter((float(u) for u in values.values()), dtype=np.float64, count=len(values))
            at = _rank_in(keys, ids)
            out[at >= 0] = given[at[at >= 0]]
    else:
        out = np.asarray(values, dtype=np.float32).reshape(-1)
        if len(out) != len(ids):
            raise ValueError(f"uncertainty has {len(out)} values for {len(ids)} tasks")
    known = out[~np.isnan(out)]
    if not np.all((known >= 0.0) & (known <= 1.0)):
        raise ValueError("uncertainty values must be in [0, 1]")
    return out


def _check(task_ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.ascontiguousarray(task_ids, dtype=np.int64).reshape(-1)
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    if data.ndim != 2 or len(data) != len(ids):
        raise ValueError(f"vectors must be (n, d) with one row per task id; got {data.shape} for {len(ids)} ids")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("task ids must be unique")
    if not np.isfinite(data).all():
        raise ValueError("vectors must be finite")
    return ids, data


def _check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    data = np.ascontiguousarray(queries, dtype=np.float32)
    if data.ndim == 1:
        data = data[None, :]
    if data.ndim != 2 or data.shape[1] != dim or not len(data):
        raise ValueError(f"like queries must be (q, {dim}) vectors; got shape {np.shape(queries)}")
    if not np.isfinite(data).all():
        raise ValueError("like queries must be finite")
    return data


def _distance(best: float, nearest: int) -> float:
    return math.nan if nearest < 0 else 1.0 - float(best)


def _rank_in(order: np.ndarray, tasks: np.ndarray) -> np.ndarray:
    """Per task of ``tasks``: its position in ``order`` (task ids, unique), -1 where it is not there."""
    if not len(order):
        return np.full(len(tasks), -1, dtype=np.int64)
    sorter = np.argsort(order, kind="stable")
    at = np.minimum(np.searchsorted(order, tasks, sorter=sorter), len(order) - 1)
    return np.where(order[sorter[at]] == tasks, sorter[at], -1)


def _running_argmax(values: np.ndarray) -> np.ndarray:
    """Index of the first maximum of ``values[: t + 1]`` for every t."""
    running = np.maximum.accumulate(values)
    is_new = np.concatenate([[True], values[1:] > running[:-1]])
    return np.maximum.accumulate(np.where(is_new, np.arange(len(values)), 0))


def _select(ranking: Ranking, keep: np.ndarray, head: int) -> Ranking:
    return Ranking(
        task_ids=ranking.task_ids[keep],
        reason=ranking.reason[keep],
        distance=ranking.distance[keep],
        nearest=ranking.nearest[keep],
        duplicate_of=ranking.duplicate_of[keep],
        uncertainty=ranking.uncertainty[keep],
        like=ranking.like[keep],
        score=ranking.score[keep],
        exact_head=head,
        labeled=ranking.labeled,
        uncertainty_weight=ranking.uncertainty_weight,
    )
