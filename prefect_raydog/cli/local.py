"""`prefect-raydog local`: `start` runs a local YellowDog platform in the foreground, `save-block`
saves a cluster configuration block for it."""

from __future__ import annotations

import os
import signal
import threading
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from prefect_raydog.cli.output import console, fail

if TYPE_CHECKING:
    from prefect_raydog.local import LocalPlatform
    from prefect_raydog.local.identity import PlatformIdentity, StateDirectory

local = typer.Typer(help="The local YellowDog platform.", no_args_is_help=True)


class Network(str, Enum):
    AUTO = "auto"
    BRIDGE = "bridge"
    LOOPBACK = "loopback"


DEFAULT_STATE_DIR = Path(os.environ.get("PREFECT_HOME") or "~/.prefect") / "raydog-local"
StateDir = Annotated[
    Path,
    typer.Option(help="Where the platform keeps its port, key and bridge across restarts."),
]


@local.command("start")
def start(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int | None,
        typer.Option(help="Port to listen on (0: any free port) [default: the last start's]."),
    ] = None,
    templates: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="TOML file with more compute templates."),
    ] = None,
    network: Annotated[Network, typer.Option(help="How process nodes are networked.")] = (
        Network.AUTO
    ),
    firewall: Annotated[
        bool | None,
        typer.Option(
            "--firewall/--no-firewall",
            help="Put the nodes behind a cloud's firewall (they reach this machine at the API "
                 "alone, it reaches them at SSH alone) [default: on with bridge networking].",
        ),
    ] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Run a local YellowDog platform until Ctrl-C, SIGTERM or SIGHUP, printing its URL and
    application key; a restart with the same state directory keeps both."""
    from prefect_raydog.local.identity import PlatformIdentity, StateDirectory, StateDirectoryBusy

    directory = StateDirectory(state_dir)
    try:
        directory.lock()
    except StateDirectoryBusy as error:
        raise fail(str(error), 2) from None
    try:
        identity = directory.load() or PlatformIdentity.new()
        if port is not None:
            identity.port = port
        _serve_platform(identity, host, templates, network, firewall, directory)
    finally:
        directory.unlock()


def _serve_platform(
    identity: PlatformIdentity, host: str, templates: Path | None, network: Network,
    firewall: bool | None, directory: StateDirectory,
) -> None:
    from prefect_raydog.local import LocalPlatform
    from prefect_raydog.local.network import IsolationUnavailable
    from prefect_raydog.local.templates import TemplateError

    # `timeout`, `docker stop`, systemd and a closed terminal stop it in order, as Ctrl-C does;
    # Ctrl-C too where SIGINT came inherited ignored (a background job of a script).
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        platform = LocalPlatform(
            templates=templates, host=host, port=identity.port, network=network.value,
            key_id=identity.key_id, key_secret=identity.key_secret,
            bridge_index=identity.bridge_index, firewall=firewall,
        )
    except TemplateError as error:
        console.print(f"[red]Invalid templates file:[/red] {error}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    try:
        platform.start()
    except IsolationUnavailable as error:  # a firewall asked for where nodes get no bridge
        raise fail(f"{error}; run as root, or pass --no-firewall") from None
    except OSError as error:
        raise fail(
            f"cannot listen on {host}:{identity.port} (kept in {directory.identity_file}): "
            f"{error.strerror or error}; stop what listens there, or pass --port"
        ) from None
    try:
        platform.keep_ssh_host_key(directory.path)
        identity.port, identity.bridge_index = platform.port, platform.bridge_index
        identity.url, identity.node_address = platform.url, platform.host_address
        identity.firewall = bool(platform.firewall)
        directory.save(identity)
        _print_platform(platform, directory)
        threading.Event().wait()
    except KeyboardInterrupt:
        console.print("Stopping: ending every node.", style="dim")
    finally:
        platform.stop()


def _print_platform(platform: LocalPlatform, directory: StateDirectory) -> None:
    console.print(f"[bold]Local YellowDog platform[/bold] at [cyan]{platform.url}[/cyan]")
    console.print(f"  key id:     {platform.key_id}")
    console.print(f"  key secret: {platform.key_secret}")
    console.print(f"  templates:  {', '.join(platform.templates.ids())}")
    console.print(f"  nodes reach this machine at {platform.host_address}", highlight=False)
    console.print(f"  state kept in {directory.path}", highlight=False)
    if platform.firewall:
        console.print("  nodes sealed as cloud VMs (local/vm), behind a firewall: this machine "
                      "reaches them at SSH alone", highlight=False)
    if platform.ssh_known_hosts is not None:
        console.print(f"  nodes' SSH host key: {platform.ssh_known_hosts.strip()}",
                      highlight=False)
    if platform.runner is None:
        console.print(
            f"  [yellow]process nodes unavailable:[/yellow] {platform.state.runner_unavailable}"
        )
    console.print("Press Ctrl-C to stop.", style="dim")


@local.command("save-block")
def save_block(
    name: Annotated[str, typer.Argument(help="The RayDogClusterConfig block's name.")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
    worker_nodes: Annotated[int, typer.Option(help="Process nodes in the worker pool.")] = 2,
) -> None:
    """Save a RayDogClusterConfig block (the `local` preset) for the local platform of the state
    directory: its URL and key; sealed nodes reached over SSH behind its firewall, or else the
    address where its nodes reach the Prefect API relay."""
    from prefect_raydog.blocks import RayDogClusterConfig
    from prefect_raydog.local.identity import StateDirectory

    identity = StateDirectory(state_dir).load()
    if identity is None or not identity.url:
        raise fail(f"no local platform has started with state directory {state_dir}: run "
                    f"'prefect-raydog local start --state-dir {state_dir}' first", 2)
    from prefect_raydog.local.ssh import HOST_KEY_FILE

    host_key = Path(state_dir).expanduser() / f"{HOST_KEY_FILE}.pub"
    config = RayDogClusterConfig.local(
        identity.url, identity.key_id, identity.key_secret, worker_nodes,
        ssh_known_hosts=host_key.read_text() if host_key.is_file() else None,
        sealed=identity.firewall,
    )
    if not identity.firewall:
        config = config.model_copy(update={"api_relay_address": identity.node_address})
    config.save(name, overwrite=True)
    how = "sealed nodes reached over SSH" if identity.firewall else "process nodes"
    console.print(f"Saved RayDogClusterConfig {name!r} for the local platform at "
                  f"{identity.url} ({how}).", highlight=False)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
