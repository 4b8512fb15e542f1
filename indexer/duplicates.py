"""Duplicate tasks of a project, in groups that never chain dissimilar images together.

Three passes, cheapest first; each later pass sees only the suggested keepers of the earlier ones, so
every image is reported as a duplicate at most once, by the strictest pass that finds it:

1. ``bytes`` and ``pixels``: equal sha256 of the file, then equal hash of the decoded pixels.
2. ``perceptual``: 64-bit DCT pHashes within ``max_distance`` bits, found by multi-index hashing (*m*
   chunks; two hashes within *t* bits agree within *t // m* bits on at least one chunk), never by
   comparing all pairs. Identical hashes are merged first, so 10 000 blank images cost one node.
3. ``embedding``: cosine above ``threshold`` by a faiss range search (CPU) or a k-NN search filtered by
   the threshold (GPU indexes have no range search), at most ``max_neighbors`` per image.

Similar pairs become groups greedily in complete-linkage style: the best remaining image (labeled
first, then more pixels, then lower task id) starts a group and takes its neighbours, most similar
first, only if each is above the threshold with *every* member already in the group. So a group's
``min_similarity`` (its weakest pair) is never below the threshold: A~B and B~C with A!~C give {A, B}
and C goes on to another group. The image that started the group is its suggested keeper.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import combinations

import numpy as np

from indexer.index import VectorIndex
from indexer.store import HashTable

__all__ = [
    "DEFAULT_EMBEDDING_THRESHOLD",
    "DEFAULT_MAX_NEIGHBORS",
    "DEFAULT_PHASH_DISTANCE",
    "DuplicateGroup",
    "DuplicateReport",
    "DuplicateResult",
    "Items",
    "embedding_pairs",
    "find_duplicates",
    "group_pairs",
    "hamming_pairs",
]

log = logging.getLogger(__name__)

DEFAULT_PHASH_DISTANCE = 6
"""Bits of 64 that may differ for a perceptual match (recompressed, resized, recoloured copies)."""
MAX_PHASH_DISTANCE = 12
"""Above this, random 64-bit hashes start to match and the multi-index search grows costly."""
DEFAULT_EMBEDDING_THRESHOLD = 0.9
"""Cosine between DINOv2 CLS embeddings above which two images count as near duplicates."""
DEFAULT_MAX_NEIGHBORS = 50
"""Most neighbours kept per image in the embedding pass (bounds memory on dense clusters)."""
_PHASH_BITS = 64
_CANDIDATES_PER_STEP = 4_000_000  # candidate pairs materialised at once in the perceptual pass


@dataclass(frozen=True)
class Items:
    """The images the passes consider: task ids, pixel counts and which tasks are labeled (same order)."""

    task_ids: np.ndarray
    pixels: np.ndarray
    labeled: np.ndarray

    @classmethod
    def from_table(cls, table: HashTable, labeled: Iterable[int] = ()) -> Items:
        marks = np.isin(table.task_ids, np.fromiter(labeled, dtype=np.int64))
        return cls(table.task_ids, table.width * table.height, marks)

    def rank(self) -> np.ndarray:
        """Keeper preference per item, 0 = best: labeled first, then larger image, then lower task id."""
        order = np.lexsort((self.task_ids, -self.pixels, ~self.labeled))
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        return rank


@dataclass(frozen=True)
class DuplicateGroup:
    """Images that are all pairwise similar. ``members[0]`` is the suggested keeper."""

    members: tuple[int, ...]  # task ids, keeper first, then by similarity to the keeper
    similarities: tuple[float, ...]  # each member's similarity to the keeper (1.0 for the keeper)
    min_similarity: float  # the weakest pair in the group; >= the threshold

    @property
    def keeper(self) -> int:
        return self.members[0]

    @property
    def duplicates(self) -> tuple[int, ...]:
        return self.members[1:]


@dataclass(frozen=True)
class DuplicateResult:
    """One pass's groups and the threshold it used (cosine, or 1 - bits/64 for ``perceptual``)."""

    stage: str
    threshold: float
    groups: tuple[DuplicateGroup, ...]
    seconds: float = 0.0

    @property
    def duplicate_ids(self) -> list[int]:
        return sorted(task for group in self.groups for task in group.duplicates)

    @property
    def neighbors_map(self) -> dict[int, list[tuple[int, float]]]:
        """Keeper -> ``[(duplicate, similarity to the keeper)]``, most similar first."""
        return {group.keeper: list(zip(group.duplicates, group.similarities[1:], strict=True)) for group in self.groups}


