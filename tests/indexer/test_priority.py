"""Labeling priority on synthetic embeddings with known clusters: diversity, duplicates, "like these"."""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexer.duplicates import DuplicateGroup, DuplicateReport, DuplicateResult
from indexer.priority import (
    DEFAULT_EXACT_HEAD,
    EXACT_WORK,
    MIN_EXACT_HEAD,
    Ranking,
    coverage,
    exact_head_for,
    place,
    rank,
)
from tests.indexer.vectors import clustered, clustered_with_members, near_copies

DIM = 64


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _naive_gaps(ranking: Ranking, ids: np.ndarray, vectors: np.ndarray, labeled: list[int], weight=0.0, unc=None):
    """For each exact pick, how far its score is below the best score among the tasks left (float64).

    The naive O(N^2) farthest-first: every pick updates every remaining task.
    """
    row = {int(t): i for i, t in enumerate(ids)}
    data = vectors.astype(np.float64)
    best = np.full(len(ids), -1.0)
    for task in labeled:
        best = np.maximum(best, data @ data[row[task]])
    left = np.ones(len(ids), dtype=bool)
    left[[row[t] for t in labeled]] = False
    u = np.zeros(len(ids)) if unc is None else unc.astype(np.float64)
    gaps = []
    for task in ranking.task_ids[: ranking.exact_head]:
        score = (1 - weight) * (1 - best) + weight * u
        gaps.append(score[left].max() - score[row[int(task)]])
        left[row[int(task)]] = False
        best = np.maximum(best, data @ data[row[int(task)]])
    return np.array(gaps)


def test_the_first_picks_cover_every_cluster_not_yet_labeled() -> None:
    vectors, cluster = clustered_with_members(2000, DIM, clusters=25, spread=0.5, seed=1)
    ids = np.arange(2000, dtype=np.int64) + 10_000
    labeled = [int(ids[np.flatnonzero(cluster == c)[0]]) for c in (0, 1, 2)]
    ranking = rank(ids, vectors, labeled)

    assert len(ranking) == 2000 - 3 and not set(labeled) & set(ranking.task_ids.tolist())
    first = cluster[ranking.task_ids[:22] - 10_000]
    assert sorted(first.tolist()) == list(range(3, 25))  # 22 picks, the 22 clusters with nothing labeled
    # The 23rd pick goes back to a covered cluster, and is much nearer to what came before.
    assert ranking.distance[22] < 0.6 * ranking.distance[21]
    # Explanations: distances shrink down the exact head; the first pick's nearest is a labeled task.
    head = ranking.distance[: ranking.exact_head]
    assert np.all(np.diff(head) <= 1e-6)
    assert ranking.explain(0)["nearest"] in labeled and ranking.explain(0)["nearest_is_labeled"]

    # Against import order and random order, the ranked picks represent the data better.
    position = ranking.task_ids - 10_000
    seeds = np.array(labeled) - 10_000
    ranked = coverage(vectors, position[:30], seeds)
    imported = coverage(vectors, np.setdiff1d(np.arange(2000), seeds)[:30], seeds)
    shuffled = coverage(vectors, np.random.default_rng(0).permutation(position)[:30], seeds)
    assert ranked < 0.9 * min(imported, shuffled)


