"""What the command line prints: one console, and errors as one red line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console()


def error_line(message: str) -> None:
    console.print(f"[red]Error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    error_line(message)
    return typer.Exit(code)
