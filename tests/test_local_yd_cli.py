"""YellowDog's own command line (`yellowdog-cli`: `yd-provision`, `yd-submit`, `yd-follow`,
`yd-list`, `yd-show`, `yd-resize`, `yd-abort`, `yd-cancel`, `yd-shutdown`, `yd-compute-stop`,
`-start`, `-restart`, `-reprovision`, `yd-nodeaction`, `yd-instantiate`, `yd-terminate`) drives
the local platform as it drives YellowDog: each command runs unmodified, as a subprocess,
against the platform's loopback URL."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import wait_for
from yellowdog_client.model import (
    ComputeRequirementStatus,
    ComputeRequirementTemplateUsage,
    InstanceSearch,
    InstanceStatus,
    NodeActionGroup,
    NodeActionQueueStatus,
    NodeCreateWorkersAction,
    NodeRunCommandAction,
    NodeSearch,
    NodeStatus,
    NodeWorkerTarget,
    ProvisionedWorkerPoolProperties,
    TaskSearch,
    TaskStatus,
    WorkerPoolSearch,
    WorkRequirementStatus,
)
from yellowdog_client.model.exceptions import InvalidRequestException

from prefect_raydog.local import LocalPlatform

BIN = Path(sys.executable).parent
NAMESPACE, TAG = "yd-cli-test", "ydcli"
CONFIG = f"""
[common]
namespace = "{NAMESPACE}"
tag = "{TAG}"

[workerPool]
templateId = "local/process"
targetInstanceCount = 1
maxNodes = 2
workerTag = "ydcli-workers"

