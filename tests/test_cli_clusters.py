"""The `prefect-raydog` cluster commands (up, status, down, sweep) run against a real local
platform with simulated nodes, through typer's CliRunner."""

from __future__ import annotations

import json
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
    sweep(platform.client, NAMESPACE, tag)


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
    assert name in status.output and f"{name}-01-wrkrs" in status.output

    down = invoke(platform, "down", str(state))
    assert down.exit_code == 0, down.output
    assert "ended:" in down.output and "work requirement" in down.output

    after = invoke(platform, "status", "--namespace", NAMESPACE, "--tag", tag)
    assert name not in after.output and "No live clusters" in after.output


def test_sweep_ends_every_tagged_cluster(platform: LocalPlatform, tmp_path: Path, tag: str) -> None:
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

    swept = invoke(platform, "sweep", "--namespace", NAMESPACE, "--tag", tag, "--yes")
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
