"""Make Label Studio hand out unlabeled tasks in our ranking: the rank and its reason written into task
data, and a Data Manager tab "dinolabel priority" ordered by the rank.

How Label Studio 1.23.2 (open source) picks the next task, read in its source (paths under
``site-packages/label_studio``; the front end's sources are in the source maps of
``site-packages/web/dist/apps/labelstudio/``):

- The labeling stream asks for a task with the hidden Data Manager action ``next_task``:
  ``POST /api/dm/actions?id=next_task&project=P&tabID=T`` (``AppStore.js`` ``invokeAction``, called by
  ``DataStores/tasks.js`` ``loadNextTask``). ``tabID`` is not read by the server; the body carries the
  tab's ``ordering``, ``filters`` and ``selectedItems``, which ``get_prepare_params``
  (``data_manager/functions.py:279``) turns into the task query (``data_manager/managers.py:504``,
  ordering at ``:142``: one key, ``ordering[0]``; none means ``order_by('id')``).
- What the body holds depends on the button (``components/DataManager/Toolbar/LabelButton.jsx`` and
  ``AppStore.js``). **"Label Tasks As Displayed"** (the arrow beside "Label All Tasks") sends the
  tab's ordering and filters. **"Label All Tasks"** drops the filters and, when no task is ticked,
  the ordering too: the body is empty, and Label Studio falls back to the project's sampling
  (Settings > Annotation > Task Sampling) over all tasks: sequential is id order, uniform is random
  (``projects/functions/next_task.py:404``). With every task ticked (the header checkbox), "Label
  All Tasks" sends the tab's ordering and filters as well.
- With an ordering, filters or a selection in the body (``dm_queue``, ``next_task.py:452``), the next
  task is the first of the tab's tasks that is not labeled (``is_labeled``) and that this user has
  not annotated or postponed (``next_task.py:198``, ``:472``): the head of our ranking, and after
  each submitted annotation the next rank. Locks are not consulted on that path, so two annotators
  streaming the same tab at once get the same task.
- Checked in Label Studio's own front end (headless Chromium, logged in, our tab open): "Label Tasks
  As Displayed" opened the rank-0 task, "Label All Tasks" the task with the lowest id.
- ``GET /api/projects/P/next?view=T`` (``projects/api.py:449``) takes the tab's ordering and filters
  but no ``dm_queue``: under sequential sampling it hands out the first unlocked task in the tab's
  order (``next_task.py:48``), under uniform sampling a random one.

What can be sorted on (``managers.py:142``, ``functions.py:364``): task fields (id, dates, counters),
a few computed columns (``predictions_score`` is the mean score of the predictions of the project's
model version, which our detector's predictions already set) and ``data.<field>``. A data field is
ordered as text unless the tab marks the column as a number (the stream's request never does), so
ranks are written zero-padded to one width. Task ``meta`` cannot be sorted on.

What can be written in bulk: only task *creation* and prediction import take many tasks per call; a
task's data changes one task per ``PATCH /api/tasks/{id}``. The exception is the Data Manager action
"Add Or Modify Data Field" (``add_data_field``, ``data_manager/actions/experimental.py:159``; hidden
in the menu as experimental, callable through the API): one call sets one value on every selected
task, or applies ``replace("old", "new")`` to the field of every selected task. One value per call
cannot give 100,000 tasks 100,000 ranks, but ``replace`` can write them digit by digit: every ranked
task first gets its leading digit followed by one ``#`` per digit still to come (``"3####"``, one call
per leading digit), then each further position replaces the run of ``#`` by the digit and a run one
shorter (``replace("####", "7###")``, one call per digit value). That is at most 10 calls per digit
of the largest rank (5 digits for 100,000 tasks: ~50 calls, more where a digit's tasks exceed
``MAX_IDS_PER_ACTION``), whatever the number of tasks. Reasons are written the same way, one call per
distinct reason (so reasons are categories: at most ``MAX_REASONS`` distinct ones).

Every write sets a constant on named tasks or rewrites a run of ``#`` that only the named tasks hold:
sending it twice leaves the same data as sending it once, so a write whose answer was lost is sent
again (after a back-off), and the whole write is checked at the end: no value holds a ``#``.

While ranks are rewritten, values are partly written (``"3####"``): ``#`` sorts before every digit, so
the tab stays ordered by the digits written so far, coarse first, exact at the end. Tasks that held
a rank and are not ranked again (labeled since) are marked first (their reason becomes
``OUTDATED``) and cleared at the end.

Removing it (``remove_priority``): the tab is deleted and both fields are set to ``""`` on every task
that holds them (one call each). The keys themselves stay in the task data with empty values: Label
Studio has no bulk way to delete a data key (a ``PATCH`` per task would).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backend.ls_client import MAX_IDS_PER_ACTION, LabelStudioClient, LabelStudioError, WriteUncertain

log = logging.getLogger(__name__)

TAB_TITLE = "dinolabel priority"
MARKER = "dinolabel"
"""Key in the tab's data naming the fields it orders by: how we recognise our tab."""
MAX_REASONS = 100
"""Distinct reasons in one ranking: each costs a write call (more when its tasks exceed
``MAX_IDS_PER_ACTION``)."""
MAX_REASON_LENGTH = 200
OUTDATED = "(outdated)"
"""The reason a previously ranked task holds until it is ranked again or cleared."""
HIDDEN_COLUMNS = tuple(
    f"tasks:{name}"
    for name in (
        "inner_id", "annotations_results", "annotations_ids", "predictions_model_versions", "predictions_results",
        "file_upload", "storage_filename", "created_at", "updated_at", "updated_by", "avg_lead_time", "draft_exists",
    )
)  # fmt: skip
"""Built-in columns our tab hides, so that the rank and reason columns (data columns come last) are in view."""
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_HOLE = "#"


