"""YellowDog's work service: the operations the API's work requirement, task group and task
routes call."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prefect_raydog.local.state.errors import (
    InvalidRequest,
    InvalidTransition,
    NotFound,
    require_text,
)
from prefect_raydog.local.state.search import (
    Query,
    by_id,
    contains,
    healthy,
    in_namespaces,
    matches,
    newest_by_name,
)
from prefect_raydog.local.state.simulation import Simulation
from prefect_raydog.local.state.work import (
    GROUP_CLOSED,
    GROUP_READ_ONLY,
    TASK_FINISHED,
    TASK_READ_ONLY,
    WR_FINISHED,
    WR_READ_ONLY,
    WR_TRANSITIONS,
    Task,
    TaskGroup,
    WorkRequirement,
)
from prefect_raydog.local.wire import now


class WorkService(Simulation):
    """Add, update, transition and search work requirements, task groups and tasks."""

    def add_work_requirement(self, document: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            namespace = require_text(document, "namespace", "Work requirement")
            name = require_text(document, "name", "Work requirement")
            for other in self._requirements.values():
                if (other.namespace, other.name) == (namespace, name) and (
                    other.status not in WR_FINISHED
                ):
                    raise InvalidRequest(
                        f"Work requirement with name '{namespace}/{name}' already exists"
                    )
            spec = {k: v for k, v in document.items() if k not in WR_READ_ONLY}
            requirement = WorkRequirement(namespace, name, spec)
            groups = self._new_groups(requirement, document.get("taskGroups") or [])
            requirement.groups = groups
            self._requirements[requirement.id] = requirement
            self._groups.update((group.id, group) for group in groups)
            return requirement.to_wire()

    def _new_groups(
        self, requirement: WorkRequirement, documents: list[dict[str, Any]]
    ) -> list[TaskGroup]:
        names = {group.name for group in requirement.groups}
        if not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents):
            raise InvalidRequest(
                f"Work requirement '{requirement.name}': field 'taskGroups' "
                "must be a list of task groups"
            )
        groups = []
        for document in documents:
            spec = {k: v for k, v in document.items() if k not in GROUP_READ_ONLY}
            group = TaskGroup(requirement, len(requirement.groups) + len(groups) + 1, spec)
            if group.name in names:
                raise InvalidRequest(
                    f"Task group name '{group.name}' is used twice in work "
                    f"requirement '{requirement.name}'"
                )
            names.add(group.name)
            groups.append(group)
        return groups

    def update_work_requirement(self, document: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            requirement = self._requirement(require_text(document, "id", "Work requirement"))
            if requirement.status not in ("RUNNING", "HELD"):
                raise InvalidRequest(
                    f"Work requirement '{requirement.id}' is "
                    f"{requirement.status} and can no longer be updated"
                )
            known_ids = {group.id for group in requirement.groups}
            known_names = {group.name for group in requirement.groups}
            fresh = [
                g
                for g in document.get("taskGroups") or []
                if not isinstance(g, dict)
                or (g.get("id") not in known_ids and g.get("name") not in known_names)
            ]
            groups = self._new_groups(requirement, fresh)
            requirement.groups.extend(groups)
            self._groups.update((group.id, group) for group in groups)
            for key in ("tag", "priority"):
                if key in document:
                    requirement.spec[key] = document[key]
            return requirement.to_wire()

    def get_work_requirement(self, requirement_id: str) -> dict[str, Any]:
        with self._cond:
            return self._requirement(requirement_id).to_wire()

    def get_work_requirement_by_name(self, namespace: str, name: str) -> dict[str, Any]:
        with self._cond:
            return self._requirement_by_name(namespace, name).to_wire()

    def _requirement(self, requirement_id: str) -> WorkRequirement:
        return by_id(self._requirements, requirement_id, "Work requirement")

    def _requirement_by_name(self, namespace: str, name: str) -> WorkRequirement:
        requirements = self._requirements.values()
        return newest_by_name(requirements, namespace, name, "Work requirement")

    def transition_work_requirement(
        self, requirement_id: str, status: str, abort: bool
    ) -> dict[str, Any]:
        with self._cond:
            requirement = self._requirement(requirement_id)
            if requirement.status not in WR_TRANSITIONS.get(status, set()):
                raise InvalidTransition("WorkRequirement", requirement.status, status)
            if status == "CANCELLING":
                self._cancel_requirement(requirement, abort)
            elif status == "HELD":
                requirement.set_status("HELD")
                for group in requirement.groups:
                    if group.status in ("PENDING", "RUNNING"):
                        group.set_status("HELD")
            elif status == "RUNNING":
                requirement.set_status("RUNNING")
                for group in requirement.groups:
                    if group.status == "HELD":
                        group.set_status("RUNNING" if group.executing else "PENDING")
            else:
                requirement.set_status("FINISHING")
                for group in requirement.groups:
                    if group.status not in GROUP_CLOSED:
                        group.set_status("FINISHING")
                    group.evaluate()
                requirement.evaluate()
            self._changed()
            return requirement.to_wire()

    def search_work_requirements(self, params: dict[str, list[str]]) -> dict[str, Any]:
        query = Query(params)
        with self._cond:
            found = (
                r
                for r in self._requirements.values()
                if in_namespaces(query, r.namespace)
                and contains(query, "name", r.name)
                and contains(query, "tag", r.spec.get("tag"))
                and matches(query, "statuses", r.status)
                and healthy(query, True)
                and query.in_range("createdTime", r.created)
                and query.in_range("statusChangedTime", r.status_changed)
            )
            return query.page(found, WorkRequirement.summary)

    def add_tasks(self, group_id: str, documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self._cond:
            return self._add_tasks(self._group(group_id), documents)

    def add_tasks_by_name(
        self,
        namespace: str,
        requirement_name: str,
        group_name: str,
        documents: list[dict[str, Any]],
    ) -> list[dict[str, Any]]:
        with self._cond:
            requirement = self._requirement_by_name(namespace, requirement_name)
            for group in requirement.groups:
                if group.name == group_name:
                    return self._add_tasks(group, documents)
            raise NotFound(
                f"Task group '{group_name}' not found in work requirement "
                f"'{namespace}/{requirement_name}'"
            )

    def _group(self, group_id: str) -> TaskGroup:
        return by_id(self._groups, group_id, "Task group")

    def _add_tasks(self, group: TaskGroup, documents: list[dict[str, Any]]) -> list[dict]:
        requirement = group.requirement
        if requirement.status in WR_FINISHED or requirement.status == "CANCELLING":
            raise InvalidRequest(
                f"Cannot add tasks to task group '{group.name}': its work "
                f"requirement '{requirement.name}' is {requirement.status}"
            )
        if group.status in GROUP_CLOSED:
            raise InvalidRequest(
                f"Cannot add tasks to task group '{group.name}': it is {group.status}"
            )
        tasks = [
            self._new_task(group, len(group.tasks) + index + 1, document)
            for index, document in enumerate(documents)
        ]
        group.tasks.extend(tasks)
        group.ready.extend(tasks)
        group.updated = now()
        self._tasks.update((task.id, task) for task in tasks)
        if tasks:
            self._waiting[group] = None
            self._changed()
        return [task.to_wire() for task in tasks]

    def _new_task(self, group: TaskGroup, number: int, document: Any) -> Task:
        if not isinstance(document, dict):
            raise InvalidRequest(f"Task {number} for task group '{group.name}' is not an object")
        spec = {k: v for k, v in document.items() if k not in TASK_READ_ONLY}
        task_type = spec.get("taskType")
        if task_type is None and len(group.task_types) == 1:
            spec["taskType"] = task_type = group.task_types[0]
        if task_type not in group.task_types:
            raise InvalidRequest(
                f"Task '{spec.get('name', number)}': field 'taskType' ({task_type!r}) must be "
                f"one of the task group's runSpecification.taskTypes {group.task_types}"
            )
        return Task(group, number, spec)

    def get_task(self, task_id: str) -> dict[str, Any]:
        with self._cond:
            return self._task(task_id).to_wire()

    def _task(self, task_id: str) -> Task:
        return by_id(self._tasks, task_id, "Task")

    def cancel_task(self, task_id: str, abort: bool) -> dict[str, Any]:
        with self._cond:
            task = self._task(task_id)
            if task.status in TASK_FINISHED:
                raise InvalidTransition("Task", task.status, "CANCELLED")
            if task.status == "READY":
                task.group.ready.remove(task)
                task.finish("CANCELLED")
            elif abort and task.outcome is None:
                self._abort(task, "ABORTED", None)
            self._changed()
            return task.to_wire()

    def search_tasks(self, params: dict[str, list[str]]) -> dict[str, Any]:
        query = Query(params)
        with self._cond:
            tasks: Iterable[Task] = self._tasks.values()
            group_id, requirement_id = query.one("taskGroupId"), query.one("workRequirementId")
            if group_id is not None:
                tasks = self._groups[group_id].tasks if group_id in self._groups else []
            elif requirement_id is not None:
                requirement = self._requirements.get(requirement_id)
                tasks = [t for g in requirement.groups for t in g.tasks] if requirement else []
            prefix = query.one("tagStartsWith")
            has_errors = query.flag("hasErrors")
            found = (
                t
                for t in tasks
                if (requirement_id is None or t.group.requirement.id == requirement_id)
                and contains(query, "name", t.spec.get("name"))
                and matches(query, "tag", t.spec.get("tag"))
                and (prefix is None or (t.spec.get("tag") or "").startswith(prefix))
                and matches(query, "statuses", t.status)
                and (has_errors is None or bool(t.errors) == has_errors)
                and query.in_range("startedTime", t.started)
                and query.in_range("finishedTime", t.finished)
            )
            return query.page(found, Task.to_wire)

    def task_output(self, task_id: str) -> str:
        with self._cond:
            task = self._task(task_id)
            simulated = task.node is None or task.node.simulated
        if simulated or self.runner is None:
            return ""
        return self.runner.task_output(task_id)
