"""What the ``florg`` commands share: the consoles, the one-line failure, byte counts."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["console", "err_console", "fail", "fmt_bytes"]

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}")  # messages may hold [section] names
    raise typer.Exit(code=2)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000.0
    return str(n)