class PriorityFieldTaken(ValueError):
    """A field we would write already holds values that we did not write."""


@dataclass(frozen=True)
class PriorityFields:
    """The task data fields that carry the rank and its reason (names are settings)."""

    rank: str = "dinolabel_rank"
    reason: str = "dinolabel_reason"

    def __post_init__(self) -> None:
        for name in (self.rank, self.reason):
            if not _FIELD.fullmatch(name):
                raise ValueError(f"a task data field name is letters, digits and '_' (at most 64), not {name!r}")
        if self.rank == self.reason:
            raise ValueError(f"the rank and the reason need two fields, not both {self.rank!r}")


@dataclass(frozen=True)
class Write:
    """One ``add_data_field`` call: ``value`` (a ``String`` or an ``Expression``) into ``field`` of
    the tasks ``ids``, or of the tasks matching ``filters``."""

    field: str
    value_type: str
    value: str
    ids: tuple[int, ...] | None = None
    filters: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class PriorityWritten:
    """What a ranking write did: the tasks holding a rank afterwards, calls, seconds, the tab."""

    ranked: int
    calls: int
    seconds: float
    tab_id: int


def _filter(field: str, operator: str, value: str) -> dict[str, Any]:
    return {"filter": f"filter:tasks:data.{field}", "operator": operator, "type": "String", "value": value}


def holds_rank(field: str) -> dict[str, Any]:
    """Tasks whose rank field holds a rank, complete or being written (digits and ``#``)."""
    return _filter(field, "regex", "^[0-9#]+$")


def _holds_anything(field: str) -> dict[str, Any]:
    return _filter(field, "regex", ".")


def _outdated(field: str) -> dict[str, Any]:
    return _filter(field, "equal", OUTDATED)


def rank_texts(ranks: Mapping[int, int]) -> dict[int, str]:
    """Ranks as text that sorts like the numbers: zero-padded to the width of the largest."""
    for task, rank in ranks.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"task {task}: a rank is an int >= 0, not {rank!r}")
    width = len(str(max(ranks.values(), default=0)))
    return {task: str(rank).zfill(width) for task, rank in ranks.items()}


def _chunks(ids: Sequence[int], size: int) -> Iterator[tuple[int, ...]]:
    for start in range(0, len(ids), size):
        yield tuple(ids[start : start + size])


