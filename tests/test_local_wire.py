"""The JSON the local platform serves has the shape of YellowDog's own documents (the example
files in tests/data/yellowdog-examples): the same keys, `type` discriminators, millisecond UTC
datetimes and ISO-8601 durations; and searches never hand out an empty page with a next slice."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import wait_for

from prefect_raydog.local import LocalPlatform

EXAMPLES = Path(__file__).parent / "data" / "yellowdog-examples"
DATETIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
NOT_EMITTED = {"createdById", "nextStatus", "subregion"}
"""Example keys the local platform leaves out: no user account, no pending transition, no
availability zones."""


class Raw:
    """Plain HTTP against the platform, to see the JSON exactly as served."""

    def __init__(self, platform: LocalPlatform) -> None:
        self.url = platform.url
        self.headers = {"Authorization": f"yd-key {platform.key_id}:{platform.key_secret}"}

    def __call__(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        response = requests.request(
            method, self.url + path, json=body, params=params, headers=self.headers, timeout=10
        )
        response.raise_for_status()
        return response.json() if response.content else None


def example(name: str) -> dict[str, Any]:
    document = json.loads((EXAMPLES / name).read_text())
    return document["items"][0] if "items" in document else document


def assert_same_keys(served: dict[str, Any], name: str) -> None:
    missing = set(example(name)) - set(served) - NOT_EMITTED
    assert not missing, f"{name}: served JSON lacks {sorted(missing)}"


def datetimes(document: Any) -> list[str]:
    if isinstance(document, dict):
        return [
            v
            for k, value in document.items()
            for v in (
                [value] if k.endswith("Time") and isinstance(value, str) else datetimes(value)
            )
        ]
    if isinstance(document, list):
        return [v for item in document for v in datetimes(item)]
    return []


@pytest.fixture
def raw(platform: LocalPlatform) -> Raw:
    return Raw(platform)


def test_served_documents_have_the_example_keys_and_formats(raw: Raw) -> None:
    provision = json.loads((EXAMPLES / "provision_request.json").read_text())
    provision["requirementTemplateUsage"]["templateId"] = "local/simulated"
    pool = raw("POST", "/workerPools/provisioned/template", provision)
    submitted = json.loads((EXAMPLES / "work_requirement_submitted.json").read_text())
    requirement = raw("POST", "/work/requirements", submitted)
    try:
        tasks = json.loads((EXAMPLES / "tasks_submitted.json").read_text())
        group_id = requirement["taskGroups"][0]["id"]
        task = raw("POST", f"/work/taskGroups/{group_id}/tasks", tasks)[0]
        task = wait_for(
            lambda: (t := raw("GET", f"/work/tasks/{task['id']}"))["status"] == "EXECUTING" and t
        )
        served = {
            "task_returned.json": task,
            "node.json": raw("GET", f"/workerPools/nodes/{task['nodeId']}"),
            "provisioned_worker_pool.json": raw("GET", f"/workerPools/{pool['id']}"),
            "compute_requirement.json": raw(
                "GET", f"/compute/requirements/{pool['computeRequirementId']}"
            ),
            "work_requirement_returned.json": raw("GET", f"/work/requirements/{requirement['id']}"),
            "instance_slice.json": raw(
                "GET", "/compute/instances", computeRequirementId=pool["computeRequirementId"]
            )["items"][0],
            "work_requirement_summary_slice.json": raw(
                "GET", "/work/requirements", namespace="ns-ray", sliced="true"
            )["items"][0],
            "worker_pool_summary_slice.json": raw(
                "GET", "/workerPools/", namespace="ns-ray", sliced="true"
            )["items"][0],
            "task_slice.json": raw("GET", "/work/tasks", taskGroupId=group_id)["items"][0],
            "node_slice.json": raw("GET", "/workerPools/nodes", workerPoolId=pool["id"])["items"][
                0
            ],
        }
        for name, document in served.items():
            assert_same_keys(document, name)
            assert all(DATETIME.match(value) for value in datetimes(document)), name
        assert served["provisioned_worker_pool.json"]["type"].endswith(".ProvisionedWorkerPool")
        assert served["instance_slice.json"]["type"].endswith(".SimulatorInstance")
        strategy = served["compute_requirement.json"]["provisionStrategy"]
        assert strategy["type"].endswith(".SingleSourceProvisionStrategy")
        assert strategy["sources"][0]["type"].endswith(".SimulatorComputeSource")
        groups = served["work_requirement_returned.json"]["taskGroups"]
        assert groups[0]["runSpecification"]["taskTimeout"] == "PT10M"
        assert list(groups[0]["taskSummary"]["statusCounts"]) == ["EXECUTING"]
        assert None not in served["node.json"]["details"].values()
    finally:
        raw("PUT", f"/work/requirements/{requirement['id']}/transition/CANCELLING", abort="True")
        raw("DELETE", f"/workerPools/{pool['id']}")


def test_error_bodies_put_error_type_first(raw: Raw, platform: LocalPlatform) -> None:
    response = requests.post(
        f"{platform.url}/workerPools/provisioned/template",
        json={"requirementTemplateUsage": {"templateId": "a/b", "requirementName": "x"}},
        headers=raw.headers,
        timeout=10,
    )
    assert response.status_code == 400
    assert response.text.startswith('{"errorType":"InvalidRequestException"')
    missing = requests.get(
        f"{platform.url}/work/tasks/ydid:task:000000:none:1:1", headers=raw.headers, timeout=10
    )
    assert missing.status_code == 404 and "errorType" not in missing.json()


def test_an_empty_search_has_no_next_slice(raw: Raw) -> None:
    for path in (
        "/work/requirements",
        "/work/tasks",
        "/workerPools",
        "/workerPools/nodes",
        "/compute/instances",
        "/compute/requirements",
    ):
        page = raw(
            "GET",
            path,
            namespace="nothing-here",
            workerPoolId="none",
            computeRequirementId="none",
            workRequirementId="none",
        )
        assert page == {"items": [], "nextSliceId": None}, path


def test_an_empty_task_list_body_adds_no_tasks(raw: Raw) -> None:
    requirement = raw(
        "POST",
        "/work/requirements",
        {
            "namespace": "wire",
            "name": "empty-body",
            "taskGroups": [{"name": "g", "runSpecification": {"taskTypes": ["bash"]}}],
        },
    )
    group_id = requirement["taskGroups"][0]["id"]
    try:
        assert raw("POST", f"/work/taskGroups/{group_id}/tasks") == []
    finally:
        raw("PUT", f"/work/requirements/{requirement['id']}/transition/CANCELLING", abort="False")


def test_duplicate_live_work_requirement_name_is_refused(raw: Raw, platform) -> None:
    body = {"namespace": "wire", "name": "twice"}
    first = raw("POST", "/work/requirements", body)
    try:
        with pytest.raises(requests.HTTPError) as error:
            raw("POST", "/work/requirements", body)
        assert error.value.response.json()["errorType"] == "InvalidRequestException"
        assert "already exists" in error.value.response.json()["message"]
    finally:
        raw("PUT", f"/work/requirements/{first['id']}/transition/CANCELLING", abort="False")
    second = raw("POST", "/work/requirements", body)
    raw("PUT", f"/work/requirements/{second['id']}/transition/CANCELLING", abort="False")


def test_gzip_request_bodies_are_read_and_bad_bodies_refused(
    raw: Raw, platform: LocalPlatform
) -> None:
    body = json.dumps({"namespace": "wire", "name": "gzipped", "tag": "x" * 3000}).encode()
    headers = {**raw.headers, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    response = requests.post(
        f"{platform.url}/work/requirements", data=gzip.compress(body), headers=headers, timeout=10
    )
    assert response.status_code == 200 and response.json()["tag"] == "x" * 3000
    raw("PUT", f"/work/requirements/{response.json()['id']}/transition/CANCELLING", abort="False")
    for data in (b"{not json", b"not gzip at all"):
        bad = requests.post(
            f"{platform.url}/work/requirements", data=data, headers=headers, timeout=10
        )
        assert bad.status_code == 400 and bad.json()["errorType"] == "InvalidRequestException"
