"""Compute requirement templates: the built-in ones, more from a TOML file (boot delay, boot
failure rate, instance type), clear errors for bad files, and process templates refused with
the reason when no node runner is available."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import assert_nothing_left, wait_for
from yellowdog_client.model import (
    ComputeRequirementTemplateUsage,
    InstanceSearch,
    ProvisionedWorkerPoolProperties,
    WorkerPoolStatus,
)

from prefect_raydog.local import LocalPlatform, NodeMode
from prefect_raydog.local.nodes import NodeImage
from prefect_raydog.local.state import InvalidRequest, PlatformState
from prefect_raydog.local.templates import TemplateCatalogue, TemplateError

TEMPLATES = """
[templates."yd-demo/slow"]
mode = "simulated"
instance_type = "sim.large"
vcpus = 8
memory_gb = 32
boot_delay_s = 2.0

[templates."yd-demo/broken"]
boot_failure_rate = 1.0
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "templates.toml"
    path.write_text(text)
    return path


def test_built_in_templates() -> None:
    catalogue = TemplateCatalogue()
    assert catalogue.get("local/process").mode is NodeMode.PROCESS
    assert catalogue.get("local/simulated").mode is NodeMode.SIMULATED
    with pytest.raises(TemplateError, match="Unknown compute requirement template 'x/y'"):
        catalogue.get("x/y")


def test_templates_file_is_read(tmp_path: Path) -> None:
    catalogue = TemplateCatalogue(write(tmp_path, TEMPLATES))
    slow = catalogue.get("yd-demo/slow")
    assert (slow.instance_type, slow.vcpus, slow.memory_gb, slow.boot_delay_s) == (
        "sim.large",
        8,
        32,
        2.0,
    )
    assert catalogue.get("yd-demo/broken").boot_failure_rate == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[templates."nons"]\n', "must be 'namespace/name'"),
        ('[templates."a/b"]\nmode = "vm"\n', "field 'mode'"),
        ('[templates."a/b"]\nvcpus = "many"\n', "field 'vcpus'"),
        ('[templates."a/b"]\ncolour = 1\n', "unknown field"),
        ('[templates."a/b"]\nboot_failure_rate = 2\n', "boot_failure_rate"),
        ('[templates."a/b"]\nmode = "process"\nimage = "ubuntu"\n', "'image' must be one of"),
        ('[templates."a/b"]\nimage = "driver"\n', "'image' needs mode 'process'"),
        ('[templates."a/b"]\nmode = "process"\nimage_packages = ["x"]\n', "needs field 'image'"),
        (
            '[templates."a/b"]\nmode = "process"\nimage = "driver"\nimage_packages = ["x=="]\n',
            "'image_packages' must be a list of requirements, not 'x=='",
        ),
    ],
)
def test_bad_templates_file_names_the_template_and_field(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(TemplateError, match=message):
        TemplateCatalogue(write(tmp_path, text))


def test_a_file_template_with_an_image_gets_its_packages_on_top_of_the_drivers(
    tmp_path: Path,
) -> None:
    text = '[templates."a/vm"]\nmode = "process"\nimage = "driver"\nimage_packages = ["numpy"]\n'
    catalogue = TemplateCatalogue(write(tmp_path, text))
    assert catalogue.get("a/vm").image == NodeImage(packages=("numpy",))
    assert catalogue.get("local/vm").image == NodeImage()
    assert catalogue.get("local/process").image is None


def test_boot_delay_and_boot_failure_rate_of_file_templates(tmp_path: Path) -> None:
    with LocalPlatform(templates=write(tmp_path, TEMPLATES)) as platform:
        pools = platform.make_client().worker_pool_client
        compute = platform.make_client().compute_client

        def provision(template: str):
            return pools.provision_worker_pool(
                ComputeRequirementTemplateUsage(
                    templateId=template,
                    requirementName=template[8:],
                    requirementNamespace="t",
                    targetInstanceCount=2,
                ),
                ProvisionedWorkerPoolProperties(maxNodes=2),
            )

        # Measured from before the request, so a slow machine can only lengthen it.
        started = time.monotonic()
        slow = provision("yd-demo/slow")
        assert pools.get_worker_pool_by_id(slow.id).status == WorkerPoolStatus.PENDING
        broken = provision("yd-demo/broken")
        wait_for(lambda: pools.get_worker_pool_by_id(slow.id).status == WorkerPoolStatus.IDLE)
        assert time.monotonic() - started >= 2.0
        instances = compute.get_instances(
            InstanceSearch(computeRequirementId=broken.computeRequirementId)
        ).list_all()
        assert [i.status.name for i in instances] == ["TERMINATED", "TERMINATED"]
        assert instances[0].instanceType is not None
        assert pools.get_worker_pool_by_id(broken.id).status == WorkerPoolStatus.EMPTY
        for pool in (slow, broken):
            pools.shutdown_worker_pool_by_id(pool.id)
        assert_nothing_left(platform)


def test_process_template_without_a_runner_is_refused_with_the_reason() -> None:
    state = PlatformState(
        TemplateCatalogue(), runner=None, runner_unavailable="unshare is not permitted here"
    )
    request = {
        "requirementTemplateUsage": {
            "templateId": "local/process",
            "requirementName": "p",
            "targetInstanceCount": 1,
        }
    }
    with pytest.raises(InvalidRequest, match="unavailable here: unshare is not permitted here"):
        state.provision_worker_pool(request)
    assert state.live_entities()["workerPools"] == []