def plan_rank_writes(ranks: Mapping[int, int], field: str, *, chunk: int = MAX_IDS_PER_ACTION) -> list[Write]:
    """The calls that write ``ranks`` into ``field`` digit by digit (see the module docstring)."""
    texts = rank_texts(ranks)
    if not texts:
        return []
    width = len(next(iter(texts.values())))
    writes: list[Write] = []
    for position in range(width):
        by_digit: dict[str, list[int]] = {}
        for task in sorted(texts):
            by_digit.setdefault(texts[task][position], []).append(task)
        holes = width - position - 1
        for digit in sorted(by_digit):
            for ids in _chunks(by_digit[digit], chunk):
                if position == 0:
                    writes.append(Write(field, "String", digit + _HOLE * holes, ids))
                else:
                    old, new = _HOLE * (holes + 1), digit + _HOLE * holes
                    writes.append(Write(field, "Expression", f'replace("{old}", "{new}")', ids))
    return writes


def plan_reason_writes(reasons: Mapping[int, str], field: str, *, chunk: int = MAX_IDS_PER_ACTION) -> list[Write]:
    """One call per distinct reason (and per ``chunk`` of its tasks)."""
    by_reason: dict[str, list[int]] = {}
    for task in sorted(reasons):
        reason = reasons[task]
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_LENGTH:
            raise ValueError(f"task {task}: a reason is 1 to {MAX_REASON_LENGTH} characters, not {reason!r}")
        if reason == OUTDATED:
            raise ValueError(f"task {task}: {OUTDATED!r} is the reason of tasks no longer ranked")
        by_reason.setdefault(reason, []).append(task)
    if len(by_reason) > MAX_REASONS:
        raise ValueError(
            f"{len(by_reason)} distinct reasons: at most {MAX_REASONS} (each is a write call); "
            "give categories, and details elsewhere"
        )
    return [Write(field, "String", reason, ids) for reason, tasks in by_reason.items() for ids in _chunks(tasks, chunk)]


def tab_data(fields: PriorityFields) -> dict[str, Any]:
    """Our tab: the tasks holding a rank, lowest rank first, with the rank and reason columns."""
    return {
        "title": TAB_TITLE,
        "type": "list",
        "target": "tasks",
        "ordering": [f"tasks:data.{fields.rank}"],
        "filters": {"conjunction": "and", "items": [holds_rank(fields.rank)]},
        "hiddenColumns": {"explore": list(HIDDEN_COLUMNS), "labeling": list(HIDDEN_COLUMNS)},
        MARKER: {"rank_field": fields.rank, "reason_field": fields.reason},
    }


def our_tabs(client: LabelStudioClient, project: int) -> list[dict[str, Any]]:
    """The project's tabs that we created (titled ``TAB_TITLE`` and carrying our marker)."""
    return [
        view
        for view in client.views(project)
        if isinstance(view.get("data"), dict)
        and view["data"].get("title") == TAB_TITLE
        and isinstance(view["data"].get(MARKER), dict)
    ]


def ensure_tab(client: LabelStudioClient, project: int, fields: PriorityFields) -> int:
    """Create our tab, or bring the one we made up to date; its id.

    A create whose answer was lost is looked for before it is sent again (a second one would make
    a second tab)."""
    data = tab_data(fields)
    for attempt in range(client.retries + 1):
        tabs = our_tabs(client, project)
        if tabs:
            first, *extra = sorted(tabs, key=lambda view: int(view["id"]))
            client.update_view(int(first["id"]), project, data)
            for view in extra:
                client.delete_view(int(view["id"]))
            return int(first["id"])
        try:
            return int(client.create_view(project, data)["id"])
        except WriteUncertain as exc:
            if attempt == client.retries:
                raise
            log.warning("creating the priority tab of project %d may have gone through (%s): checking", project, exc)
            client.sleep(client.delay(attempt))
    raise AssertionError("unreachable")


