"""The plan of writes that puts ranks into Label Studio, applied the way Label Studio's
``add_data_field`` action applies them (``data_manager/actions/experimental.py``: a ``String`` sets
the value, ``replace("a", "b")`` is Python's ``str.replace`` on tasks that hold the field). The real
server is in tests/test_e2e_priority.py."""

from __future__ import annotations

import json
import random

import pytest

from backend.ls_client import MAX_IDS_PER_ACTION
from backend.ls_priority import (
    MAX_REASONS,
    OUTDATED,
    PriorityFields,
    Write,
    plan_rank_writes,
    plan_reason_writes,
    rank_texts,
)


def apply(tasks: dict[int, dict[str, object]], writes: list[Write]) -> None:
    """What Label Studio does with each write (only writes by ids are planned here)."""
    for write in writes:
        assert write.ids is not None and len(write.ids) <= MAX_IDS_PER_ACTION
        for task in write.ids:
            data = tasks[task]
            if write.value_type == "String":
                data[write.field] = write.value
            else:
                command, args = write.value.split("(")
                assert command == "replace"
                old, new = json.loads("[" + args.rstrip(")") + "]")
                if write.field in data:
                    data[write.field] = str(data[write.field]).replace(old, new)


@pytest.mark.parametrize("count", [1, 9, 10, 11, 50, 1000, 12345])
def test_planned_writes_give_every_task_its_rank_as_sortable_text(count: int) -> None:
    rng = random.Random(count)
    task_ids = rng.sample(range(1, 10 * count + 1), count)
    ranks = dict(zip(task_ids, rng.sample(range(count), count), strict=True))
    tasks: dict[int, dict[str, object]] = {t: {"image": f"/{t}.png", "dinolabel_rank": "00017"} for t in task_ids}

    apply(tasks, plan_rank_writes(ranks, "dinolabel_rank"))

    width = len(str(count - 1))
    assert all(tasks[t]["dinolabel_rank"] == str(ranks[t]).zfill(width) for t in task_ids)
    by_text = sorted(task_ids, key=lambda t: str(tasks[t]["dinolabel_rank"]))
    assert by_text == sorted(task_ids, key=ranks.__getitem__), "text order is rank order"
    assert all(tasks[t]["image"] == f"/{t}.png" for t in task_ids), "other fields untouched"


def test_calls_grow_with_the_digits_of_the_largest_rank_not_with_the_tasks() -> None:
    ranks = {task: task - 1 for task in range(1, 100_001)}  # 0..99999: five digits
    writes = plan_rank_writes(ranks, "dinolabel_rank")
    assert len(writes) == 5 * 10, "one call per digit value and position (each holds 10,000 tasks: one call)"
    assert max(len(w.ids or ()) for w in writes) == MAX_IDS_PER_ACTION
    assert len(plan_rank_writes({7: 3}, "r")) == 1


def test_ranks_that_are_no_ints_are_refused_before_anything_is_planned() -> None:
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="a rank is an int >= 0"):
            rank_texts({1: 0, 2: bad})  # type: ignore[dict-item]


def test_one_write_per_reason_and_a_bounded_number_of_reasons() -> None:
    reasons = {t: ("duplicate" if t % 3 == 0 else "diverse") for t in range(1, 31)}
    writes = plan_reason_writes(reasons, "dinolabel_reason")
    assert sorted((w.value, w.ids) for w in writes) == [
        ("diverse", tuple(t for t in range(1, 31) if t % 3)),
        ("duplicate", tuple(range(3, 31, 3))),
    ]
    with pytest.raises(ValueError, match=f"at most {MAX_REASONS}"):
        plan_reason_writes({t: f"reason {t}" for t in range(MAX_REASONS + 1)}, "r")
    for bad in ("", "  ", OUTDATED, "x" * 201):
        with pytest.raises(ValueError, match="reason"):
            plan_reason_writes({1: bad}, "r")


def test_field_names_are_plain_and_distinct() -> None:
    assert PriorityFields("rank_2", "why")
    for rank, reason in (("data.rank", "why"), ("rank", "rank"), ("", "why"), ("r" * 65, "why"), ("a b", "c")):
        with pytest.raises(ValueError):
            PriorityFields(rank, reason)
