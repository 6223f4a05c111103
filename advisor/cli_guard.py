"""Shared by every CLI module: bad input → the message on stderr and exit code 2."""

from __future__ import annotations

import functools

import typer
from rich.console import Console

from advisor.errors import AdvisorInputError

err_console = Console(stderr=True)


def guard(fn):
    """Turn AdvisorInputError into exit code 2 with the field's message on stderr."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AdvisorInputError as err:
            err_console.print(f"[bold red]error:[/] {err.message}", markup=True, highlight=False)
            raise typer.Exit(code=2) from None

    return wrapper
