"""The cluster specification rejects bad input with the field and the reason, before anything is
provisioned, and serves as plain data (JSON schema, JSON round trip) for the Prefect blocks."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from prefect_raydog import scripts
from prefect_raydog.cluster import RayDogCluster
from prefect_raydog.spec import (
    LOCAL_IMAGE_VENV,
    LOCAL_NODE_ENVIRONMENT,
    LOCAL_SEALED_TEMPLATE,
    ClusterSpec,
    NodeGroupSpec,
    WorkerPoolSpec,
)

HEAD = {"template_id": "ns/head"}
AUTOSCALER_EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "autoscaler-local.yaml"


def _spec(**fields) -> ClusterSpec:
    return ClusterSpec(**{"name": "c", "namespace": "ns", "head": HEAD, **fields})


def _error(**fields) -> str:
    with pytest.raises(ValidationError) as failure:
        _spec(**fields)
    return str(failure.value)


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"name": "Upper"}, "name", "may contain only lower-case letters"),
        ({"name": "has space"}, "name", "may contain only"),
        ({"name": "x" * 37}, "name", "37 characters long; at most 36 allowed"),
        ({"name": ""}, "name", "must not be empty"),
        ({"namespace": "ns/x"}, "namespace", "may contain only"),
        ({"tag": "-x"}, "tag", "starting with a letter or digit"),
        ({"cluster_lifetime": timedelta(0)}, "cluster_lifetime", "must be positive"),
        ({"build_timeout": -5}, "build_timeout", "must be positive"),
        (
            {"idle_node_shutdown": timedelta(seconds=-1)},
            "idle_node_shutdown",
            "must not be negative",
        ),
        ({"head": {"template_id": " "}}, "head.template_id", "must name a compute requirement"),
        ({"head": {}}, "head.template_id", "Field required"),
        (
            {"worker_pools": [{"template_id": "t", "count": 0}]},
            "worker_pools.0.count",
            "greater than or equal to 1",
        ),
        (
            {"worker_pools": [{"template_id": "t", "count": 3, "max_count": 2}]},
            "worker_pools.0",
            "max_count (2) is below count (3)",
        ),
        (
            {"worker_pools": [{"template_id": "t", "min_count": 1}]},
            "worker_pools.0",
            "min_count needs max_count too",
        ),
        (
            {"worker_pools": [{"template_id": "t", "min_count": 3, "max_count": 2}]},
            "worker_pools.0",
            "max_count (2) is below min_count (3)",
        ),
        (
            {"worker_pools": [{"template_id": "t", "min_count": -1, "max_count": 2}]},
            "worker_pools.0.min_count",
            "greater than or equal to 0",
        ),
        (
            {"workers_to_join": 1,
             "worker_pools": [{"template_id": "t", "min_count": 0, "max_count": 2}]},
            "workers_to_join",
            "exceeds the 0 worker nodes",
        ),
        (
            {
                "worker_pools": [
                    {"template_id": "t", "name": "a"},
                    {"template_id": "t", "name": "a"},
                ]
            },
            "",
            "worker pool names must be unique; repeated: ['a']",
        ),
        (
            {"workers_to_join": 2, "worker_pools": [HEAD]},
            "",
            "workers_to_join (2) exceeds the 1 worker",
        ),
        ({"head": {"template_id": "t", "script": "x", "script_file": "/nope"}}, "head", "not both"),
        ({"head": {"template_id": "t", "script_file": "/nope"}}, "head", "is not a readable file"),
        ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
    ],
)
def test_bad_input_names_the_field_and_the_reason(fields, field, reason):
    message = _error(**fields)
    assert reason in message
    assert field.split(".")[0] in message


def test_the_longest_cluster_name_still_fits_every_derived_name():
    spec = _spec(name="x" * 36)
    cluster = RayDogCluster(spec, key_id="k", key_secret="s", url="http://127.0.0.1:9")
    assert len(f"{cluster.build_name}-observability-00") == 60


def test_scripts_come_from_text_a_file_or_the_package_defaults(tmp_path):
    script = tmp_path / "head.sh"
    script.write_text("#!/bin/bash\nray start --head --block\n")
    assert NodeGroupSpec(template_id="t", script="echo").script_text("head") == "echo"
    assert (
        NodeGroupSpec(template_id="t", script_file=script).script_text("head") == script.read_text()
    )
    default = NodeGroupSpec(template_id="t").script_text("worker")
    assert default == scripts.load("worker")


@pytest.mark.parametrize("name", ["head", "worker"])
def test_default_ray_scripts_follow_raydogs_rules(name):
    text = scripts.load(name)
    assert "--block" in text and "RAYDOG_VENV" in text
    # On the local platform the first process of its node's PID namespace; on YellowDog, a task
    # that stops Ray when aborted.
    assert "trap 'exit 143' TERM" in text and "--block &" in text
    assert text.rstrip().endswith(("wait $!", "wait $RAY_PID"))
    assert re.search(r"^trap .*ray stop.* EXIT$", text, re.MULTILINE)
    if "worker" in name:
        assert "RAY_HEAD_IP" in text


def test_the_local_autoscaler_example_tells_the_scripts_what_the_local_presets_do():
    example = yaml.safe_load(AUTOSCALER_EXAMPLE.read_text())
    # RAY_NUM_CPUS comes from each node type's resources; the venv is the sealed image's.
    expected = {k: v for k, v in LOCAL_NODE_ENVIRONMENT.items() if k != "RAY_NUM_CPUS"}
    assert example["provider"]["task_environment"] == {
        "RAYDOG_VENV": LOCAL_IMAGE_VENV, **expected}
    node_types = example["available_node_types"].values()
    assert {t["node_config"]["compute_requirement_template"] for t in node_types} == {
        LOCAL_SEALED_TEMPLATE}


def test_an_unknown_script_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="No script named 'nope'; the package ships .*'head'"):
        scripts.load("nope")


def test_the_spec_is_plain_data_with_a_json_schema_for_forms():
    spec = _spec(worker_pools=[WorkerPoolSpec(template_id="t", count=2)], tag="t1")
    assert ClusterSpec.model_validate_json(spec.model_dump_json()) == spec
    schema = ClusterSpec.model_json_schema()
    for name, field in schema["properties"].items():
        assert field.get("title") and field.get("description", "").endswith("."), name
    json.dumps(schema)


def test_errors_survive_pickling_with_what_was_cleaned_up():
    import pickle

    from prefect_raydog.errors import ClusterBuildTimeout, ClusterShutdownError

    error = ClusterBuildTimeout("The head node did not start", ["pool a"], ["pool b"])
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ClusterBuildTimeout and str(copy) == str(error)
    assert copy.cleaned_up == ["pool a"] and copy.not_cleaned_up == ["pool b"]
    shutdown = pickle.loads(pickle.dumps(ClusterShutdownError("left: x", ["x"])))
    assert shutdown.not_ended == ["x"] and str(shutdown) == "left: x"


def test_a_range_makes_an_adaptive_pool_that_starts_at_its_minimum():
    ranged = WorkerPoolSpec(template_id="t", count=5, min_count=0, max_count=3)
    fixed = WorkerPoolSpec(template_id="t", count=2)
    assert (ranged.adaptive, ranged.start_count, ranged.floor, ranged.node_limit) == (True, 0, 0, 3)
    assert (fixed.adaptive, fixed.start_count, fixed.floor, fixed.node_limit) == (False, 2, 1, 2)
