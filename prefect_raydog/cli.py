"""The `prefect-raydog` command line: `prefect-raydog local start` runs a local YellowDog
platform in the foreground."""

from __future__ import annotations

import threading
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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
