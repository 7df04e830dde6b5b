"""The `prefect-raydog` command line: `up`, `down`, `status` and `sweep` of RayDog clusters, and
the `local` commands (`cli/local.py`)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Column, Table
from typer.core import TyperGroup

from prefect_raydog.cli import locking
from prefect_raydog.cli.local import local
from prefect_raydog.cli.output import console, error_line, fail

if TYPE_CHECKING:
    from yellowdog_client import PlatformClient

    from prefect_raydog.blocks import YellowDogCredentials
    from prefect_raydog.cluster import HeadNodeAddress, ShutdownReport, SSHLogin
    from prefect_raydog.spec import ClusterSpec


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
                error_line(_usage_mistake(error))
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
app.add_typer(local, name="local")


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


def _key(key_id: str | None) -> tuple[str, str]:
    """The application key: the ID from --key-id or YD_API_KEY_ID, the secret from
    YD_API_KEY_SECRET or a hidden prompt (never the command line, where `ps` would show it)."""
    if not key_id:
        raise fail("no application key ID: pass --key-id or set YD_API_KEY_ID", 2)
    secret = os.environ.get(SECRET_VARIABLE) or typer.prompt(
        "Application key secret", hide_input=True, default="", show_default=False
    )
    if not secret:
        raise fail(f"no application key secret: set {SECRET_VARIABLE} or type it when asked", 2)
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
        raise fail(str(error).replace(key_secret, "***")) from None
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
        raise fail(f"cannot read {path}: {error.strerror}", 2) from None
    except yaml.YAMLError as error:
        raise fail(f"cannot read {path}: {' '.join(str(error).split())}", 2) from None
    try:
        return ClusterSpec.model_validate(fields)
    except ValidationError as error:
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"]) or "(spec)"
            console.print(f"[red]Invalid spec:[/red] {field}: {problem['msg']}", highlight=False)
        raise typer.Exit(2) from None


def _from_block(name: str) -> tuple[ClusterSpec, YellowDogCredentials, SSHLogin | None]:
    """The spec of a new cluster from a saved RayDogClusterConfig, its credentials, and the
    SSH login that locks it when the block reaches its nodes over SSH."""
    from prefect_raydog.blocks import RayDogClusterConfig

    try:
        config = RayDogClusterConfig.load(name)
    except Exception as error:  # Prefect raises ValueError, httpx or validation errors alike
        raise fail(f"cannot load RayDogClusterConfig {name!r}: {error}", 2) from None
    if config.ssh_tunnel and config.ssh_private_key is None:
        raise fail(f"{name}: ssh_private_key: up needs the block's own key with ssh_tunnel on: a "
                   "key made for the cluster would be gone when up returns, and with it the "
                   "way in", 2)
    return config.to_spec(config.cluster_name()), config.credentials, config.ssh_login()


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
    ssh_key: Annotated[
        Path | None,
        typer.Option(help="A private key that logs in to the nodes: the cluster is then locked "
                          "with a Ray token of its own, written into each node over SSH."),
    ] = None,
    ssh_user: Annotated[str, typer.Option(help="The user --ssh-key logs in as.")] = "yd-agent",
    ssh_known_hosts: Annotated[
        Path | None,
        typer.Option(help="The nodes' SSH host keys (known_hosts or .pub lines) for --ssh-key; "
                          "by default ~/.ssh/known_hosts."),
    ] = None,
) -> None:
    """Build a cluster and leave it running until `prefect-raydog down STATE_FILE`.

    The state file is written before the first pool is provisioned and kept up to date, so
    `down` can end whatever was created even if this command is interrupted. A cluster whose
    nodes it logs in to (`--ssh-key`, or a block with `ssh_tunnel`) is locked with a Ray token,
    kept beside the state file for this user alone.
    """
    if (spec_file is None) == (config is None):
        raise fail("give either a spec file or --config BLOCK_NAME (one of them)", 2)
    if config is not None:
        if ssh_key is not None or ssh_known_hosts is not None:
            raise fail("--ssh-key, --ssh-known-hosts: not with --config, whose block's ssh_* "
                       "fields apply", 2)
        spec, credentials, login = _from_block(config)
        key_id, secret, url = _block_key(credentials, key_id)
    else:
        spec = _load_spec(spec_file)
        login = locking.login_from_options(ssh_key, ssh_user, ssh_known_hosts)
        key_id, secret = _key(key_id)
    state_file = state_file or Path(f"{spec.name}.raydog.json")
    with _platform(key_id, secret, url) as client:
        head = _build(spec, client, login, state_file)
    ray_client = f"ray://{head.private_ip}:{RAY_CLIENT_PORT}"
    console.print(f"Cluster [bold]{spec.name}[/bold] is up.", highlight=False)
    console.print(f"  head private IP: {head.private_ip}", highlight=False)
    console.print(f"  head public IP:  {head.public_ip or '-'}", highlight=False)
    console.print(f"  Ray Client:      {ray_client} (inside the cluster's network)",
                  highlight=False, soft_wrap=True)
    console.print(f"  Ray dashboard:   http://127.0.0.1:{DASHBOARD_PORT} on the head, if it runs "
                  "one (its loopback alone)", highlight=False, soft_wrap=True)
    if head.public_ip and head.public_ip != head.private_ip:
        user = login.username if login is not None else "yd-agent"
        forwards = " ".join(f"-L {port}:127.0.0.1:{port}"
                            for port in (RAY_CLIENT_PORT, DASHBOARD_PORT))
        console.print(f"  From outside:    ssh -N {forwards} {user}@{head.public_ip}, then "
                      f"ray://127.0.0.1:{RAY_CLIENT_PORT} and http://127.0.0.1:{DASHBOARD_PORT}",
                      highlight=False, soft_wrap=True)
    console.print(f"  state saved to:  {state_file}", highlight=False)
    if login is not None:
        locking.print_connection(locking.token_file(state_file), ray_client)


def _build(spec: ClusterSpec, client: PlatformClient, login: SSHLogin | None,
           state_file: Path) -> HeadNodeAddress:
    """Build the cluster, saving its state at each step; a locked one waits for every worker
    node, to hand each the token before this process ends."""
    from prefect_raydog.cluster import RayDogCluster

    with _progress(f"Building {spec.name}") as step:
        cluster = RayDogCluster(spec, client, ssh=login)

        def on_step(description: str) -> None:
            state_file.write_text(cluster.save_state_to_json())
            if description != "built" and (spec.observability or "observ" not in description):
                step(description)

        everyone = locking.all_workers(spec) if login is not None else None
        head = cluster.build(on_step=on_step, workers_to_join=everyone)
        if login is not None:
            step("writing the Ray token to the worker nodes")
            locking.hand_over(cluster, locking.token_file(state_file))
    return head


@app.command()
def down(
    state_file: Annotated[Path, typer.Argument(help="State saved by `up`.")],
    key_id: KeyId = None,
    url: ApiUrl = DEFAULT_API_URL,
) -> None:
    """Shut down a cluster from its saved state."""
    from prefect_raydog.cluster import RayDogClusterProxy

    if not state_file.is_file():
        raise fail(f"no state file {state_file}", 2)
    with _platform(*_key(key_id), url) as client:
        proxy = RayDogClusterProxy(client)
        proxy.load_saved_state_from_json_file(state_file)
        with _progress("Shutting down") as step:
            step("ending the work requirement and worker pools")
            report = proxy.shut_down()
    console.print(f"Shut down the cluster saved in {state_file}:", highlight=False)
    _print_report(report)
    token = locking.token_file(state_file)
    if token.exists():
        token.unlink()
        console.print(f"  deleted:      its Ray token {token}", highlight=False, soft_wrap=True)


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