def check_fields_free(client: LabelStudioClient, project: int, fields: PriorityFields) -> None:
    """Refuse to write into fields that hold someone else's values.

    The fields are ours when our tab names them, or when no task holds a non-empty value in them
    (a project never ranked, or one whose ranking was removed)."""
    for view in our_tabs(client, project):
        marker = view["data"][MARKER]
        if marker.get("rank_field") == fields.rank and marker.get("reason_field") == fields.reason:
            return
    for name, setting in ((fields.rank, "RANK"), (fields.reason, "REASON")):
        if client.count_tasks(project, [_holds_anything(name)]):
            raise PriorityFieldTaken(
                f"tasks of project {project} already hold a data field {name!r} that dinolabel did not "
                f"write: set DINOLABEL_PRIORITY_{setting}_FIELD to a field name the tasks do not use"
            )


class _Sender:
    """Sends writes and counts calls; a write whose answer was lost is sent again (every write here
    is idempotent, see the module docstring)."""

    def __init__(self, client: LabelStudioClient, project: int) -> None:
        self.client = client
        self.project = project
        self.calls = 0

    def send(self, write: Write) -> None:
        for attempt in range(self.client.retries + 1):
            self.calls += 1
            try:
                self.client.set_data_field(
                    self.project, write.field, write.value_type, write.value, ids=write.ids, filters=write.filters
                )
                return
            except WriteUncertain as exc:
                if attempt == self.client.retries:
                    raise
                log.warning("write to %r may have gone through (%s): sending it again", write.field, exc)
                self.client.sleep(self.client.delay(attempt))


def write_priority(
    client: LabelStudioClient,
    project: int,
    ranks: Mapping[int, tuple[int, str]],
    fields: PriorityFields | None = None,
) -> PriorityWritten:
    """Write ``{task_id: (rank, reason)}`` into Label Studio and make the tab follow it.

    Lower ranks are handed out first. Tasks that held a rank before and are not in ``ranks`` lose it.
    Raises ``PriorityFieldTaken`` when a field holds values we did not write, ``ValueError`` on bad
    ranks or reasons (before anything is written), ``LabelStudioError`` when Label Studio fails.
    """
    fields = fields or PriorityFields()
    started = time.monotonic()
    reason_writes = plan_reason_writes({task: reason for task, (_, reason) in ranks.items()}, fields.reason)
    rank_writes = plan_rank_writes({task: rank for task, (rank, _) in ranks.items()}, fields.rank)
    check_fields_free(client, project, fields)
    sender = _Sender(client, project)
    sender.send(Write(fields.reason, "String", OUTDATED, filters=(holds_rank(fields.rank),)))
    for write in [*reason_writes, *rank_writes]:
        sender.send(write)
    sender.send(Write(fields.rank, "String", "", filters=(_outdated(fields.reason),)))
    sender.send(Write(fields.reason, "String", "", filters=(_outdated(fields.reason),)))
    tab = ensure_tab(client, project, fields)
    unfinished = client.count_tasks(project, [_filter(fields.rank, "contains", _HOLE)])
    if unfinished:
        raise LabelStudioError(f"{unfinished} ranks in project {project} were left half-written: write them again")
    ranked = client.count_tasks(project, [holds_rank(fields.rank)])
    seconds = time.monotonic() - started
    log.info("project %d: %d ranks written in %d calls, %.1f s (tab %d)", project, ranked, sender.calls, seconds, tab)
    return PriorityWritten(ranked=ranked, calls=sender.calls, seconds=seconds, tab_id=tab)


def remove_priority(client: LabelStudioClient, project: int, fields: PriorityFields | None = None) -> int:
    """Undo ``write_priority``: delete our tab and empty both fields wherever they hold a value.

    Returns the write calls made. Only tasks whose rank field holds a rank (digits) are touched. The
    emptied keys stay in the task data: Label Studio has no bulk way to delete a key."""
    fields = fields or PriorityFields()
    for view in our_tabs(client, project):
        client.delete_view(int(view["id"]))
    sender = _Sender(client, project)
    sender.send(Write(fields.reason, "String", "", filters=(holds_rank(fields.rank),)))
    sender.send(Write(fields.rank, "String", "", filters=(holds_rank(fields.rank),)))
    return sender.calls
