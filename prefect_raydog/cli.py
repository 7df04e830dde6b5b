"""The `prefect-raydog` command line: `up`, `down`, `status` and `sweep` of RayDog clusters, and
`prefect-raydog local start`, which runs a local YellowDog platform in the foreground."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table
from typer.core import TyperGroup

if TYPE_CHECKING:
    from yellowdog_client import PlatformClient

    from prefect_raydog.blocks import YellowDogCredentials
    from prefect_raydog.cluster import ShutdownReport
    from prefect_raydog.local import LocalPlatform
    from prefect_raydog.local.identity import PlatformIdentity, StateDirectory
    from prefect_raydog.spec import ClusterSpec

console = Console()


class _OneLineErrors(TyperGroup):
    """Typer's command group, with each usage mistake (an unknown option, a missing argument, a
    bad value) as one line and exit code 2 instead of Click's usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as error:  # Click's own errors, as typer vendors Click
            # With no arguments, Click's error is the help text, already shown.
            if type(error).__name__ != "NoArgsIsHelpError":
                _error_line(_usage_mistake(error))
            sys.exit(error.exit_code)
        except typer.Abort:
            console.print("Aborted.", highlight=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _usage_mistake(error: typer.TyperException) -> str:
    """Click's message, and where to read the command's usage."""
    context = getattr(error, "ctx", None)
    if context is None:
        return error.format_message()
    return f"{error.format_message().rstrip('.')}; see '{context.command_path} --help'."


app = typer.Typer(
    cls=_OneLineErrors, help="Ray clusters on YellowDog for Prefect flows.", no_args_is_help=True
)
local = typer.Typer(help="The local YellowDog platform.", no_args_is_help=True)
app.add_typer(local, name="local")


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
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Run a local YellowDog platform until Ctrl-C, SIGTERM or SIGHUP, printing its URL and
    application key; a restart with the same state directory keeps both."""
    from prefect_raydog.local.identity import PlatformIdentity, StateDirectory, StateDirectoryBusy

    directory = StateDirectory(state_dir)
    try:
        directory.lock()
    except StateDirectoryBusy as error:
        raise _fail(str(error), 2) from None
    try:
        identity = directory.load() or PlatformIdentity.new()
        if port is not None:
            identity.port = port
        _serve_platform(identity, host, templates, network, directory)
    finally:
        directory.unlock()


def _serve_platform(
    identity: PlatformIdentity, host: str, templates: Path | None, network: Network,
    directory: StateDirectory,
) -> None:
    from prefect_raydog.local import LocalPlatform
    from prefect_raydog.local.templates import TemplateError

    # `timeout`, `docker stop`, systemd and a closed terminal stop it in order, as Ctrl-C does.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        platform = LocalPlatform(
            templates=templates, host=host, port=identity.port, network=network.value,
            key_id=identity.key_id, key_secret=identity.key_secret,
            bridge_index=identity.bridge_index,
        )
    except TemplateError as error:
        console.print(f"[red]Invalid templates file:[/red] {error}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    try:
        platform.start()
    except OSError as error:
        raise _fail(
            f"cannot listen on {host}:{identity.port} (kept in {directory.identity_file}): "
            f"{error.strerror or error}; stop what listens there, or pass --port"
        ) from None
    try:
        identity.port, identity.bridge_index = platform.port, platform.bridge_index
        identity.url, identity.node_address = platform.url, platform.host_address
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
    directory: its URL and key, and the address where its nodes reach the Prefect API relay."""
    from prefect_raydog.blocks import RayDogClusterConfig
    from prefect_raydog.local.identity import StateDirectory

    identity = StateDirectory(state_dir).load()
    if identity is None or not identity.url:
        raise _fail(f"no local platform has started with state directory {state_dir}: run "
                    f"'prefect-raydog local start --state-dir {state_dir}' first", 2)
    config = RayDogClusterConfig.local(
        identity.url, identity.key_id, identity.key_secret, worker_nodes
    ).model_copy(update={"api_relay_address": identity.node_address})
    config.save(name, overwrite=True)
    console.print(f"Saved RayDogClusterConfig {name!r} for the local platform at "
                  f"{identity.url}.", highlight=False)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# ----- clusters -----------------------------------------------------------------------------------

KeyId = Annotated[
    str | None,
    typer.Option(
        envvar="YD_API_KEY_ID",
        show_default=False,
        help="Application key ID; its secret comes from YD_API_KEY_SECRET or a hidden prompt.",
    ),
]
ApiUrl = Annotated[str, typer.Option(envvar="YD_API_URL", help="YellowDog API URL.")]
DEFAULT_API_URL = "https://api.yellowdog.ai"
SECRET_VARIABLE = "YD_API_KEY_SECRET"
RAY_CLIENT_PORT = 10001
DASHBOARD_PORT = 8265


def _error_line(message: str) -> None:
    console.print(f"[red]Error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    _error_line(message)
    return typer.Exit(code)


def _key(key_id: str | None) -> tuple[str, str]:
    """The application key: the ID from --key-id or YD_API_KEY_ID, the secret from
    YD_API_KEY_SECRET or a hidden prompt (never the command line, where `ps` would show it)."""
    if not key_id:
        raise _fail("no application key ID: pass --key-id or set YD_API_KEY_ID", 2)
    secret = os.environ.get(SECRET_VARIABLE) or typer.prompt(
        "Application key secret", hide_input=True, default="", show_default=False
    )
    if not secret:
        raise _fail(f"no application key secret: set {SECRET_VARIABLE} or type it when asked", 2)
    return key_id, secret


@contextmanager
def _platform(key_id: str, key_secret: str, url: str) -> Iterator[PlatformClient]:
    """A client for the command; expected failures become one line and exit code 1."""
    from requests import RequestException
    from yellowdog_client.model.exceptions import BaseCustomException, ServiceClientException

    from prefect_raydog.cluster import create_client
    from prefect_raydog.errors import RayDogError

    client = create_client(key_id, key_secret, url, max_attempts=2)
    try:
        yield client
    except (RayDogError, BaseCustomException, ServiceClientException, RequestException) as error:
        raise _fail(str(error).replace(key_secret, "***")) from None
    finally:
        client.close()


def _print_report(report: ShutdownReport) -> None:
    for what in report.ended:
        console.print(f"  ended:        {what}", highlight=False, soft_wrap=True)
    for what in report.already_gone:
        console.print(f"  already gone: {what}", highlight=False, soft_wrap=True)
    if not report.ended and not report.already_gone:
        console.print("  nothing to end", highlight=False)


@contextmanager
def _progress(what: str) -> Iterator[Callable[[str], None]]:
    """A spinner with the elapsed time; each step it is told of is printed once it is done."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(what)
        started = time.monotonic()
        current: list[str] = []

        def step(description: str) -> None:
            if current:
                console.print(
                    f"  [green]done[/green] {current[0]} ({time.monotonic() - started:.1f} s)",
                    highlight=False,
                )
            current[:] = [description]
            progress.update(task, description=f"{what}: {description}")

        yield step
        step("")


def _load_spec(path: Path) -> ClusterSpec:
    import yaml
    from pydantic import ValidationError

    from prefect_raydog.spec import ClusterSpec

    try:
        fields = yaml.safe_load(path.read_text())
    except OSError as error:
        raise _fail(f"cannot read {path}: {error.strerror}", 2) from None
    except yaml.YAMLError as error:
        raise _fail(f"cannot read {path}: {' '.join(str(error).split())}", 2) from None
    try:
        return ClusterSpec.model_validate(fields)
    except ValidationError as error:
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"]) or "(spec)"
            console.print(f"[red]Invalid spec:[/red] {field}: {problem['msg']}", highlight=False)
        raise typer.Exit(2) from None


def _from_block(name: str) -> tuple[ClusterSpec, YellowDogCredentials]:
    """The spec of a new cluster from a saved RayDogClusterConfig, and its credentials."""
    from prefect_raydog.blocks import RayDogClusterConfig

    try:
        config = RayDogClusterConfig.load(name)
    except Exception as error:  # Prefect raises ValueError, httpx or validation errors alike
        raise _fail(f"cannot load RayDogClusterConfig {name!r}: {error}", 2) from None
    return config.to_spec(config.cluster_name()), config.credentials


def _block_key(credentials: YellowDogCredentials, key_id: str | None) -> tuple[str, str, str]:
    """The block's key after its environment fallback; what it lacks is asked for."""
    try:
        block_id, secret = credentials.resolved_key()
        return block_id, secret.get_secret_value(), credentials.resolved_api_url()
    except ValueError:
        return (*_key(credentials.api_key_id or key_id), credentials.resolved_api_url())


@app.command()
def up(
    spec_file: Annotated[
        Path | None, typer.Argument(help="ClusterSpec as YAML or JSON.")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(help="Build from this saved RayDogClusterConfig block (and its credentials)."),
    ] = None,
    key_id: KeyId = None,
    url: ApiUrl = DEFAULT_API_URL,
    state_file: Annotated[
        Path | None, typer.Option(help="Where to save the state `down` needs.")
    ] = None,
) -> None:
    """Build a cluster and leave it running until `prefect-raydog down STATE_FILE`.

    The state file is written before the first pool is provisioned and kept up to date, so
    `down` can end whatever was created even if this command is interrupted.
    """
    from prefect_raydog.cluster import RayDogCluster

    if (spec_file is None) == (config is None):
        raise _fail("give either a spec file or --config BLOCK_NAME (one of them)", 2)
    if config is not None:
        spec, credentials = _from_block(config)
        key_id, secret, url = _block_key(credentials, key_id)
    else:
        spec = _load_spec(spec_file)
        key_id, secret = _key(key_id)
    state_file = state_file or Path(f"{spec.name}.raydog.json")
    with _platform(key_id, secret, url) as client, _progress(f"Building {spec.name}") as step:
        cluster = RayDogCluster(spec, client)

        def on_step(description: str) -> None:
            state_file.write_text(cluster.save_state_to_json())
            if description != "built" and (spec.observability or "observ" not in description):
                step(description)

        head = cluster.build(on_step=on_step)
    console.print(f"Cluster [bold]{spec.name}[/bold] is up.", highlight=False)
    console.print(f"  head private IP: {head.private_ip}", highlight=False)
    console.print(f"  head public IP:  {head.public_ip or '-'}", highlight=False)
    console.print(f"  Ray Client:      ray://{head.private_ip}:{RAY_CLIENT_PORT}", highlight=False)
    console.print(f"  Ray dashboard:   http://{head.private_ip}:{DASHBOARD_PORT}", highlight=False)
    console.print(f"  state saved to:  {state_file}", highlight=False)


@app.command()
def down(
    state_file: Annotated[Path, typer.Argument(help="State saved by `up`.")],
    key_id: KeyId = None,
    url: ApiUrl = DEFAULT_API_URL,
) -> None:
    """Shut down a cluster from its saved state."""
    from prefect_raydog.cluster import RayDogClusterProxy

    if not state_file.is_file():
        raise _fail(f"no state file {state_file}", 2)
    with _platform(*_key(key_id), url) as client:
        proxy = RayDogClusterProxy(client)
        proxy.load_saved_state_from_json_file(state_file)
        with _progress("Shutting down") as step:
            step("ending the work requirement and worker pools")
            report = proxy.shut_down()
    console.print(f"Shut down the cluster saved in {state_file}:", highlight=False)
    _print_report(report)


@app.command()
def status(
    namespace: Annotated[str, typer.Option(help="The namespace to look in.")],
    key_id: KeyId = None,
    url: ApiUrl = DEFAULT_API_URL,
    tag: Annotated[str | None, typer.Option(help="Only clusters with this tag.")] = None,
) -> None:
    """List the live clusters (work requirements) of a namespace, their worker pools, and the
    node task of each Ray node with its state."""
    from yellowdog_client.model import (
        TaskSearch,
        WorkerPoolSearch,
        WorkerPoolStatus,
        WorkRequirementSearch,
        WorkRequirementStatus,
    )

    pools_table = Table(
        Column("Cluster", overflow="fold"), "Tag", "Status",
        Column("Worker pool", overflow="fold"), "Pool status", "Nodes",
    )
    nodes_table = Table(
        Column("Cluster", overflow="fold"), "Task group", "Task", "Task state",
        Column("Node", overflow="fold"),
    )
    with _platform(*_key(key_id), url) as client:
        live = [s for s in WorkRequirementStatus if not s.finished]
        requirements = [
            r for r in client.work_client.get_work_requirements(
                WorkRequirementSearch(namespace=namespace, tag=tag, statuses=live)
            ).list_all()
            if tag is None or r.tag == tag
        ]
        pools = client.worker_pool_client.get_worker_pools(
            WorkerPoolSearch(
                namespace=namespace, statuses=[s for s in WorkerPoolStatus if not s.finished]
            )
        ).list_all()
        tasks = {
            r.id: list(client.work_client.get_tasks(TaskSearch(workRequirementId=r.id)).iterate())
            for r in requirements
        }
        groups = {
            r.id: {g.id: g.name for g in client.work_client.get_work_requirement_by_id(r.id)
                   .taskGroups or []}
            for r in requirements
        }
    for requirement in sorted(requirements, key=lambda r: r.name or ""):
        own = [p for p in pools if (p.name or "").startswith(f"{requirement.name}-")]
        cluster = [requirement.name, requirement.tag or "", requirement.status.value]
        for pool in sorted(own, key=lambda p: p.name or "") or [None]:
            row = (
                [pool.name, pool.status.value, str(pool.registeredNodeCount)] if pool else [""] * 3
            )
            pools_table.add_row(*cluster, *row)
            cluster = ["", "", ""]
        name = requirement.name
        for task in sorted(tasks[requirement.id], key=lambda t: t.name or ""):
            group = groups[requirement.id].get(task.taskGroupId, "")
            state = task.status.value if task.status else "-"
            nodes_table.add_row(name, group, task.name, state, task.nodeId or task.workerId or "-")
            name = ""
    if pools_table.row_count:
        console.print(pools_table)
        if nodes_table.row_count:
            console.print(nodes_table)
    else:
        console.print(f"No live clusters in namespace {namespace!r}.", highlight=False)


@app.command()
def sweep(
    namespace: Annotated[str, typer.Option(help="The namespace to sweep.")],
    tag: Annotated[str, typer.Option(help="End the orphaned clusters with this tag.")],
    everything: Annotated[
        bool, typer.Option("--all", help="End every cluster with the tag, healthy ones too.")
    ] = False,
    key_id: KeyId = None,
    url: ApiUrl = DEFAULT_API_URL,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Shut down the orphaned clusters in the namespace with the tag (head gone, lifetime passed,
    or pools never given a work requirement), and leave the healthy ones; `--all` ends them all."""
    from prefect_raydog import cluster

    which = "every cluster" if everything else "the orphaned clusters"
    if not yes:
        typer.confirm(f"End {which} tagged {tag!r} in namespace {namespace!r}?", abort=True)
    with _platform(*_key(key_id), url) as client, _progress("Sweeping") as step:
        step(f"finding and ending {which} tagged {tag!r} in {namespace!r}")
        report = cluster.sweep(client, namespace, tag, everything=everything)
    console.print(f"Swept namespace {namespace!r} for tag {tag!r}:", highlight=False)
    _print_report(report)


@app.command("node-requirements")
def node_requirements_command(
    extra: Annotated[
        list[str] | None,
        typer.Argument(help="Further packages, such as the flow's own (pinned when installed)."),
    ] = None,
    userdata: Annotated[
        bool,
        typer.Option("--userdata", help="Print node userdata that installs them instead."),
    ] = False,
) -> None:
    """Print the packages a node needs for this driver, pinned to its versions (pip's format),
    or (--userdata) the node userdata that installs them with the driver's Python minor."""
    from prefect_raydog.local.images import node_requirements, node_userdata

    if userdata:
        print(node_userdata(extra or ()), end="")
        return
    print(f"# Python {sys.version_info[0]}.{sys.version_info[1]} (the node's must match)")
    print("\n".join(node_requirements(extra or ())))
