"""The YellowDogCredentials and RayDogClusterConfig blocks: UI standards, validation, secrets."""

from __future__ import annotations

import base64
import gc
import json
import pickle
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import SecretStr

import prefect_raydog.blocks as blocks_module
from prefect_raydog.blocks import RayDogClusterConfig, YellowDogCredentials
from prefect_raydog.runner.settings import UNSAVED_CONFIGS
from prefect_raydog.spec import NodeGroupSpec, WorkerPoolSpec
from prefect_raydog.task_runners import RayDogTaskRunner

SECRET = "s3cr3t-value-never-shown"


def _config(**overrides) -> RayDogClusterConfig:
    fields = dict(
        credentials=YellowDogCredentials(api_key_id="key", api_key_secret=SecretStr(SECRET)),
        namespace="team-a",
        head=NodeGroupSpec(template_id="yd-demo/rayhead"),
        worker_pools=[WorkerPoolSpec(template_id="yd-demo/rayworker", name="cpu", count=2)],
    )
    return RayDogClusterConfig(**{**fields, **overrides})


@pytest.mark.parametrize("block", [YellowDogCredentials, RayDogClusterConfig])
class TestBlocksMeetPrefectStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self, block: type[Block]) -> type[Block]:
        return block

    def test_has_a_valid_image(self, block: type[Block]) -> None:
        """Prefect's check fetches the logo from the internet; these blocks have none on purpose,
        so the UI shows its own block icon offline (tests/test_ui_blocks.py sees it fetch nothing).
        """
        assert block._logo_url is None


def test_blocks_are_attributes_of_the_module_for_block_register():
    found = {name for name in dir(blocks_module)
             if isinstance(getattr(blocks_module, name), type)
             and issubclass(getattr(blocks_module, name), Block)}
    assert {"YellowDogCredentials", "RayDogClusterConfig"} <= found


def test_secret_is_a_password_field_in_the_ui_schema():
    schema = RayDogClusterConfig.model_json_schema()
    creds = YellowDogCredentials.model_json_schema()
    secret = creds["properties"]["api_key_secret"]
    assert (secret["type"], secret["format"], secret["writeOnly"]) == ("string", "password", True)
    assert "anyOf" not in secret
    assert "credentials.api_key_secret" in schema["secret_fields"]
    assert "ssh_private_key" in schema["secret_fields"]


def test_ui_schema_names_fields_and_has_no_needless_switches():
    schema = RayDogClusterConfig.model_json_schema()
    properties = schema["properties"]
    assert properties["head"]["title"] == "Head node" and "properties" in properties["head"]
    pool = properties["worker_pools"]["items"]["properties"]
    assert "script_file" not in pool and "script_file" not in properties["head"]["properties"]
    scalars = [field for field in [*properties.values(), *pool.values()] if "$ref" not in field]
    switches = {field["title"] for field in scalars if "anyOf" in field}
    assert switches == {"Idle node shutdown (seconds)", "Idle pool shutdown (seconds)"}, (
        "a switch only where null means something other than empty (never)"
    )
    never = properties["idle_node_shutdown"]["anyOf"][1]
    assert (never["title"], never["enum"]) == ("Never", ["never"])
    observability = properties["observability"]
    assert observability["type"] == "object" and "required" not in observability
    assert '"null"' not in json.dumps(schema), "the UI shows a null type as 'Property is type None'"
    lifetime = properties["cluster_lifetime"]
    assert (lifetime["format"], lifetime["default"]) == ("time-delta", "3600")
    credentials = schema["definitions"]["YellowDogCredentials"]
    assert credentials["title"] == "YellowDog credentials"


def test_durations_from_the_ui_are_seconds():
    config = RayDogClusterConfig(
        head={"template_id": "t"}, cluster_lifetime="5400", idle_node_shutdown="90.5"
    )
    assert config.cluster_lifetime == timedelta(minutes=90)
    assert config.idle_node_shutdown == timedelta(seconds=90.5)
    assert config.model_dump(mode="json")["cluster_lifetime"] == 5400.0


def test_never_and_an_empty_observability_form_from_the_ui_are_none():
    config = RayDogClusterConfig(
        head={"template_id": "t"}, idle_pool_shutdown="never",
        observability={"template_id": "", "environment": {}},
    )
    assert config.idle_pool_shutdown is None and config.observability is None
    saved = config.model_dump(mode="json")
    assert (saved["idle_pool_shutdown"], saved["idle_node_shutdown"]) == ("never", 180.0)
    assert RayDogClusterConfig.model_validate(saved).idle_pool_shutdown is None
    with pytest.raises(ValueError, match="observability.template_id"):
        RayDogClusterConfig(head={"template_id": "t"}, observability={"images_id": "i"})


def test_credentials_fall_back_to_the_environment(monkeypatch):
    monkeypatch.setenv("YD_API_KEY_ID", "env-id")
    monkeypatch.setenv("YD_API_KEY_SECRET", "env-secret")
    monkeypatch.setenv("YD_API_URL", "http://127.0.0.1:9")
    creds = YellowDogCredentials()
    key_id, secret = creds.resolved_key()
    assert (key_id, secret.get_secret_value()) == ("env-id", "env-secret")
    assert creds.resolved_api_url() == "http://127.0.0.1:9"
    assert creds.get_client() is not None


def test_missing_credentials_name_the_fields(monkeypatch):
    monkeypatch.delenv("YD_API_KEY_ID", raising=False)
    monkeypatch.delenv("YD_API_KEY_SECRET", raising=False)
    with pytest.raises(ValueError, match="api_key_id and api_key_secret"):
        YellowDogCredentials().get_client()