@dataclass(frozen=True)
class DuplicateReport:
    """Every pass's result, in the order they ran."""

    stages: tuple[DuplicateResult, ...]

    def stage(self, name: str) -> DuplicateResult:
        for result in self.stages:
            if result.stage == name:
                return result
        raise KeyError(f"no stage {name!r} in this report; stages: {[r.stage for r in self.stages]}")

    @property
    def duplicate_ids(self) -> list[int]:
        """Every task the report suggests removing (each appears in exactly one stage)."""
        return sorted(task for result in self.stages for task in result.duplicate_ids)

    def to_dict(self) -> dict:
        return {
            "stages": [
                {
                    "stage": result.stage,
                    "threshold": result.threshold,
                    "seconds": round(result.seconds, 3),
                    "groups": [
                        {
                            "keeper": group.keeper,
                            "min_similarity": round(group.min_similarity, 4),
                            "members": [
                                {"task_id": task, "similarity": round(sim, 4)}
                                for task, sim in zip(group.members, group.similarities, strict=True)
                            ],
                        }
                        for group in result.groups
                    ],
                }
                for result in self.stages
            ]
        }

    def rows(self) -> list[dict]:
        """One row per grouped image, for CSV: stage, group, task, keeper, similarities."""
        return [
            {
                "stage": result.stage,
                "group": number,
                "task_id": task,
                "keeper": group.keeper,
                "is_keeper": task == group.keeper,
                "similarity_to_keeper": round(sim, 4),
                "group_min_similarity": round(group.min_similarity, 4),
            }
            for result in self.stages
            for number, group in enumerate(result.groups, start=1)
            for task, sim in zip(group.members, group.similarities, strict=True)
        ]


# --- the whole pipeline --------------------------------------------------------------------------------------


def find_duplicates(
    table: HashTable,
    *,
    labeled: Iterable[int] = (),
    index: VectorIndex | None = None,
    vector_blocks: Iterable[tuple[np.ndarray, np.ndarray]] = (),
    embedding_threshold: float = DEFAULT_EMBEDDING_THRESHOLD,
    phash_distance: int = DEFAULT_PHASH_DISTANCE,
    max_neighbors: int = DEFAULT_MAX_NEIGHBORS,
) -> DuplicateReport:
    """Run the passes over a project's hash table (and, with ``index``, its vectors).

    Args:
        table: ``VectorStore.hash_table()``.
        labeled: task ids already labeled (preferred as keepers).
        index: the project's ``VectorIndex``; without it the embedding pass is left out.
        vector_blocks: ``(task_ids, vectors)`` blocks to query the index with, e.g.
            ``store.iter_vectors(embedder)``; only tasks still ungrouped are queried.
        embedding_threshold: cosine above which two images are near duplicates (0.9).
        phash_distance: most differing pHash bits for a perceptual match (6, at most 12).
        max_neighbors: most neighbours per image in the embedding pass (50).
    """
    _check_threshold(embedding_threshold)
    if isinstance(phash_distance, bool) or not isinstance(phash_distance, int):
        raise ValueError(f"phash_distance must be an integer, got {phash_distance!r}")
    items = Items.from_table(table, labeled)
    rank = items.rank()
    alive = np.ones(len(items.task_ids), dtype=bool)
    results = []
    for stage, keys in (("bytes", table.sha256), ("pixels", table.pixel_hash)):
        started = time.perf_counter()
        groups = _equal_key_groups(items, rank, alive, keys)
        results.append(DuplicateResult(stage, 1.0, groups, time.perf_counter() - started))
        _retire(items, alive, groups)
    started = time.perf_counter()
    groups = _perceptual_groups(items, rank, alive, table.phash, phash_distance)
    results.append(
        DuplicateResult("perceptual", 1 - phash_distance / _PHASH_BITS, groups, time.perf_counter() - started)
    )
    _retire(items, alive, groups)
    if index is not None:
        started = time.perf_counter()
        wanted = items.task_ids[alive]
        blocks = ((ids[mask], vectors[mask]) for ids, vectors in vector_blocks if (mask := np.isin(ids, wanted)).any())
        a, b, sim = embedding_pairs(index, blocks, embedding_threshold, max_neighbors=max_neighbors, keep=wanted)
        order = np.argsort(items.task_ids)
        position_a = order[np.searchsorted(items.task_ids, a, sorter=order)]
        position_b = order[np.searchsorted(items.task_ids, b, sorter=order)]
        groups = group_pairs(items, rank, position_a, position_b, sim)
        results.append(DuplicateResult("embedding", embedding_threshold, groups, time.perf_counter() - started))
    for result in results:
        log.info("%s: %d groups in %.2f s", result.stage, len(result.groups), result.seconds)
    return DuplicateReport(tuple(results))


