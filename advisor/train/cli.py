"""`advisor merge OUTPUT_DIR [--out DIR] [--dequantize]` (registered by advisor/cli.py through `register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from advisor.cli_guard import guard


def register(app: typer.Typer) -> None:
    @app.command()
    @guard
    def merge(
        output_dir: Annotated[Path, typer.Argument(help="A training output directory (holds plan.json).")],
        out: Annotated[Path | None, typer.Option("--out", help="Where to write the merged model; default OUTPUT_DIR/merged.")] = None,
        dequantize: Annotated[bool, typer.Option("--dequantize", help="QLoRA: reload the base unquantized and merge there.")] = False,
    ) -> None:
        """Merge a trained LoRA-family adapter into its base model (refuses 4-bit bases without --dequantize)."""
        from rich.console import Console

        from advisor.train.merge import merge as do_merge

        target = do_merge(output_dir, out, dequantize=dequantize)
        Console().print(f"merged model written to [bold]{target}[/]")
