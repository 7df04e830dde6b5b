"""The `prefect-raydog` cluster commands (up, status, down, sweep) run against a real local
platform with simulated nodes, through typer's CliRunner."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import NAMESPACE, SIMULATED, unique_name
from typer.testing import CliRunner, Result

from prefect_raydog import cli
from prefect_raydog.cli import app
from prefect_raydog.cluster import sweep
from prefect_raydog.local import LocalPlatform

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console() -> Iterator[None]:
    """A terminal wide enough that table cells keep cluster names whole."""
    width, cli.console.width = cli.console.width, 200
    yield
    cli.console.width = width


@pytest.fixture
def tag(platform: LocalPlatform) -> Iterator[str]:
    """A tag unique to the test; whatever a failing test left with it is swept afterwards."""
    tag = unique_name("cli")
    yield tag
    sweep(platform.client, NAMESPACE, tag, everything=True)


def invoke(platform: LocalPlatform, *args: str, input: str | None = None) -> Result:
    env = {
        "YD_API_KEY_ID": platform.key_id,
        "YD_API_KEY_SECRET": platform.key_secret,
        "YD_API_URL": platform.url,
    }
    result = runner.invoke(app, list(args), env=env, input=input)
    assert platform.key_secret not in result.output
    return result


def write_spec(tmp_path: Path, tag: str | None = None, **overrides: object) -> tuple[Path, str]:
    name = unique_name("cli")
    node = {"template_id": SIMULATED, "script": "sleep infinity"}
    spec = {
        "name": name,
        "namespace": NAMESPACE,
        "tag": tag,
        "head": node,
        "worker_pools": [{**node, "name": "cpu", "count": 2}],
        **overrides,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path, name


def test_up_status_down(platform: LocalPlatform, tmp_path: Path, tag: str) -> None:
    spec, name = write_spec(tmp_path, tag=tag)
    state = tmp_path / "state.json"
    up = invoke(platform, "up", str(spec), "--state-file", str(state))
    assert up.exit_code == 0, up.output
    assert "head private IP" in up.output and state.is_file()

    status = invoke(platform, "status", "--namespace", NAMESPACE, "--tag", tag)
    assert status.exit_code == 0, status.output
    assert name in status.output and re.search(rf"{name}-[0-9a-f]{{6}}-01-wrkrs", status.output)

    down = invoke(platform, "down", str(state))
    assert down.exit_code == 0, down.output
    assert "ended:" in down.output and "work requirement" in down.output

    after = invoke(platform, "status", "--namespace", NAMESPACE, "--tag", tag)
    assert name not in after.output and "No live clusters" in after.output


def test_sweep_all_ends_every_tagged_cluster(
    platform: LocalPlatform, tmp_path: Path, tag: str
) -> None:
    names = []
    for state in ("a.json", "b.json"):
        spec, name = write_spec(tmp_path, tag=tag)
        names.append(name)
        up = invoke(platform, "up", str(spec), "--state-file", str(tmp_path / state))
        assert up.exit_code == 0, up.output

    refused = invoke(platform, "sweep", "--namespace", NAMESPACE, "--tag", tag, input="n\n")
    assert refused.exit_code != 0
    assert all(
        name in invoke(platform, "status", "--namespace", NAMESPACE).output for name in names
    )

    spared = invoke(platform, "sweep", "--namespace", NAMESPACE, "--tag", tag, "--yes")
    assert spared.exit_code == 0 and "nothing to end" in spared.output, spared.output
    swept = invoke(platform, "sweep", "--namespace", NAMESPACE, "--tag", tag, "--all", "--yes")
    assert swept.exit_code == 0, swept.output
    assert all(name in swept.output for name in names)
    assert (
        "No live clusters"
        in invoke(platform, "status", "--namespace", NAMESPACE, "--tag", tag).output
    )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"worker_pools": [{"template_id": SIMULATED, "count": 0}]}, "worker_pools.0.count"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_spec_exits_2_naming_the_field(
    platform: LocalPlatform, tmp_path: Path, overrides: dict, field: str
) -> None:
    spec, _ = write_spec(tmp_path, **overrides)
    result = invoke(platform, "up", str(spec))
    assert result.exit_code == 2, result.output
    assert f"Invalid spec: {field}:" in result.output
    assert "Traceback" not in result.output
    assert platform.api_calls() == {}, "nothing may reach the platform"


def test_expected_errors_are_one_line(platform: LocalPlatform, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{not json")
    result = invoke(platform, "down", str(state))
    assert result.exit_code == 1
    assert result.output.startswith("Error: Saved cluster state is not JSON")
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("command", ["up", "down", "status", "sweep"])
def test_help_shows_no_secret(platform: LocalPlatform, command: str) -> None:
    result = invoke(platform, command, "--help")
    assert result.exit_code == 0 and "YD_API_KEY_SECRET" in result.output
    assert "--key-secret" not in result.output


def test_up_saves_the_state_before_it_provisions_anything(
    platform: LocalPlatform, tmp_path: Path, tag: str
) -> None:
    spec, name = write_spec(tmp_path, tag=tag, head={"template_id": "no/such-template"})
    state = tmp_path / "state.json"
    up = invoke(platform, "up", str(spec), "--state-file", str(state))
    assert up.exit_code == 1 and "Traceback" not in up.output
    assert up.output.strip().startswith("Error: ") and "no/such-template" in up.output
    saved = json.loads(state.read_text())
    assert saved["cluster_name"] == name and saved["work_requirement_id"] is None
    assert re.fullmatch(rf"{name}-[0-9a-f]{{6}}", saved["build_name"])
    down = invoke(platform, "down", str(state))
    assert down.exit_code == 0, down.output


def test_up_shows_progress_and_ray_addresses(platform: LocalPlatform, tmp_path: Path) -> None:
    spec, name = write_spec(tmp_path, workers_to_join=2)
    state = tmp_path / "state.json"
    up = invoke(platform, "up", str(spec), "--state-file", str(state))
    assert up.exit_code == 0, up.output
    for step in ("provisioning the worker pools", "starting the head node",
                 "waiting for the worker nodes"):
        assert f"done {step} (" in up.output
    assert "observability" not in up.output and "done built" not in up.output
    assert "Ray Client:      ray://" in up.output and ":10001" in up.output
    assert "Ray dashboard:   http://127.0.0.1:8265 on the head" in up.output
    assert "From outside:" not in up.output  # simulated nodes have one address
    status = invoke(platform, "status", "--namespace", NAMESPACE)
    assert status.exit_code == 0 and "EXECUTING" in status.output and "task-00001" in status.output
    assert invoke(platform, "down", str(state)).exit_code == 0


def test_secret_comes_from_a_hidden_prompt(platform: LocalPlatform) -> None:
    env = {"YD_API_KEY_ID": platform.key_id, "YD_API_URL": platform.url, "YD_API_KEY_SECRET": ""}
    args = ["status", "--namespace", NAMESPACE]
    result = runner.invoke(app, args, env=env, input=f"{platform.key_secret}\n")
    assert result.exit_code == 0, result.output
    assert platform.key_secret not in result.output
    refused = runner.invoke(app, [*args, "--key-secret", platform.key_secret], env=env)
    assert refused.exit_code == 2 and "No such option" in refused.output


def assert_one_line_error(result: Result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"Error: {message}") and "Traceback" not in result.output
    assert result.output.count("\n") == 1, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["up", "--colour", "blue"], "No such option: --colour"),
        (["down"], "Missing argument 'state_file'"),
        (["status"], "Missing option '--namespace'"),
        (["local", "start", "--port", "x"], "Invalid value for '--port'"),
        (["local", "start", "--network", "wifi"], "Invalid value for '--network'"),
        (["local", "start", "--templates", "/no/such.toml"], "Invalid value for '--templates'"),
        (["bogus"], "No such command 'bogus'"),
    ],
)
def test_usage_mistakes_are_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert_one_line_error(result, message)
    assert result.output.rstrip().endswith(" --help'."), "where to read the usage"


def test_up_needs_a_spec_or_a_block(platform: LocalPlatform, tmp_path: Path) -> None:
    assert_one_line_error(invoke(platform, "up"), "give either a spec file or --config")
    spec, _ = write_spec(tmp_path)
    both = invoke(platform, "up", str(spec), "--config", "cli-block")
    assert_one_line_error(both, "give either a spec file or --config")
    assert platform.api_calls() == {}


def test_missing_files_are_one_line(platform: LocalPlatform, tmp_path: Path) -> None:
    assert_one_line_error(invoke(platform, "up", str(tmp_path / "nope.yaml")), "cannot read")
    assert_one_line_error(invoke(platform, "down", str(tmp_path / "nope.json")), "no state file")


def test_up_from_a_saved_block(
    prefect_api: str, platform: LocalPlatform, tmp_path: Path, tag: str
) -> None:
    from prefect_raydog import RayDogClusterConfig

    config = RayDogClusterConfig.local(platform.url, platform.key_id, platform.key_secret)
    node = {"template_id": SIMULATED, "script": "sleep infinity"}
    config = config.model_copy(update={
        "namespace": NAMESPACE, "tag": tag, "workers_to_join": 0,
        "head": config.head.model_copy(update=node),
        "worker_pools": [config.worker_pools[0].model_copy(update={**node, "count": 1})],
    })
    config.save("cli-block", overwrite=True)
    state = tmp_path / "state.json"
    env = {"YD_API_KEY_ID": "", "YD_API_KEY_SECRET": "", "YD_API_URL": ""}
    config.model_copy(update={"ssh_tunnel": True, "ssh_trust_first_use": True}).save(
        "cli-keyless-block", overwrite=True)
    missing = runner.invoke(app, ["up", "--config", "no-such-block"], env=env)
    keyless = runner.invoke(app, ["up", "--config", "cli-keyless-block"], env=env)
    up = runner.invoke(app, ["up", "--config", "cli-block", "--state-file", str(state)],
                       env=env)
    assert_one_line_error(missing, "cannot load RayDogClusterConfig 'no-such-block'")
    assert_one_line_error(keyless, "cli-keyless-block: ssh_private_key: up needs the block's own")
    assert platform.api_calls().get("POST /work/requirements", 0) == 1  # the keyed one's alone
    assert up.exit_code == 0, up.output
    assert "Cluster local-" in up.output and "ray://" in up.output
    assert platform.key_secret not in up.output
    assert invoke(platform, "down", str(state)).exit_code == 0