def _retire(items: Items, alive: np.ndarray, groups: Sequence[DuplicateGroup]) -> None:
    """Duplicates found by a pass take no part in the later ones; their keepers do."""
    gone = [task for group in groups for task in group.duplicates]
    if gone:
        alive[np.isin(items.task_ids, np.array(gone, dtype=np.int64))] = False


# --- exact ---------------------------------------------------------------------------------------------------


def _equal_key_groups(items: Items, rank: np.ndarray, alive: np.ndarray, keys: Sequence[str]) -> tuple:
    buckets: dict[str, list[int]] = {}
    for position in np.flatnonzero(alive).tolist():
        buckets.setdefault(keys[position], []).append(position)
    found = sorted(
        (sorted(members, key=lambda p: rank[p]) for members in buckets.values() if len(members) > 1),
        key=lambda m: rank[m[0]],
    )
    return tuple(
        DuplicateGroup(tuple(int(items.task_ids[p]) for p in members), (1.0,) * len(members), 1.0) for members in found
    )


# --- perceptual ----------------------------------------------------------------------------------------------


def hamming_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` of ``hashes`` (uint64) within ``max_distance`` bits: ``(i, j, distance)``.

    Multi-index hashing: split each hash into *m* chunks; two hashes within *t* bits differ in at most
    *t // m* bits in at least one chunk (pigeonhole), so probing each chunk's buckets within that radius
    finds every such pair, and only those candidates are compared. *m* (2 to 6) is chosen to make the
    probes plus the expected candidates fewest for this many hashes. Pass distinct hashes: equal ones
    make buckets quadratic.
    """
    if isinstance(max_distance, bool) or not 0 <= max_distance <= MAX_PHASH_DISTANCE:
        raise ValueError(f"max_distance must be an integer from 0 to {MAX_PHASH_DISTANCE}, got {max_distance!r}")
    values = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(values)
    widths = _chunk_widths(n, max_distance)
    radius = max_distance // len(widths)
    found: list[np.ndarray] = []
    offset = 0
    for width in widths:
        keys = ((values >> np.uint64(offset)) & np.uint64((1 << width) - 1)).astype(np.int64)
        offset += width
        masks = _flip_masks(width, radius)
        order = np.argsort(keys, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=1 << width))])
        expected = len(masks) * max(1.0, n / (1 << width))
        step = max(1, int(_CANDIDATES_PER_STEP / expected))
        for first in range(0, n, step):
            queries = np.arange(first, min(n, first + step))
            probes = (keys[queries][:, None] ^ masks[None, :]).ravel()
            owners = np.repeat(queries, len(masks))
            low, count = starts[probes], starts[probes + 1] - starts[probes]
            for a, b in _expand(owners, low, count, order):
                keep = b > a
                a, b = a[keep], b[keep]
                distance = np.bitwise_count(values[a] ^ values[b])
                close = distance <= max_distance
                found.append(a[close] * n + b[close])
    pairs = np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)
    first, second = pairs // max(n, 1), pairs % max(n, 1)
    return first, second, np.bitwise_count(values[first] ^ values[second]).astype(np.int64)


def _chunk_widths(n: int, max_distance: int) -> list[int]:
    """The split of 64 bits into 2-6 chunks that makes probes + expected candidates fewest."""
    best: tuple[float, list[int]] | None = None
    for chunks in range(2, 7):
        widths = [_PHASH_BITS // chunks + (1 if i < _PHASH_BITS % chunks else 0) for i in range(chunks)]
        if max(widths) > 24:
            continue  # bucket tables of 2^25+ entries cost more memory than they save
        radius = max_distance // chunks
        cost = sum(_flip_count(w, radius) * (1.0 + n / (1 << w)) for w in widths)
        if best is None or cost < best[0]:
            best = (cost, widths)
    assert best is not None
    return best[1]


def _flip_count(width: int, radius: int) -> int:
    return sum(math.comb(width, r) for r in range(radius + 1))


@cache
def _flip_masks(width: int, radius: int) -> np.ndarray:
    """Every ``width``-bit value with at most ``radius`` bits set (the probes around a key)."""
    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << bit for bit in bits) for bits in combinations(range(width), r)]
    return np.array(masks, dtype=np.int64)


def _expand(owners: np.ndarray, low: np.ndarray, count: np.ndarray, order: np.ndarray):
    """Yield ``(query, candidate)`` index arrays for bucket ranges, at most ~_CANDIDATES_PER_STEP at a time."""
    ends = np.cumsum(count)
    start = 0
    while start < len(count):
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + _CANDIDATES_PER_STEP, side="right")))
        seg_count = count[start:stop]
        total = int(seg_count.sum())
        if total:
            offsets = np.arange(total) - np.repeat(np.cumsum(seg_count) - seg_count, seg_count)
            yield np.repeat(owners[start:stop], seg_count), order[np.repeat(low[start:stop], seg_count) + offsets]
        start = stop


def _perceptual_groups(
    items: Items, rank: np.ndarray, alive: np.ndarray, phashes: np.ndarray, max_distance: int
) -> tuple[DuplicateGroup, ...]:
    live = np.flatnonzero(alive)
    unique, node_of = np.unique(np.asarray(phashes, dtype=np.uint64)[live], return_inverse=True)
    # Each node (distinct hash) stands for its best-ranked item; its other items are identical to it.
    node_items: list[list[int]] = [[] for _ in range(len(unique))]
    for position, node in zip(live.tolist(), node_of.tolist(), strict=True):
        node_items[node].append(position)
    for members in node_items:
        members.sort(key=lambda p: rank[p])
    node_rank = np.array([rank[members[0]] for members in node_items], dtype=np.int64)
    a, b, distance = hamming_pairs(unique, max_distance)
    similarity = 1.0 - distance / _PHASH_BITS
    node_groups = _greedy_cliques(len(unique), a, b, similarity, node_rank)
    grouped = {node for group in node_groups for node, _ in group}
    node_groups += [[(node, 1.0)] for node in range(len(unique)) if node not in grouped and len(node_items[node]) > 1]
    node_groups.sort(key=lambda group: node_rank[group[0][0]])
    adjacency = _adjacency(a, b, similarity)
    groups = []
    for group in node_groups:
        nodes = [node for node, _ in group]
        tasks, sims = [], []
        for node, to_keeper in group:
            for position in node_items[node]:
                tasks.append(int(items.task_ids[position]))
                sims.append(1.0 if node == nodes[0] else float(to_keeper))
        weakest = min((adjacency[x][y] for i, x in enumerate(nodes) for y in nodes[i + 1 :]), default=1.0)
        groups.append(DuplicateGroup(tuple(tasks), tuple(sims), float(weakest)))
    return tuple(groups)


# --- embedding -----------------------------------------------------------------------------------------------


def embedding_pairs(
    index: VectorIndex,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    threshold: float,
    *,
    max_neighbors: int = DEFAULT_MAX_NEIGHBORS,
    keep: np.ndarray | None = None,
    use_knn: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of task ids with cosine >= ``threshold``: ``(a, b, similarity)`` with ``a < b``, each once.

    Each block's vectors query the index: a range search on the CPU, or (``use_knn``, the default on a
    GPU index) a top-``max_neighbors`` search filtered by the threshold. Hits outside ``keep`` (when
    given) and each query's own id are dropped; at most ``max_neighbors`` hits per query are kept.
    """
    _check_threshold(threshold)
    if max_neighbors < 1:
        raise ValueError(f"max_neighbors must be at least 1, got {max_neighbors}")
    knn = index.on_gpu if use_knn is None else use_knn
    keep_array = None if keep is None else np.asarray(keep, dtype=np.int64)
    found: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for ids, vectors in blocks:
        for first in range(0, len(ids), 4096):
            query_ids = np.asarray(ids[first : first + 4096], dtype=np.int64)
            queries = vectors[first : first + 4096]
            if knn:
                sims, hits = index.search(queries, max_neighbors + 1)
                owners = np.repeat(query_ids, hits.shape[1])
                sims, hits = sims.ravel(), hits.ravel()
            else:
                lims, sims, hits = index.range_search(queries, threshold)
                owners = np.repeat(query_ids, np.diff(lims).astype(np.int64))
            ok = (hits >= 0) & (hits != owners) & (sims >= threshold)
            if keep_array is not None:
                ok &= np.isin(hits, keep_array)
            owners, hits, sims = owners[ok], hits[ok], sims[ok]
            owners, hits, sims = _cap_per_query(owners, hits, sims, max_neighbors)
            low, high = np.minimum(owners, hits), np.maximum(owners, hits)
            found.append(np.stack([low, high], axis=1))
            scores.append(sims)
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    pairs = np.concatenate(found)
    sims = np.concatenate(scores)
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    return pairs[:, 0], pairs[:, 1], sims[first]


def _cap_per_query(owners: np.ndarray, hits: np.ndarray, sims: np.ndarray, cap: int):
    """Keep each query's ``cap`` most similar hits."""
    order = np.lexsort((-sims, owners))
    owners, hits, sims = owners[order], hits[order], sims[order]
    starts = np.searchsorted(owners, owners, side="left")
    keep = np.arange(len(owners)) - starts < cap
    return owners[keep], hits[keep], sims[keep]


# --- grouping ------------------------------------------------------------------------------------------------


def group_pairs(
    items: Items, rank: np.ndarray, a: np.ndarray, b: np.ndarray, similarity: np.ndarray
) -> tuple[DuplicateGroup, ...]:
    """Groups of items (positions ``a``/``b`` into ``items``) in which every pair is a given similar pair."""
    cliques = _greedy_cliques(len(items.task_ids), a, b, similarity, rank)
    adjacency = _adjacency(a, b, similarity)
    groups = []
    for clique in cliques:
        nodes = [node for node, _ in clique]
        weakest = min(adjacency[x][y] for i, x in enumerate(nodes) for y in nodes[i + 1 :])
        groups.append(
            DuplicateGroup(
                tuple(int(items.task_ids[node]) for node in nodes),
                tuple(float(sim) for _, sim in clique),
                float(weakest),
            )
        )
    return tuple(groups)


def _adjacency(a: np.ndarray, b: np.ndarray, similarity: np.ndarray) -> dict[int, dict[int, float]]:
    adjacency: dict[int, dict[int, float]] = {}
    for x, y, sim in zip(a.tolist(), b.tolist(), np.asarray(similarity, dtype=np.float64).tolist(), strict=True):
        if x == y:
            continue
        adjacency.setdefault(x, {})[y] = sim
        adjacency.setdefault(y, {})[x] = sim
    return adjacency


def _greedy_cliques(
    n: int, a: np.ndarray, b: np.ndarray, similarity: np.ndarray, rank: np.ndarray
) -> list[list[tuple[int, float]]]:
    """Complete-linkage groups: ``[(node, similarity to the group's first node), ...]`` of 2+ nodes each.

    Nodes are taken best rank first; a group's first node takes its unassigned neighbours, most similar
    first, each only if it is a neighbour of every member already taken.
    """
    adjacency = _adjacency(a, b, similarity)
    assigned = np.zeros(n, dtype=bool)
    groups = []
    for seed in sorted(adjacency, key=lambda node: rank[node]):
        if assigned[seed]:
            continue
        assigned[seed] = True
        neighbours = adjacency[seed]
        candidates = sorted(
            (node for node in neighbours if not assigned[node]), key=lambda node: (-neighbours[node], rank[node])
        )
        group = [(seed, 1.0)]
        for node in candidates:
            links = adjacency[node]
            if all(member in links for member, _ in group[1:]):
                group.append((node, neighbours[node]))
        if len(group) > 1:
            for node, _ in group[1:]:
                assigned[node] = True
            groups.append(group)
    return groups


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine similarity in (0, 1], got {threshold!r}")