def test_secret_never_appears_in_repr_or_dumps():
    config = _config()
    assert SECRET not in repr(config)
    assert SECRET not in str(config.model_dump())
    assert SECRET not in config.model_dump_json()


def test_config_becomes_a_builder_spec():
    spec = _config(tag="nightly").to_spec("raydog-1234abcd")
    assert spec.name == "raydog-1234abcd"
    assert spec.namespace == "team-a"
    assert spec.tag == "nightly"
    assert spec.worker_pools[0].name == "cpu"
    assert spec.cluster_lifetime == timedelta(hours=1)


def test_cluster_names_are_unique_per_run_and_valid():
    config = _config()
    first, second = config.cluster_name(), config.cluster_name()
    assert first != second
    assert first.startswith("raydog-")
    config.to_spec(first)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"namespace": "Bad Namespace"}, "namespace"),
        ({"cluster_name_prefix": "x" * 60}, "cluster_name_prefix"),
        ({"workers_to_join": 5}, "workers_to_join"),
        ({"cluster_lifetime": timedelta(0)}, "cluster_lifetime"),
        ({"ssh_tunnel": True}, "ssh_known_hosts: required when ssh_tunnel is on"),
        ({"ssh_tunnel": True, "ssh_trust_first_use": True, "worker_pools": [WorkerPoolSpec(
            template_id="yd-demo/rayworker", userdata="#cloud-config\npackages: [git]\n")]},
         r"worker_pools\[0\].userdata: not a shell script \(no #! line\), so the SSH key made"),
        ({"ssh_tunnel": True, "ssh_private_key": "KEY"},
         "ssh_known_hosts: required when ssh_tunnel is on"),
        ({"ssh_known_hosts": "10.0.0.* ssh-ed25519 not-base64"},
         "ssh_known_hosts: line 1: the key is not valid base64"),
    ],
)
def test_bad_input_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        _config(**overrides)


def test_a_tunnel_checks_the_pinned_host_keys_or_trusts_first_use_when_asked(tmp_path):
    key = tmp_path / "host"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    public = Path(f"{key}.pub").read_text()
    tunnel = {"ssh_tunnel": True, "ssh_private_key": "KEY"}
    pinned = _config(**tunnel, ssh_known_hosts=public).host_keys()
    assert (pinned.trust_first_use, pinned.source) == (False, "ssh_known_hosts")
    pinned.check("10.1.2.3", base64.b64decode(public.split()[1]))  # a .pub line: any address
    assert _config(**tunnel, ssh_trust_first_use=True).host_keys().trust_first_use


def test_a_tunnel_without_a_key_gets_one_per_cluster_authorized_first_in_each_userdata():
    config = _config(ssh_tunnel=True, ssh_trust_first_use=True, worker_pools=[WorkerPoolSpec(
        template_id="yd-demo/rayworker", userdata="#!/bin/bash\nset -e\necho mine\n")])
    first, second = config.ssh_login(), config.ssh_login()
    assert first.private_key.get_secret_value() != second.private_key.get_secret_value()
    key = first.key()
    public = f"{key.get_name()} {key.get_base64()} raydog"
    for userdata in (first.authorizing(None), first.authorizing("#!/bin/bash\nset -e\n")):
        assert userdata.startswith("#!/bin/bash\n# RayDog: the SSH key made for this cluster")
        assert public in userdata.splitlines()
    assert first.authorizing("#!/bin/bash\nset -e\n").endswith("\nset -e\n")
    keyed = _config(ssh_tunnel=True, ssh_trust_first_use=True, ssh_private_key="KEY")
    assert keyed.ssh_login().authorizing("#!/bin/bash\n") == "#!/bin/bash\n"


@pytest.mark.parametrize("overrides", [{"cluster_lifetime": timedelta(0)}, {"ssh_tunnel": True}])
def test_validation_errors_never_show_a_plain_secret(overrides):
    fields = {**_config().model_dump(), **overrides}
    fields["credentials"] = {"api_key_id": "key", "api_key_secret": "plain-secret-value"}
    with pytest.raises(ValueError) as raised:
        RayDogClusterConfig(**fields)
    assert "plain-secret-value" not in str(raised.value)


def test_saved_config_loads_with_nested_credentials(prefect_api):
    _config().save("team-a-cluster", overwrite=True)
    loaded = RayDogClusterConfig.load("team-a-cluster")
    assert loaded.credentials.api_key_secret.get_secret_value() == SECRET
    assert loaded.worker_pools[0].count == 2


def test_runner_keeps_a_saved_block_by_name_and_never_pickles_its_secret(prefect_api):
    _config().save("named-cluster", overwrite=True)
    loaded = RayDogClusterConfig.load("named-cluster")
    runner = RayDogTaskRunner(cluster=loaded)
    assert runner.cluster == "named-cluster"
    assert SECRET.encode() not in pickle.dumps(runner)


def test_runner_keeps_an_unsaved_block_out_of_its_pickle():
    runner = RayDogTaskRunner(cluster=_config())
    assert runner.cluster.startswith("unsaved:")
    assert SECRET.encode() not in pickle.dumps(runner)
    assert runner.duplicate() == runner


def test_an_unsaved_block_is_let_go_with_the_last_runner_that_refers_to_it():
    runner = RayDogTaskRunner(cluster=_config())
    token, duplicate = runner.cluster, runner.duplicate()
    del runner
    gc.collect()
    assert UNSAVED_CONFIGS[token].credentials.api_key_secret.get_secret_value() == SECRET
    del duplicate
    gc.collect()
    assert token not in UNSAVED_CONFIGS