[workRequirement]
taskType = "bash"
taskCount = 2
workerTags = ["ydcli-workers"]
arguments = ["taskdata.txt"]
taskData = "echo hello from $YD_TASK_ID"
"""
# Each entity type, with the options that list it without a prompt: those listed within
# another entity (a task group's tasks, a pool's nodes) take every one, templates are in `local`.
LIST_TYPES = {
    "work-requirements": (),
    "task-groups": ("--auto-select-all",),
    "tasks": ("--auto-select-all",),
    "worker-pools": (),
    "nodes": ("--auto-select-all",),
    "workers": ("--auto-select-all",),
    "compute-requirements": (),
    "instances": ("--auto-select-all",),
    "compute-requirement-templates": ("--namespace", "local"),
    "compute-source-templates": ("--namespace", "local"),
    "namespaces": (),
}

FINISHED = ("SHUTDOWN", "TERMINATED")
NODE_ACTIONS = {
    "actions": [
        {"type": "writeFile", "path": "greeting.txt", "content": "hello from an action"},
        {"type": "runCommand", "path": "/bin/sh", "arguments": ["-c", "cp greeting.txt copy.txt"]},
    ]
}


class YdCli:
    """Runs `yd-*` commands in a directory holding `config.toml`, with the platform's URL and
    key in the environment and nothing else of this machine's (no proxies, no home)."""

    def __init__(self, platform: LocalPlatform, directory: Path) -> None:
        assert platform.url.startswith("http://127.0.0.1:")
        self.directory = directory
        self.env = {
            "PATH": f"{BIN}:/usr/bin:/bin",
            "HOME": str(directory),
            "LANG": "C.UTF-8",
            "COLUMNS": "250",
            "NO_COLOR": "1",
            "YD_KEY": platform.key_id,
            "YD_SECRET": platform.key_secret,
            "YD_URL": platform.url,
        }

    def run(self, command: str, *args: str, config: str = "config.toml") -> str:
        result = subprocess.run(
            [str(BIN / f"yd-{command}"), "--config", config, *args],
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        output = " ".join((result.stdout + result.stderr).split())
        assert result.returncode == 0, f"yd-{command} {' '.join(args)} failed:\n{output}"
        assert "ERROR" not in output, output
        return output

    def json(self, command: str, *args: str) -> Any:
        result = subprocess.run(
            [str(BIN / f"yd-{command}"), "--config", "config.toml", *args, "--json", "--quiet"],
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, f"yd-{command} {args}:\n{result.stdout}{result.stderr}"
        return json.loads(result.stdout) if result.stdout.strip() else []

    def list_all(self) -> dict[str, list[dict[str, Any]]]:
        """`yd-list --json` of every entity type, run side by side."""
        with ThreadPoolExecutor(4) as pool:
            rows = pool.map(lambda kind: self.json("list", kind, *LIST_TYPES[kind]), LIST_TYPES)
            return dict(zip(LIST_TYPES, rows, strict=True))


@pytest.fixture
def yd(platform: LocalPlatform, tmp_path: Path) -> YdCli:
    (tmp_path / "config.toml").write_text(CONFIG)
    (tmp_path / "long.toml").write_text(
        CONFIG.replace("taskCount = 2", "taskCount = 3").replace(
            "echo hello from $YD_TASK_ID", "sleep 300"
        )
    )
    (tmp_path / "one.toml").write_text(
        CONFIG.replace("taskCount = 2", "taskCount = 1").replace(
            "echo hello from $YD_TASK_ID", "sleep 300"
        )
    )
    (tmp_path / "actions.json").write_text(json.dumps(NODE_ACTIONS))
    return YdCli(platform, tmp_path)


def _id_in(output: str, kind: str) -> str:
    for word in output.replace("'", " ").split():
        if word.startswith(f"ydid:{kind}:"):
            return word
    raise AssertionError(f"no ydid:{kind}: in\n{output}")


def test_yd_commands_provision_submit_follow_list_show_resize_abort_cancel_shut_down(
    platform: LocalPlatform, yd: YdCli
) -> None:
    client = platform.client
    output = yd.run("provision")
    template_id = _id_in(output, "crt")
    assert f"'local/process' -> {template_id}" in output
    pool_id = _id_in(output, "wrkrpool")

    requirement_id = _id_in(yd.run("submit"), "workreq")
    assert "COMPLETED" in yd.run("follow", requirement_id)
    tasks = client.work_client.get_tasks(TaskSearch(workRequirementId=requirement_id)).list_all()
    assert [task.status for task in tasks] == [TaskStatus.COMPLETED] * 2
    assert platform.task_output(tasks[0].id).strip() == f"hello from {tasks[0].id}"

    rows = yd.list_all()
    assert [(r["name"], r["status"], r["totalTaskCount"]) for r in rows["work-requirements"]] == [
        (client.work_client.get_work_requirement_by_id(requirement_id).name, "COMPLETED", 2)
    ]
    assert [(g["name"], g["status"]) for g in rows["task-groups"]] == [
        ("task_group_1", "COMPLETED")
    ]
    assert sorted(t["name"] for t in rows["tasks"]) == ["task_1", "task_2"]
    assert [(p["id"], p["namespace"]) for p in rows["worker-pools"]] == [(pool_id, NAMESPACE)]
    node_ids = {n["id"] for n in rows["nodes"]}
    assert {task.nodeId for task in tasks} <= node_ids and len(node_ids) in (1, 2)
    assert {w["id"] for w in rows["workers"]} == {n["workers"][0]["id"] for n in rows["nodes"]}
    [requirement] = rows["compute-requirements"]
    assert requirement["aliveInstanceCount"] == requirement["targetInstanceCount"] == len(node_ids)
    assert {i["id"]["instanceId"] for i in rows["instances"]} == {
        n["details"]["instanceId"] for n in rows["nodes"]
    }
    assert {t["name"] for t in rows["compute-requirement-templates"]} >= {"process", "simulated"}
    assert {t["name"] for t in rows["compute-source-templates"]} >= {"local-process"}
    assert {n["namespace"] for n in rows["namespaces"]} >= {NAMESPACE, "local"}

    shown_ids = (pool_id, requirement_id, requirement["id"], tasks[0].id, template_id)
    shown = yd.run("show", *shown_ids)
    assert all(f'"id": "{entity_id}"' in shown for entity_id in shown_ids)

    yd.run("resize", "--yes", pool_id, "2")
    wait_for(
        lambda: client.worker_pool_client.get_worker_pool_by_id(pool_id).expectedNodeCount == 2,
        what="the pool resized to 2 nodes",
    )

    yd.run("resize", "--yes", "--compute-requirement", requirement["id"], "1")
    wait_for(
        lambda: client.worker_pool_client.get_worker_pool_by_id(pool_id).expectedNodeCount == 1,
        what="the compute requirement resized to 1 instance",
    )

    long_id = _id_in(yd.run("submit", config="long.toml"), "workreq")
    executing = TaskSearch(workRequirementId=long_id, statuses=[TaskStatus.EXECUTING])
    wait_for(lambda: len(client.work_client.get_tasks(executing).list_all()) == 2, timeout=60)
    assert "Aborted 2 of 2 Tasks" in yd.run("abort", "--yes")
    wait_for(lambda: len(client.work_client.get_tasks(executing).list_all()) == 1, timeout=60)
    yd.run("cancel", "--yes", "--abort")
    wait_for(
        lambda: (
            client.work_client.get_work_requirement_by_id(long_id).status
            == WorkRequirementStatus.CANCELLED
        ),
        timeout=30,
    )
    long_tasks = client.work_client.get_tasks(TaskSearch(workRequirementId=long_id)).list_all()
    assert [task.status for task in long_tasks] == [TaskStatus.ABORTED] * 3

    yd.run("shutdown", "--yes")
    pool = client.worker_pool_client.get_worker_pool_by_id(pool_id)
    assert pool.status.value in ("SHUTDOWN", "TERMINATED")


def test_searches_match_names_and_tags_partially_and_ignore_empty_values(
    platform: LocalPlatform,
) -> None:
    client = platform.client
    pools = [
        client.worker_pool_client.provision_worker_pool(
            ComputeRequirementTemplateUsage(
                templateId="local/simulated",
                requirementName=name,
                requirementNamespace="search-test",
                requirementTag=f"tag-{name}",
                targetInstanceCount=1,
            ),
            ProvisionedWorkerPoolProperties(createNodeWorkers=NodeWorkerTarget.per_node(1)),
        )
        for name in ("beta-pool", "alpha-pool", "gamma")
    ]
    try:
        search = platform.url + "/workerPools/"
        auth = {"Authorization": f"yd-key {platform.key_id}:{platform.key_secret}"}

        def names(url: str, **params: Any) -> list[str]:
            answer = requests.get(
                url, params={"namespaces": "search-test", **params}, headers=auth, timeout=30
            )
            answer.raise_for_status()
            return [item["name"] for item in answer.json()["items"]]

        assert names(search, name="pool") == ["beta-pool", "alpha-pool"]
        assert names(search, name="", tag="") == ["beta-pool", "alpha-pool", "gamma"]
        assert names(search, sortField="name") == ["alpha-pool", "beta-pool", "gamma"]
        assert names(search, sortField="name", sortDirection="DESCENDING") == [
            "gamma",
            "beta-pool",
            "alpha-pool",
        ]
        assert names(search, isHealthy="False") == []
        requirements = platform.url + "/compute/requirements"
        assert names(requirements, tag="alpha", summaries="true") == ["alpha-pool"]
        assert (
            client.worker_pool_client.get_worker_pools(
                WorkerPoolSearch(name="alpha", namespaces=["search-test"])
            )
            .list_all()[0]
            .name
            == "alpha-pool"
        )
    finally:
        for pool in pools:
            client.worker_pool_client.shutdown_worker_pool_by_id(pool.id)


def test_templates_namespaces_and_application_read_as_yellowdog_documents(
    platform: LocalPlatform,
) -> None:
    compute = platform.client.compute_client
    template = compute.get_compute_requirement_template_by_name("local", "process")
    assert template.id.startswith("ydid:crt:") and template.name == "process"
    assert compute.get_compute_requirement_template(template.id).id == template.id
    source = compute.get_compute_source_template(template.sources[0].sourceTemplateId)
    assert source.source.instanceType == platform.templates.get("local/process").instance_type
    summaries = compute.find_all_compute_requirement_templates()
    assert {(t.namespace, t.name) for t in summaries} >= {
        ("local", "process"),
        ("local", "simulated"),
    }
    details = platform.client.application_client.get_application_details()
    assert details.allNamespacesReadable and "local" in details.readableNamespaces


def test_yd_node_actions_compute_stop_start_restart_reprovision_instantiate_and_terminate(
    platform: LocalPlatform, yd: YdCli
) -> None:
    client, compute = platform.client, platform.client.compute_client
    pool_id = _id_in(yd.run("provision"), "wrkrpool")
    requirement_id = client.worker_pool_client.get_worker_pool_by_id(pool_id).computeRequirementId
    running = NodeSearch(workerPoolId=pool_id, statuses=[NodeStatus.RUNNING])

    def node_ids() -> list[str]:
        return [node.id for node in client.worker_pool_client.get_nodes(running).list_all()]

    def instances() -> list[InstanceStatus]:
        search = InstanceSearch(computeRequirementId=requirement_id)
        return [instance.status for instance in compute.get_instances(search).list_all()]

    def requirement_is(status: ComputeRequirementStatus) -> bool:
        return compute.get_compute_requirement_by_id(requirement_id).status == status

    [node_id] = wait_for(node_ids, timeout=60, what="the pool's node running")

    output = yd.run("nodeaction", "--yes", "--actions", "actions.json", "--node", node_id,
                    "--follow", "--timeout", "60")
    assert "All node action queues have finished" in output
    [copy] = (platform.data_dir / "nodes").glob("*/home/copy.txt")
    assert copy.read_text() == "hello from an action"
    [queue] = yd.json("nodeaction", "--status", "--node", node_id)
    assert (queue["nodeId"], queue["status"]) == (node_id, "EMPTY")

    work_id = _id_in(yd.run("submit", config="one.toml"), "workreq")
    executing = TaskSearch(workRequirementId=work_id, statuses=[TaskStatus.EXECUTING])
    wait_for(lambda: client.work_client.get_tasks(executing).list_all(), timeout=60)
    assert platform.live_entities()["processes"]
    yd.run("compute-stop", "--yes", requirement_id)
    wait_for(lambda: requirement_is(ComputeRequirementStatus.STOPPED), timeout=60)
    assert instances() == [InstanceStatus.STOPPED] and node_ids() == []
    assert platform.live_entities()["processes"] == []
    [task] = client.work_client.get_tasks(TaskSearch(workRequirementId=work_id)).list_all()
    assert (task.status, task.errors[-1].errorType) == (TaskStatus.FAILED, "ALLOCATION_LOST")

    yd.run("compute-start", "--yes", requirement_id)
    wait_for(lambda: requirement_is(ComputeRequirementStatus.RUNNING), timeout=60)
    assert instances() == [InstanceStatus.RUNNING] and node_ids() == [node_id]

    started = client.worker_pool_client.get_node_by_id(node_id).statusChangedTime
    yd.run("compute-restart", "--yes", node_id)
    wait_for(
        lambda: client.worker_pool_client.get_node_by_id(node_id).statusChangedTime > started
        and node_ids() == [node_id],
        timeout=60,
        what="the node back after its instance restarted",
    )

    platform.kill_node(node_id)
    wait_for(lambda: instances() == [InstanceStatus.TERMINATED], timeout=60)
    assert compute.get_compute_requirement_by_id(requirement_id).targetInstanceCount == 1
    yd.run("compute-reprovision", "--yes", requirement_id)
    [replacement] = wait_for(node_ids, timeout=60, what="the replacement node")
    assert replacement != node_id
    assert sorted(instances(), key=str) == [InstanceStatus.RUNNING, InstanceStatus.TERMINATED]

    bare_id = _id_in(yd.run("instantiate"), "compreq")
    bare = InstanceSearch(computeRequirementId=bare_id, statuses=[InstanceStatus.RUNNING])
    wait_for(lambda: compute.get_instances(bare).list_all(), timeout=60)
    report = yd.run("provision", "--report")
    assert "Reports are only available for Dynamic Templates" in report
    rows = {kind: yd.json("list", kind) for kind in ("worker-pools", "compute-requirements")}
    assert [p["id"] for p in rows["worker-pools"] if p["status"] not in FINISHED] == [pool_id]
    assert {r["id"] for r in rows["compute-requirements"] if r["status"] not in FINISHED} == {
        requirement_id,
        bare_id,
    }

    yd.run("terminate", "--yes")
    for entity_id in (requirement_id, bare_id):
        wait_for(
            lambda entity_id=entity_id: compute.get_compute_requirement_by_id(entity_id).status
            == ComputeRequirementStatus.TERMINATED,
            timeout=60,
        )


def test_compute_and_node_action_requests_yellowdog_refuses_are_refused(
    platform: LocalPlatform,
) -> None:
    client = platform.client
    pool = client.worker_pool_client.provision_worker_pool(
        ComputeRequirementTemplateUsage(
            templateId="local/simulated",
            requirementName="refusals",
            requirementNamespace="yd-cli-refusals",
            targetInstanceCount=1,
        ),
        ProvisionedWorkerPoolProperties(createNodeWorkers=NodeWorkerTarget.per_node(1)),
    )
    compute, pools = client.compute_client, client.worker_pool_client
    try:
        requirement_id = pool.computeRequirementId
        wait_for(lambda: pools.get_nodes(NodeSearch(workerPoolId=pool.id)).list_all())
        with pytest.raises(requests.HTTPError, match="InvalidComputeRequirementStatusException"):
            compute.start_compute_requirement_by_id(requirement_id)
        assert compute.stop_compute_requirement_by_id(requirement_id).status in (
            ComputeRequirementStatus.STOPPING,
            ComputeRequirementStatus.STOPPED,
        )
        with pytest.raises(requests.HTTPError, match="Invalid transition from STOPPED"):
            compute.reprovision_compute_requirement_by_id(requirement_id)
        compute.start_compute_requirement_by_id(requirement_id)
        [node] = wait_for(
            lambda: pools.get_nodes(
                NodeSearch(workerPoolId=pool.id, statuses=[NodeStatus.RUNNING])
            ).list_all()
        )
        pools.add_node_actions_by_id(
            pool.id, NodeCreateWorkersAction(totalWorkers=2), NodeRunCommandAction(path="true")
        )
        queue = pools.get_node_actions_by_id(node.id)
        assert queue.status == NodeActionQueueStatus.FAILED
        assert queue.failed.action == "CREATE_WORKERS" and len(queue.waiting) == 1
        with pytest.raises(InvalidRequestException, match="nodeIdFilter"):
            pools.add_node_actions_grouped_by_id(
                pool.id, [NodeActionGroup([NodeRunCommandAction(path="true")])], [node.id]
            )
        with pytest.raises(requests.HTTPError, match="404"):
            compute.test_compute_requirement_template(
                ComputeRequirementTemplateUsage(templateId="local/none", requirementName="x")
            )
    finally:
        pools.shutdown_worker_pool_by_id(pool.id)
