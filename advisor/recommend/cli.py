"""`advisor recommend`: the Recommendation as a readable rich report, or exactly the API's JSON with --json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from advisor.cli_guard import err_console, fit_status, guard
from advisor.errors import AdvisorInputError

console = Console()
BAR_COLOURS = {"weights": "blue", "trainable": "cyan", "gradients": "magenta", "optimizer": "yellow",
               "activations": "green", "logits": "red", "overhead": "white"}


def _context_pairs(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise AdvisorInputError("context", f"expected KEY=VALUE, got {pair!r} (e.g. prompting_tried=true)")
        key, value = pair.split("=", 1)
        value = value.strip()
        low = value.lower()
        if low in ("true", "yes"):
            out[key.strip()] = True
        elif low in ("false", "no"):
            out[key.strip()] = False
        elif value.isdigit():
            out[key.strip()] = int(value)
        elif key.strip() == "symptoms":
            out["symptoms"] = [s.strip() for s in value.split(",") if s.strip()]
        else:
            out[key.strip()] = value
    return out


def scenario_from_options(file: Path | None, model: str | None, gpu: str | None, count: int | None,
                          vram_gib: float | None, examples: int | None, avg_tokens: float | None,
                          max_tokens: int | None, dataset: str | None, task: str | None, priority: str | None,
                          max_usd: float | None, max_hours: float | None, context: list[str]) -> dict:
    """A Scenario dict from --file and/or flags (flags override the file)."""
    scenario: dict[str, Any] = {}
    if file is not None:
        try:
            scenario = json.loads(Path(file).read_text())
        except FileNotFoundError:
            raise AdvisorInputError("file", f"file not found: {file}") from None
        except json.JSONDecodeError as err:
            raise AdvisorInputError("file", f"{file} is not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(scenario, dict):
            raise AdvisorInputError("file", f"{file} must hold a JSON object (a Scenario)")
    if model is not None:
        scenario["model"] = model
    hw = dict(scenario.get("hardware") or {})
    if gpu is not None:
        hw["gpu"] = gpu
    if count is not None:
        hw["count"] = count
    if vram_gib is not None:
        hw["vram_gib"] = vram_gib
    if hw:
        scenario["hardware"] = hw
    ds = dict(scenario.get("dataset") or {})
    for key, value in (("num_examples", examples), ("avg_tokens", avg_tokens), ("max_tokens", max_tokens),
                       ("path", dataset)):
        if value is not None:
            ds[key] = value
    if ds:
        scenario["dataset"] = ds
    if task is not None:
        scenario["task"] = task
    if priority is not None:
        scenario["priority"] = priority
    budget = dict(scenario.get("budget") or {})
    if max_usd is not None:
        budget["max_usd"] = max_usd
    if max_hours is not None:
        budget["max_hours"] = max_hours
    if budget:
        scenario["budget"] = budget
    if context:
        scenario["context"] = {**(scenario.get("context") or {}), **_context_pairs(context)}
    for required, flag in (("model", "--model"), ("hardware", "--gpu or --vram-gib"),
                           ("dataset", "--examples or --dataset")):
        if required not in scenario:
            raise AdvisorInputError(required, f"required: give {flag} (or --file scenario.json)")
    return scenario


@guard
def recommend_command(
    file: Annotated[Path | None, typer.Option("--file", "-f", help="A Scenario JSON file (CONTRACT.md).")] = None,
    model: Annotated[str | None, typer.Option(help="Catalog name, Hugging Face id or local model directory.")] = None,
    gpu: Annotated[str | None, typer.Option(help="GPU name or alias ('4090', 'A100-80GB'), 'none' or 'auto'.")] = None,
    count: Annotated[int | None, typer.Option(help="Number of GPUs.")] = None,
    vram_gib: Annotated[float | None, typer.Option(help="Memory per GPU (GiB) instead of a catalog name.")] = None,
    examples: Annotated[int | None, typer.Option(help="Training examples.")] = None,
    avg_tokens: Annotated[float | None, typer.Option(help="Mean tokens per example.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Tokens in the longest example.")] = None,
    dataset: Annotated[str | None, typer.Option(help="A JSONL/JSON/CSV/Parquet file to profile instead of counts.")] = None,
    task: Annotated[str | None, typer.Option(help="Task (e.g. instruction_following, math, summarization).")] = None,
    priority: Annotated[str | None, typer.Option(help="balanced | quality | cost | speed | min_params.")] = None,
    max_usd: Annotated[float | None, typer.Option(help="Budget in dollars.")] = None,
    max_hours: Annotated[float | None, typer.Option(help="Budget in hours.")] = None,
    context: Annotated[list[str] | None, typer.Option(
        "--context", "-c", help="Context facts KEY=VALUE, repeatable (prompting_tried=true, num_domains=4, ...).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly the API's JSON.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON to this file (for `advisor export`).")] = None,
) -> None:
    """Which method, which config, how much memory, time and money — with the rules that decided it."""
    from advisor.recommend import recommend

    scenario = scenario_from_options(file, model, gpu, count, vram_gib, examples, avg_tokens, max_tokens, dataset,
                                     task, priority, max_usd, max_hours, context or [])
    with fit_status(err_console, "evaluating the rules and estimating each candidate..."):
        result = recommend(scenario)
    if out is not None:
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        return
    render(result)


def _breakdown_bar(breakdown: dict[str, float], total: float, width: int = 60) -> Text:
    bar = Text()
    if total <= 0:
        return bar
    for key, colour in BAR_COLOURS.items():
        n = int(round(breakdown.get(key, 0.0) / total * width))
        if n:
            bar.append("█" * n, style=colour)
    return bar


def render(r: dict) -> None:
    decision = r["decision"].replace("_", " ")
    title = f"[bold]{decision}[/]" + (f" with [bold cyan]{r['method']}[/]" if r.get("method") else "")
    head = [Text.from_markup(title)]
    hw = r.get("hardware") or {}
    head.append(Text(f"model {r.get('model')}  ·  hardware {hw.get('count', 1)}× {hw.get('name')}"))
    prof = r.get("dataset_profile")
    if prof:
        head.append(Text(f"dataset {prof['num_examples']} rows ({prof['format']}), tokens avg {prof['avg_tokens']}, "
                         f"p90 {prof['p90_tokens']}, max {prof['max_tokens']} — {prof['tokenizer']}"))
    console.print(Panel(Group(*head), title="Recommendation", expand=False))

    est = r.get("estimate")
    if r.get("config"):
        cfg = r["config"]
        table = Table(title="Config", show_header=False, expand=False)
        table.add_column("key", style="bold")
        table.add_column("value", overflow="fold")
        for k, v in (cfg.get("peft") or {}).items():
            table.add_row(f"peft.{k}", json.dumps(v))
        for k, v in (cfg.get("quantization") or {}).items():
            table.add_row(f"quantization.{k}", json.dumps(v))
        for k in ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
                  "max_seq_length", "warmup_ratio", "lr_scheduler_type", "gradient_checkpointing", "bf16", "fp16",
                  "optim"):
            if k in cfg["training"]:
                table.add_row(f"training.{k}", json.dumps(cfg["training"][k]))
        console.print(table)
    if est:
        lines = [Text(f"peak {est['peak_vram_gib']:.2f} GiB per GPU (band {est['peak_vram_low_gib']:.2f}–"
                      f"{est['peak_vram_high_gib']:.2f})"
                      + ("" if est.get("fits") is None else f", fits: {est['fits']}, headroom "
                         f"{est['headroom_gib']:.2f} GiB") + f", max micro-batch {est.get('max_micro_batch')}")]
        bd = est.get("breakdown_gib") or {}
        lines.append(_breakdown_bar(bd, sum(bd.values())))
        legend = Text()
        for key, colour in BAR_COLOURS.items():
            legend.append(f"■ {key} {bd.get(key, 0):.2f}  ", style=colour)
        lines.append(legend)
        if est.get("train_hours") is not None:
            lines.append(Text(f"≈{est['tokens_per_s']:,.0f} tokens/s · {est['train_hours']:.2f} h"
                              + (f" · ${est['cost_usd']:,.2f}" if est.get("cost_usd") is not None else "")
                              + f" · {est.get('total_steps')} optimizer steps"
                              + (f" · strategy {est['strategy']}" if est.get("strategy") not in (None, "single") else "")))
        console.print(Panel(Group(*lines), title="Estimate", expand=False))

    reasons = Table(title="Why", expand=True)
    reasons.add_column("rule", style="bold", no_wrap=True)
    reasons.add_column("says", overflow="fold")
    reasons.add_column("source", overflow="fold", style="dim")
    for reason in r["reasons"]:
        reasons.add_row(reason["rule"], reason["says"], reason["source"])
    console.print(reasons)

    if r.get("alternatives"):
        alt = Table(title="Alternatives", expand=True)
        for col in ("method", "peak GiB", "hours", "$", "why not first"):
            alt.add_column(col, overflow="fold")
        for a in r["alternatives"]:
            e = a["estimate"]
            alt.add_row(a["method"], f"{e['peak_vram_gib']:.1f}",
                        "-" if e.get("train_hours") is None else f"{e['train_hours']:.2f}",
                        "-" if e.get("cost_usd") is None else f"{e['cost_usd']:.2f}", a["why_not_first"])
        console.print(alt)
    if r.get("rejected"):
        rej = Table(title="Rejected", expand=True)
        rej.add_column("method", no_wrap=True)
        rej.add_column("why", overflow="fold")
        for x in r["rejected"]:
            rej.add_row(x["method"], x["why"])
        console.print(rej)
    for note in r.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"[dim]{len(r.get('fired', []))} rules fired; {r.get('elapsed_ms')} ms[/]")


def register(app: typer.Typer) -> None:
    app.command("recommend", help="Which fine-tuning method and config for a model, data, task and hardware — "
                                  "with the estimate and the rules that decided it.")(recommend_command)
