"""Waiting for a cluster's node tasks: one stream of the work requirement's updates for the whole
wait (its task groups count their tasks by status), falling back to reading it with a backoff
capped at a few seconds if the stream fails; a node task that fails ends the wait at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime

from yellowdog_client import PlatformClient
from yellowdog_client.common.server_sent_events import SubscriptionEventListener
from yellowdog_client.model import Task, TaskSearch, TaskStatus, WorkRequirement

from prefect_raydog.cluster.client import FIRST_POLL_S, Deadline
from prefect_raydog.errors import ClusterBuildTimeout, NodeTaskFailed

MAX_READ_INTERVAL_S = 3.0
# How often a waiter looks at its closing flag while no update comes (no request is made).
CHECK_INTERVAL_S = 0.1
# A stream's first event comes at once; without one by then, the stream is failing (the SDK
# retries a 5xx silently, every 3 s) and the wait reads the requirement itself.
FIRST_EVENT_S = 5.0

_ENDED = [status for status in TaskStatus if status.finished]


class RequirementWatch(SubscriptionEventListener[WorkRequirement]):
    """The latest state of a work requirement, kept by its update stream while entered.

    Close it before the requirement can reach a final status: the stream ends after that
    status's event, and yellowdog-sdk's reader, which looks at its cancel flag only when an
    event comes, spins at 100% CPU from that end on unless it was cancelled before."""

    def __init__(self, client: PlatformClient, work_requirement_id: str) -> None:
        self._client = client
        self.work_requirement_id = work_requirement_id
        self._changed = threading.Condition()
        self._latest: WorkRequirement | None = None
        self._stamp = datetime.min
        self._streaming = True
        self._started = time.monotonic()
        self.version = 0
        """How many updates have come: a reader that saw this number has missed none since."""

    def __enter__(self) -> RequirementWatch:
        return self.open()

    def __exit__(self, *_: object) -> None:
        self.close()

    def open(self) -> RequirementWatch:
        """Start following the stream; `close` ends it."""
        # Inside the guard, so that an interrupt landing as the stream opens still closes it.
        try:
            self._started = time.monotonic()
            self._client.work_client.add_work_requirement_listener_by_id(
                self.work_requirement_id, self
            )
        except BaseException:
            self.close()
            raise
        return self

    @property
    def streaming(self) -> bool:
        """Whether updates arrive: the stream is open and its first event has come."""
        with self._changed:
            return self._streaming and self._latest is not None

    def updated(self, obj: WorkRequirement) -> None:
        # The SDK hands each event to its own thread: keep the newest, whatever the order.
        stamp = _stamp(obj)
        with self._changed:
            self.version += 1
            if self._latest is None or stamp >= self._stamp:
                self._latest, self._stamp = obj, stamp
            self._changed.notify_all()

    def subscription_error(self, error: Exception) -> None:
        self.subscription_cancelled()

    def subscription_cancelled(self) -> None:
        with self._changed:
            self._streaming = False
            self._changed.notify_all()

    def close(self) -> None:
        work = self._client.work_client
        work.remove_work_requirement_listener(self)
        # yellowdog-sdk 15's `remove_listener` stops at the first closed subscription it meets:
        # on a client that watched another requirement before, ours stays open, and its thread
        # spins at 100% CPU once the stream ends. So close ours where the SDK keeps it.
        manager = getattr(work, "_WorkClientImpl__requirement_subscriptions", None)
        subscription = getattr(manager, "_subscriptions", {}).get(self.work_requirement_id)
        if subscription is not None and subscription.has_listener(self):
            subscription.remove_listener(self)

    def wait(
        self,
        done: Callable[[WorkRequirement], bool],
        deadline: Deadline,
        check_not_closing: Callable[[], None],
    ) -> WorkRequirement | None:
        """The first state for which `done` holds; the last one seen when the deadline passes."""
        interval = FIRST_POLL_S
        while True:
            check_not_closing()
            with self._changed:
                latest, streaming = self._latest, self._streaming
            if latest is None and time.monotonic() - self._started > FIRST_EVENT_S:
                streaming = False
            if latest is not None and done(latest):
                return latest
            remaining = deadline.remaining()
            if remaining <= 0:
                return latest
            if streaming:
                with self._changed:
                    if self._latest is latest and self._streaming:
                        self._changed.wait(min(CHECK_INTERVAL_S, remaining))
                continue
            time.sleep(min(interval, remaining))
            interval = min(interval * 2, MAX_READ_INTERVAL_S)
            self.updated(self._client.work_client.get_work_requirement_by_id(self.work_requirement_id))


def _stamp(requirement: WorkRequirement) -> datetime:
    times = [
        group.taskSummary.lastUpdatedTime.replace(tzinfo=None)
        for group in requirement.taskGroups or []
        if group.taskSummary is not None and group.taskSummary.lastUpdatedTime is not None
    ]
    return max(times, default=datetime.min)


def counts(requirement: WorkRequirement, task_group_ids: set[str | None]) -> dict[TaskStatus, int]:
    """How many tasks of the task groups have each status."""
    total: dict[TaskStatus, int] = {}
    for group in requirement.taskGroups or []:
        if group.id in task_group_ids and group.taskSummary is not None:
            for status, count in (group.taskSummary.statusCounts or {}).items():
                status = TaskStatus(status) if isinstance(status, str) else status
                total[status] = total.get(status, 0) + count
    return total


def ended(statuses: dict[TaskStatus, int]) -> int:
    return sum(count for status, count in statuses.items() if status.finished)


def wait_until_executing(
    client: PlatformClient,
    watch: RequirementWatch,
    task_group_id: str | None,
    task_id: str,
    what: str,
    cluster_name: str,
    deadline: Deadline,
    check_not_closing: Callable[[], None],
) -> Task:
    """Wait until the only task of its group runs; raise as soon as it ends, or at the deadline."""
    watch.wait(
        lambda requirement: bool(counts(requirement, {task_group_id}).get(TaskStatus.EXECUTING))
        or ended(counts(requirement, {task_group_id})) > 0,
        deadline,
        check_not_closing,
    )
    task = client.work_client.get_task_by_id(task_id)
    if task.status == TaskStatus.EXECUTING:
        return task
    # A shutdown from another thread cancels the task: say that, not that the task ended.
    check_not_closing()
    if task.status is not None and task.status.finished:
        raise NodeTaskFailed(
            f"The {what} of cluster {cluster_name!r} did not start: its task {task_id} "
            f"ended {describe_task_end(task)}"
        )
    raise ClusterBuildTimeout(
        f"The {what} of cluster {cluster_name!r} did not start within "
        f"{deadline.timeout}: its task {task_id} is still {task.status}"
    )


def wait_for_workers(
    client: PlatformClient,
    watch: RequirementWatch,
    head: tuple[str | None, str | None],
    worker_group_ids: set[str | None],
    count: int,
    cluster_name: str,
    deadline: Deadline,
    check_not_closing: Callable[[], None],
) -> None:
    """Wait until `count` worker node tasks run; raise as soon as one of them or the head ends."""
    head_group_id, head_task_id = head

    def settled(requirement: WorkRequirement) -> bool:
        workers = counts(requirement, worker_group_ids)
        return (
            workers.get(TaskStatus.EXECUTING, 0) >= count
            or ended(workers) > 0
            or ended(counts(requirement, {head_group_id})) > 0
        )

    requirement = watch.wait(settled, deadline, check_not_closing)
    if requirement is None or ended(counts(requirement, {head_group_id})):
        check_head_still_running(client, head_task_id, cluster_name, check_not_closing)
    workers = counts(requirement, worker_group_ids) if requirement else {}
    if ended(workers):
        search = TaskSearch(workRequirementId=watch.work_requirement_id, statuses=_ENDED)
        for task in client.work_client.get_tasks(search).iterate():
            if task.taskGroupId in worker_group_ids:
                check_not_closing()
                raise NodeTaskFailed(
                    f"A worker node of cluster {cluster_name!r} did not start: its task "
                    f"{task.id} ended {describe_task_end(task)}"
                )
    executing = workers.get(TaskStatus.EXECUTING, 0)
    if executing >= count:
        return
    raise ClusterBuildTimeout(
        f"Only {executing} of the {count} required worker nodes of cluster "
        f"{cluster_name!r} started within {deadline.timeout}"
    )


def check_head_still_running(
    client: PlatformClient,
    head_task_id: str | None,
    cluster_name: str,
    check_not_closing: Callable[[], None],
) -> None:
    task = client.work_client.get_task_by_id(head_task_id)
    if task.status is not None and task.status.finished:
        check_not_closing()
        raise NodeTaskFailed(
            f"The head node of cluster {cluster_name!r} stopped while the cluster was being "
            f"built: its task {task.id} ended {describe_task_end(task)}"
        )


def ended_node_task(client: PlatformClient, work_requirement_id: str,
                    head_task_id: str | None) -> Task | None:
    """A node task of the cluster, other than the head's, that has ended (none are retried)."""
    search = TaskSearch(workRequirementId=work_requirement_id, statuses=_ENDED)
    return next((task for task in client.work_client.get_tasks(search).iterate()
                 if task.id != head_task_id), None)


def describe_task_end(task: Task) -> str:
    text = str(task.status)
    for error in task.errors or []:
        text += f" ({error.errorType}"
        if error.processExitCode is not None:
            text += f", exit code {error.processExitCode}"
        text += f": {error.error})" if error.error else ")"
    return text
