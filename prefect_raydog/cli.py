"""The `prefect-raydog` command line: `up`, `down`, `status` and `sweep` of RayDog clusters, and
`prefect-raydog local start`, which runs a local YellowDog platform in the foreground."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

if TYPE_CHECKING:
    from yellowdog_client import PlatformClient

    from prefect_raydog.cluster import ShutdownReport
    from prefect_raydog.spec import ClusterSpec

app = typer.Typer(help="Ray clusters on YellowDog for Prefect flows.", no_args_is_help=True)
local = typer.Typer(help="The local YellowDog platform.", no_args_is_help=True)
app.add_typer(local, name="local")

console = Console()


class Network(str, Enum):
    AUTO = "auto"
    BRIDGE = "bridge"
    LOOPBACK = "loopback"


@local.command("start")
def start(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 0,
    templates: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="TOML file with more compute templates."),
    ] = None,
    network: Annotated[Network, typer.Option(help="How process nodes are networked.")] = (
        Network.AUTO
    ),
) -> None:
    """Run a local YellowDog platform until Ctrl-C, printing its URL and application key."""
    from prefect_raydog.local import LocalPlatform
    from prefect_raydog.local.templates import TemplateError

    try:
        platform = LocalPlatform(templates=templates, host=host, port=port, network=network.value)
    except TemplateError as error:
        console.print(f"[red]Invalid templates file:[/red] {error}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    with platform:
        console.print(f"[bold]Local YellowDog platform[/bold] at [cyan]{platform.url}[/cyan]")
        console.print(f"  key id:     {platform.key_id}")
        console.print(f"  key secret: {platform.key_secret}")
        console.print(f"  templates:  {', '.join(platform.templates.ids())}")
        if platform.runner is None:
            console.print(
                f"  [yellow]process nodes unavailable:[/yellow] {platform.state.runner_unavailable}"
            )
        console.print("Press Ctrl-C to stop.", style="dim")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            console.print("Stopping: ending every node.", style="dim")


# ----- clusters -----------------------------------------------------------------------------------

KeyId = Annotated[
    str, typer.Option(envvar="YD_API_KEY_ID", show_default=False, help="Application key ID.")
]
KeySecret = Annotated[
    str,
    typer.Option(envvar="YD_API_KEY_SECRET", show_default=False, help="Application key secret."),
]
ApiUrl = Annotated[str, typer.Option(envvar="YD_API_URL", help="YellowDog API URL.")]
DEFAULT_API_URL = "https://api.yellowdog.ai"


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]Error:[/red] {message}", markup=True, highlight=False)
    return typer.Exit(code)


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


def _load_spec(path: Path) -> ClusterSpec:
    import yaml
    from pydantic import ValidationError

    from prefect_raydog.spec import ClusterSpec

    try:
        fields = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise _fail(f"cannot read {path}: {error}", 2) from None
    try:
        return ClusterSpec.model_validate(fields)
    except ValidationError as error:
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"]) or "(spec)"
            console.print(f"[red]Invalid spec:[/red] {field}: {problem['msg']}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def up(
    spec_file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="ClusterSpec as YAML or JSON.")
    ],
    key_id: KeyId,
    key_secret: KeySecret,
    url: ApiUrl = DEFAULT_API_URL,
    state_file: Annotated[
        Path | None, typer.Option(help="Where to save the state `down` needs.")
    ] = None,
) -> None:
    """Build a cluster and leave it running until `prefect-raydog down STATE_FILE`."""
    from prefect_raydog.cluster import RayDogCluster

    spec = _load_spec(spec_file)
    state_file = state_file or Path(f"{spec.name}.raydog.json")
    with _platform(key_id, key_secret, url) as client:
        cluster = RayDogCluster(spec, client)
        head = cluster.build()
        cluster.save_state_to_json_file(state_file)
    console.print(f"Cluster [bold]{spec.name}[/bold] is up.", highlight=False)
    console.print(f"  head private IP: {head.private_ip}", highlight=False)
    console.print(f"  head public IP:  {head.public_ip or '-'}", highlight=False)
    console.print(f"  state saved to:  {state_file}", highlight=False)


@app.command()
def down(
    state_file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="State saved by `up`.")
    ],
    key_id: KeyId,
    key_secret: KeySecret,
    url: ApiUrl = DEFAULT_API_URL,
) -> None:
    """Shut down a cluster from its saved state."""
    from prefect_raydog.cluster import RayDogClusterProxy

    with _platform(key_id, key_secret, url) as client:
        proxy = RayDogClusterProxy(client)
        proxy.load_saved_state_from_json_file(state_file)
        report = proxy.shut_down()
    console.print(f"Shut down the cluster saved in {state_file}:", highlight=False)
    _print_report(report)


@app.command()
def status(
    namespace: Annotated[str, typer.Option(help="The namespace to look in.")],
    key_id: KeyId,
    key_secret: KeySecret,
    url: ApiUrl = DEFAULT_API_URL,
    tag: Annotated[str | None, typer.Option(help="Only clusters with this tag.")] = None,
) -> None:
    """List the live clusters (work requirements) of a namespace and their worker pools."""
    from yellowdog_client.model import (
        WorkerPoolSearch,
        WorkerPoolStatus,
        WorkRequirementSearch,
        WorkRequirementStatus,
    )

    table = Table(
        Column("Cluster", overflow="fold"),
        "Tag",
        "Status",
        Column("Worker pool", overflow="fold"),
        "Pool status",
        "Nodes",
    )
    with _platform(key_id, key_secret, url) as client:
        live = [s for s in WorkRequirementStatus if not s.finished]
        requirements = client.work_client.get_work_requirements(
            WorkRequirementSearch(namespace=namespace, tag=tag, statuses=live)
        ).list_all()
        pools = client.worker_pool_client.get_worker_pools(
            WorkerPoolSearch(
                namespace=namespace, statuses=[s for s in WorkerPoolStatus if not s.finished]
            )
        ).list_all()
    for requirement in sorted(requirements, key=lambda r: r.name or ""):
        if tag is not None and requirement.tag != tag:
            continue
        own = [p for p in pools if (p.name or "").startswith(f"{requirement.name}-")]
        cluster = [requirement.name, requirement.tag or "", requirement.status.value]
        for pool in sorted(own, key=lambda p: p.name or "") or [None]:
            row = (
                [pool.name, pool.status.value, str(pool.registeredNodeCount)] if pool else [""] * 3
            )
            table.add_row(*cluster, *row)
            cluster = ["", "", ""]
    if table.row_count:
        console.print(table)
    else:
        console.print(f"No live clusters in namespace {namespace!r}.", highlight=False)


@app.command()
def sweep(
    namespace: Annotated[str, typer.Option(help="The namespace to sweep.")],
    tag: Annotated[str, typer.Option(help="End every cluster with this tag.")],
    key_id: KeyId,
    key_secret: KeySecret,
    url: ApiUrl = DEFAULT_API_URL,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Shut down every cluster in the namespace with the tag, orphaned pools included."""
    from prefect_raydog import cluster

    if not yes:
        typer.confirm(f"End every cluster tagged {tag!r} in namespace {namespace!r}?", abort=True)
    with _platform(key_id, key_secret, url) as client:
        report = cluster.sweep(client, namespace, tag)
    console.print(f"Swept namespace {namespace!r} for tag {tag!r}:", highlight=False)
    _print_report(report)
