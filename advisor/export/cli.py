"""`advisor export`: a recommendation as an Axolotl / LLaMA-Factory config, a training script or accelerate config."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from advisor.cli_guard import guard
from advisor.errors import AdvisorInputError

err_console = Console(stderr=True)


def _read_json(path: Path, field: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdvisorInputError(field, f"file not found: {path}") from None
    except IsADirectoryError:
        raise AdvisorInputError(field, f"{path} is a directory, not a JSON file") from None
    except json.JSONDecodeError as err:
        raise AdvisorInputError(field, f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise AdvisorInputError(field, f"{path} must hold a JSON object")
    return data


FORMAT = typer.Option("--format", "-F", help="axolotl | llamafactory | script | accelerate")
FROM = typer.Option("--from", help="A Recommendation JSON (advisor recommend --json).")
FILE = typer.Option("--file", "-f", help="A Scenario JSON: recommend first, then export.")
METHOD = typer.Option(help="Export this alternative instead of the recommended method.")
DATASET = typer.Option(help="Training data file (JSONL/JSON) to put in the config.")
DATASET_FORMAT = typer.Option(help="auto | alpaca | chat | completion | text")
OUT = typer.Option("--out", "-o", help="Write here (companion files beside it).")
OUTPUT_DIR = typer.Option(help="Where the training run saves (default outputs/<model>-<method>).")
VAL_SPLIT = typer.Option(help="Held-out fraction for evaluation (default 0.1).")
BACKEND = typer.Option(help="accelerate only: auto | fsdp | deepspeed.")
AS_JSON = typer.Option("--json", help="Print the API's JSON instead of the file.")


@guard
def export_command(
    fmt: Annotated[str | None, FORMAT] = None,
    from_file: Annotated[Path | None, FROM] = None,
    file: Annotated[Path | None, FILE] = None,
    method: Annotated[str | None, METHOD] = None,
    dataset: Annotated[str | None, DATASET] = None,
    dataset_format: Annotated[str, DATASET_FORMAT] = "auto",
    out: Annotated[Path | None, OUT] = None,
    output_dir: Annotated[str | None, OUTPUT_DIR] = None,
    val_split: Annotated[float | None, VAL_SPLIT] = None,
    backend: Annotated[str, BACKEND] = "auto",
    as_json: Annotated[bool, AS_JSON] = False,
) -> None:
    """Export a recommendation as a config for the tool that trains it (the method's alternatives with --method)."""
    from advisor.export import FORMAT_IDS, export, get_format

    if not fmt:
        raise AdvisorInputError("--format", "required", allowed=list(FORMAT_IDS))
    get_format(fmt)  # an unknown format is reported before any file is read
    if (from_file is None) == (file is None):
        raise AdvisorInputError("--from", "give exactly one of --from RECOMMENDATION.json or --file SCENARIO.json")
    rec = _read_json(from_file, "--from") if from_file else None
    scenario = _read_json(file, "--file") if file else None
    ds = None
    if dataset is not None or dataset_format != "auto":
        ds = {"path": dataset, "format": dataset_format}
    result = export(
        fmt, recommendation=rec, scenario=scenario, method=method, dataset=ds, output_dir=output_dir,
        val_split=val_split, backend=backend, filename=out.name if out else None,
        companion_dir=str(out.resolve().parent) if out else None,
    )
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    if out is None:
        if not as_json:
            sys.stdout.write(result["content"])
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result["content"], encoding="utf-8")
        written = [out]
        for name, content in result["files"].items():
            path = out.parent / name
            path.write_text(content, encoding="utf-8")
            written.append(path)
    except OSError as err:
        raise AdvisorInputError("--out", f"cannot write {out}: {err.strerror or err}") from None
    if result["format"] == "script":
        out.chmod(out.stat().st_mode | 0o111)
    for path in written:
        err_console.print(f"[green]wrote[/] {path}", highlight=False)
    err_console.print(f"run: {result['command']}", highlight=False, markup=False)
    for note in result["notes"]:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
