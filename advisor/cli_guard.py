"""Shared by every CLI module: bad input → the message on stderr and exit code 2; a status line while memory models
are fitted."""

from __future__ import annotations

import contextlib
import functools
import time

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


@contextlib.contextmanager
def fit_status(console: Console, idle: str):
    """A status line on `console` (when it is a terminal) that says which memory model is being fitted: a cold
    recommendation fits each candidate method once, 2-9 s each, and would otherwise sit silent for a minute."""
    if not console.is_terminal:
        yield
        return
    from advisor.estimator.coefficients import fit_listener

    done, started = [0], time.perf_counter()

    with console.status(idle) as status:
        def on_fit(event: str, info: dict) -> None:
            if event == "end":
                done[0] += 1
                return
            checkpointing = ", gradient checkpointing" if info["gradient_checkpointing"] else ""
            status.update(f"fitting the memory model of {info['method']}{checkpointing} at {info['seq_len']} tokens "
                          f"(exact slice simulations, once per model, method and length; {done[0]} fitted, "
                          f"{time.perf_counter() - started:.0f} s)...")

        with fit_listener(on_fit):
            yield