def test_the_greedy_is_exact_against_the_naive_farthest_first() -> None:
    vectors = clustered(1500, DIM, clusters=40, spread=0.6, seed=2)
    ids = np.arange(1500, dtype=np.int64) * 3 + 7
    labeled = [7, 7 + 3 * 500, 7 + 3 * 1000]
    ranking = rank(ids, vectors, labeled, exact_head=None, near_duplicate=None)
    assert ranking.exact_head == len(ranking) == 1497
    assert set(ranking.reason.tolist()) == {"diverse"}
    gaps = _naive_gaps(ranking, ids, vectors, labeled)
    assert gaps.max() < 1e-5  # every pick is the farthest task left, up to float32 rounding

    # Mixed with uncertainty: each pick has the best (1 - w) * distance + w * uncertainty left.
    unc = np.random.default_rng(3).random(1500).astype(np.float32)
    mixed = rank(ids, vectors, labeled, exact_head=None, near_duplicate=None, uncertainty=unc, uncertainty_weight=0.4)
    assert _naive_gaps(mixed, ids, vectors, labeled, weight=0.4, unc=unc).max() < 1e-5
    assert list(mixed.task_ids) != list(ranking.task_ids)
    assert mixed.explain(0)["uncertainty"] == pytest.approx(float(unc[(mixed.task_ids[0] - 7) // 3]), abs=1e-4)


def test_an_exact_head_then_the_tail_by_distance_to_what_was_picked() -> None:
    vectors = clustered(1200, DIM, clusters=30, spread=0.6, seed=4)
    ids = np.arange(1200, dtype=np.int64)
    ranking = rank(ids, vectors, [0], exact_head=100, near_duplicate=None)
    full = rank(ids, vectors, [0], exact_head=None, near_duplicate=None)
    assert ranking.exact_head == 100
    assert list(ranking.task_ids[:100]) == list(full.task_ids[:100])
    assert set(ranking.reason[100:].tolist()) == {"tail"}
    # The tail is ordered by the distance to the labeled task and the 100 exact picks, largest first.
    picked = np.concatenate([[0], ranking.task_ids[:100]])
    expected = 1 - (vectors[ranking.task_ids[100:]] @ vectors[picked].T).max(axis=1)
    assert np.allclose(ranking.distance[100:], expected, atol=1e-5)
    assert np.all(np.diff(ranking.distance[100:]) <= 1e-6)
    assert "approximate order" in ranking.text(100)


def test_duplicates_of_labeled_and_ranked_tasks_go_last_naming_their_original() -> None:
    base = clustered(600, DIM, clusters=12, spread=0.6, seed=5)
    copies, originals = near_copies(base, count=30, noise=0.1, seed=6)  # cosine ~0.995 to the original
    vectors = np.concatenate([base, copies])
    ids = np.arange(len(vectors), dtype=np.int64) + 1
    copy_ids = ids[600:]
    original_ids = ids[originals]
    labeled = original_ids[:10].tolist()  # 10 copies duplicate labeled tasks, 20 duplicate unlabeled ones
    # And the duplicate finder's report: task 5 is a byte-identical copy of task 6, which is unlabeled.
    report = DuplicateReport((DuplicateResult("bytes", 1.0, (DuplicateGroup((6, 5), (1.0, 1.0), 1.0),)),))

    ranking = rank(ids, vectors, labeled, duplicates=report)
    rank_of = ranking.rank_of()
    dup = ranking.reason == "duplicate"
    tail = ranking.task_ids[dup]
    assert set(tail.tolist()) >= set(copy_ids[:10].tolist()) | {5}
    assert dup[-len(tail) :].all()  # every duplicate after every other task
    by_id = {int(t): i for i, t in enumerate(ranking.task_ids)}
    for copy, original in zip(copy_ids.tolist(), original_ids.tolist(), strict=True):
        if original in labeled:
            assert ranking.duplicate_of[by_id[copy]] == original
        else:  # of a copy and its unlabeled original, whichever ranks first keeps, the other goes last
            first, second = sorted((copy, original), key=rank_of.get)
            assert ranking.reason[by_id[second]] == "duplicate" and ranking.duplicate_of[by_id[second]] == first
            assert ranking.reason[by_id[first]] != "duplicate"
    assert ranking.duplicate_of[by_id[5]] == 6 and ranking.reason[by_id[6]] != "duplicate"
    # Copies of unlabeled tasks first (in their originals' order), copies of labeled tasks at the very end.
    of_labeled = np.isin(ranking.duplicate_of[dup], labeled)
    assert of_labeled[-10:].all() and not of_labeled[:-10].any()
    originals_rank = [rank_of[int(o)] for o in ranking.duplicate_of[dup][~of_labeled]]
    assert originals_rank == sorted(originals_rank)
    assert ranking.text(by_id[copy_ids[0]]).startswith(f"duplicate of labeled task {original_ids[0]}, cosine 0.99")
    assert ranking.explain(by_id[5])["duplicate_of"] == 6

    # Without the near-duplicate check only the report's duplicate is pushed back.
    plain = rank(ids, vectors, labeled, duplicates={5: 6}, near_duplicate=None)
    assert plain.task_ids[plain.reason == "duplicate"].tolist() == [5]


def _rare_cluster(seed: int = 7):
    """3000 common vectors in 30 clusters, and a rare cluster of four sub-clusters: one burst of 300
    look-alikes and three of 15 (ids 3000...)."""
    rng = np.random.default_rng(seed)
    common = clustered(3000, DIM, clusters=30, spread=0.6, seed=seed)
    centre = _unit(rng.standard_normal((1, DIM)))
    subs = _unit(centre + 0.5 * _unit(rng.standard_normal((4, DIM))))
    sizes, spreads = (300, 15, 15, 15), (0.45, 0.45, 0.45, 0.45)
    rare = [
        _unit(subs[i] + rng.standard_normal((n, DIM)) * s / np.sqrt(DIM))
        for i, (n, s) in enumerate(zip(sizes, spreads, strict=True))
    ]
    member = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    examples = _unit(subs + rng.standard_normal((4, DIM)) * 0.2 / np.sqrt(DIM))  # one uploaded image each
    vectors = np.concatenate([common, *rare])
    return vectors, np.arange(len(vectors), dtype=np.int64), member, examples


def test_more_like_these_brings_the_rare_cluster_first_spread_over_its_parts() -> None:
    vectors, ids, member, examples = _rare_cluster()
    labeled = [0, 1, 2]
    ranking = rank(ids, vectors, labeled, like=examples, like_count=24)

    front = ranking.task_ids[:24]
    assert (ranking.reason[:24] == "like").all() and ranking.reason[24] == "diverse"
    assert (front >= 3000).all()  # all 24 from the rare cluster
    parts = member[front - 3000]
    assert set(parts[:8].tolist()) == {0, 1, 2, 3}  # every sub-cluster among the first eight
    assert np.sum(parts == 0) <= 12  # the burst of look-alikes does not take the front
    # Plain nearest-neighbour order would have: the burst fills it.
    nearest_first = np.argsort(-(vectors[3000:] @ examples.T).max(axis=1), kind="stable")[:24]
    assert np.sum(member[nearest_first] == 0) >= 18
    assert ranking.explain(0)["like"] > 0.8 and ranking.text(0).startswith("like these: match")
    # Further down, the rare cluster no longer crowds the queue: the greedy spreads over the rest.
    assert np.mean(ranking.task_ids[24:64] >= 3000) < 0.25


def test_placing_new_tasks_is_close_to_a_full_re_rank() -> None:
    vectors = clustered(3000, DIM, clusters=30, spread=0.6, seed=8)
    rng = np.random.default_rng(9)
    fresh = _unit(_unit(rng.standard_normal((1, DIM))) + rng.standard_normal((20, DIM)) * 0.6 / np.sqrt(DIM))
    ids = np.arange(3020, dtype=np.int64)
    everything = np.concatenate([vectors, fresh])
    new = np.concatenate([rng.choice(3000, 80, replace=False), np.arange(3000, 3020)])  # 80 + a new cluster
    old = np.setdiff1d(ids, new)
    labeled = [int(old[0]), int(old[1])]
    before = rank(old, everything[old], labeled, exact_head=None)
    placed = place(before, ids[new], everything[new], task_ids=ids, vectors=everything)
    full = rank(ids, everything, labeled, exact_head=None)

    assert sorted(placed.task_ids.tolist()) == sorted(full.task_ids.tolist())
    # The new cluster's first task goes where the full re-rank puts it (in the first round over the
    # clusters), the rest of it further down.
    fresh_rank_placed = np.flatnonzero(placed.task_ids >= 3000)
    fresh_rank_full = np.flatnonzero(full.task_ids >= 3000)
    assert fresh_rank_placed[0] == fresh_rank_full[0] < 31  # in the first round over the 31 clusters
    assert fresh_rank_placed[1] >= 29 and fresh_rank_full[1] >= 29  # the second only after every cluster
    # Coverage after k picks is within 3% of the full re-rank's, and better than appending at the end.
    seeds = np.array(labeled)
    appended = np.concatenate([before.task_ids, ids[new]])
    for k in (10, 30, 100, 300, 1000):
        full_k = coverage(everything, full.task_ids[:k], seeds)
        placed_k = coverage(everything, placed.task_ids[:k], seeds)
        assert placed_k <= 1.03 * full_k, (k, placed_k, full_k)
        if k >= 30:
            assert placed_k < coverage(everything, appended[:k], seeds)
    # A placed task explains itself against what is ahead of it.
    first_new = fresh_rank_placed[0]
    assert placed.reason[first_new] == "diverse" and placed.nearest[first_new] in set(
        placed.task_ids[:first_new]
    ) | set(labeled)
    # A new near copy of a labeled task is placed among the duplicates.
    copy = _unit(everything[labeled[0]][None, :] + 0.01)
    again = place(
        placed, np.array([5000]), copy, task_ids=np.append(ids, 5000), vectors=np.concatenate([everything, copy])
    )
    assert again.task_ids[-1] == 5000 and again.duplicate_of[-1] == labeled[0]


def test_the_same_input_gives_the_same_ranking_and_json_explanations() -> None:
    vectors, ids, _, examples = _rare_cluster(seed=10)
    unc = np.random.default_rng(1).random(len(ids)).astype(np.float32)
    runs = [rank(ids, vectors, [0, 5], like=examples, like_count=16, uncertainty=unc, exact_head=500) for _ in range(2)]
    assert runs[0].task_ids.tolist() == runs[1].task_ids.tolist()
    assert runs[0].explanations() == runs[1].explanations()
    text = json.dumps(runs[0].explanations())
    assert json.loads(text)[0]["reason"] == "like"
    ranks = runs[0].ranks()
    assert sorted(r for r, _ in ranks.values()) == list(range(len(ids) - 2))
    assert ranks[int(runs[0].task_ids[0])] == (0, "like")
    assert {reason for _, reason in ranks.values()} <= {"like", "diverse", "tail", "duplicate", "uncertain"}

    # Removing tasks (deleted, or labeled since) renumbers the rest in the same order.
    gone = runs[0].task_ids[[0, 3, 700]].tolist()
    smaller = runs[0].without(gone)
    assert smaller.task_ids.tolist() == [t for t in runs[0].task_ids.tolist() if t not in gone]
    assert smaller.exact_head == runs[0].exact_head - 2


def test_the_detectors_uncertainty_moves_a_task_ahead_and_the_explanation_says_so() -> None:
    # Task 0 is labeled; task 1 is as far from it as can be, task 2 half as far, task 3 as far as task 1.
    vectors = np.zeros((4, 8), dtype=np.float32)
    vectors[0, 0] = vectors[1, 1] = vectors[3, 3] = 1.0
    vectors[2, [0, 2]] = [0.5, np.sqrt(0.75)]
    ids = np.arange(4, dtype=np.int64)
    unsure = {2: 1.0, 3: 0.0}  # task 1 has no prediction: no uncertainty term
    ranking = rank(ids, vectors, [0], uncertainty=unsure, uncertainty_weight=0.6)
    # Task 2: 0.4 * 0.5 + 0.6 * 1 = 0.8 beats 0.4 * 1 (tasks 1 and 3): the uncertainty moved it ahead.
    assert ranking.task_ids.tolist() == [2, 1, 3]
    assert ranking.moved_by_uncertainty().tolist() == [True, False, False]
    assert ranking.ranks() == {2: (0, "uncertain"), 1: (1, "diverse"), 3: (2, "diverse")}
    first, second, third = ranking.explanations()
    assert first["uncertainty"] == 1.0 and first["uncertainty_moved"] and "moved it ahead" in first["text"]
    assert second["uncertainty"] is None and not second["uncertainty_moved"] and "uncertainty" not in second["text"]
    assert third["uncertainty"] == 0.0 and not third["uncertainty_moved"]

    # A smaller weight: 0.8 * 0.5 + 0.2 = 0.6 is not enough against 0.8; task 2 comes last, not moved.
    lighter = rank(ids, vectors, [0], uncertainty=unsure, uncertainty_weight=0.2)
    assert lighter.task_ids.tolist() == [1, 3, 2] and not lighter.moved_by_uncertainty().any()
    assert set(lighter.ranks().values()) == {(0, "diverse"), (1, "diverse"), (2, "diverse")}
    # Without uncertainties nothing is moved, whatever the weight.
    plain = rank(ids, vectors, [0], uncertainty_weight=0.6)
    assert plain.task_ids.tolist() == [1, 3, 2] and not plain.moved_by_uncertainty().any()


def test_the_default_exact_head_keeps_its_cost_bounded_as_projects_grow() -> None:
    sizes = [10, 1_000, 20_000, 50_000, 100_000, 1_000_000, 10_000_000]
    heads = [exact_head_for(n) for n in sizes]
    assert all(MIN_EXACT_HEAD <= h <= DEFAULT_EXACT_HEAD for h in heads)
    assert heads == sorted(heads, reverse=True), "never more exact picks for a bigger project"
    assert all(n * h <= EXACT_WORK for n, h in zip(sizes, heads, strict=True) if h > MIN_EXACT_HEAD)
    assert heads[0] == DEFAULT_EXACT_HEAD and heads[-1] == MIN_EXACT_HEAD
    # rank() uses it: a small project is exact throughout.
    small = rank(np.arange(300), clustered(300, DIM, clusters=5, seed=6), [0], near_duplicate=None)
    assert small.exact_head == len(small) == 299 and set(small.reason.tolist()) == {"diverse"}


def test_bad_input_is_refused_with_a_clear_error() -> None:
    vectors = clustered(50, DIM, clusters=3, seed=0)
    ids = np.arange(50)
    with pytest.raises(ValueError, match="unique"):
        rank(np.zeros(50), vectors)
    with pytest.raises(ValueError, match="one row per task id"):
        rank(ids[:10], vectors)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rank(ids, vectors, uncertainty=np.full(50, 1.5))
    with pytest.raises(ValueError, match="like queries"):
        rank(ids, vectors, like=np.ones((2, DIM + 1), dtype=np.float32))
    with pytest.raises(ValueError, match="cycle"):
        rank(ids, vectors, duplicates={1: 2, 2: 1})
    # Nothing to rank is not an error.
    assert len(rank(ids, vectors, labeled=ids.tolist())) == 0
