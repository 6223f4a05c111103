"""The `advisor` command line (Typer + rich). Bad input exits with code 2 and names the field."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from advisor.cli_guard import fit_status, guard
from advisor.errors import AdvisorInputError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="The fine-tuning advisor.")
console = Console()
err_console = Console(stderr=True)


_guard = guard


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _read_json_file(path: Path, field: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise AdvisorInputError(field, f"file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise AdvisorInputError(field, f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise AdvisorInputError(field, f"{path} must hold a JSON object")
    return data


def _knobs(items: list[str], option: str) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is read as JSON (numbers, true/false, lists) when it parses, else kept as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise AdvisorInputError(option, f"expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


# ----------------------------------------------------------------------------- service
@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1 keeps it local).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Start the REST API (OpenAPI docs at /docs)."""
    import uvicorn

    uvicorn.run("advisor.api.app:create_app", factory=True, host=host, port=port, log_level=log_level)


# ----------------------------------------------------------------------------- catalogs
@app.command()
def hardware(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the GPU catalog."""
    from advisor.catalog.gpus import gpu_table

    rows = gpu_table()
    if as_json:
        return _print_json(rows)
    table = Table(title=f"GPU catalog ({len(rows)})")
    for col in ("id", "name", "tier", "usable GiB", "bf16 TFLOPS", "GB/s", "$/h"):
        table.add_column(col, justify="right" if col[0].isdigit() or col in ("usable GiB", "bf16 TFLOPS", "GB/s", "$/h") else "left")
    for r in rows:
        table.add_row(r["id"], r["name"], r["tier"], f"{r['usable_memory_gib']:.1f}",
                      "-" if r.get("bf16_tflops") is None else f"{r['bf16_tflops']:g}",
                      f"{r['memory_bandwidth_gbs']:g}", "-" if r.get("usd_per_hour") is None else f"{r['usd_per_hour']:.2f}")
    console.print(table)


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the model catalog (parameter counts computed from each architecture)."""
    from advisor.catalog.models import model_table

    rows = model_table()
    if as_json:
        return _print_json(rows)
    table = Table(title=f"Model catalog ({len(rows)})")
    for col in ("id", "family", "kind", "params", "layers", "hidden", "vocab", "max pos"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["id"], str(r["family"]), r["kind"], f"{r['params'] / 1e9:.2f}B", str(r["layers"]),
                      str(r["hidden"]), str(r["vocab"]), str(r.get("max_positions") or "-"))
    console.print(table)


@app.command()
def methods(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Describe the twelve fine-tuning methods with their seed-derived defaults (and `peft`: any other PEFT type)."""
    from advisor.methods import all_methods

    rows = [m.describe() for m in all_methods(extra=True)]
    if as_json:
        return _print_json(rows)
    table = Table(title="Fine-tuning methods")
    for col in ("id", "name", "applies to", "defaults", "summary"):
        table.add_column(col, overflow="fold")
    for r in rows:
        defaults = ", ".join(f"{k}={v}" for k, v in r["defaults"]["peft"].items() if v is not None)
        table.add_row(r["id"], r["name"], ", ".join(r["applies_to"]), defaults, r["summary"])
    console.print(table)


@app.command()
@_guard
def knobs(
    section: Annotated[str | None, typer.Argument(help="training or quantization (default: both).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Describe every config.training and config.quantization knob (each method's config.peft: `advisor methods`)."""
    from advisor.config import config_reference

    ref = config_reference()
    if section is not None and section not in ref:
        raise AdvisorInputError("section", f"unknown section {section!r}", allowed=sorted(ref))
    ref = {section: ref[section]} if section else ref
    if as_json:
        return _print_json(ref)
    for name, rows in ref.items():
        table = Table(title=f"config.{name}")
        for col in ("knob", "type", "default", "allowed / limits", "description"):
            table.add_column(col, overflow="fold")
        for r in rows:
            bounds = ", ".join(map(str, r["allowed"])) if "allowed" in r else ", ".join(
                f"{op} {v}" for op, v in r.get("limits", {}).items())
            table.add_row(r["name"], r["type"], json.dumps(r["default"]), bounds, r["description"] or "")
        console.print(table)


@app.command("demo-assets")
@_guard
def demo_assets(directory: Annotated[Path, typer.Argument(help="Where to write the tiny models and datasets.")]) -> None:
    """Write tiny local models (random weights, local tokenizer) and sample datasets for offline use."""
    from advisor.demo import write_demo_assets

    written = write_demo_assets(directory)
    for name, path in written.items():
        console.print(f"[green]wrote[/] {name}: {path}")


# ----------------------------------------------------------------------------- estimate
@app.command()
@_guard
def estimate(
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Estimate request JSON (CONTRACT.md).")] = None,
    model: Annotated[str | None, typer.Option(help="Model id, alias or local directory.")] = None,
    method: Annotated[str | None, typer.Option(help="Method id.")] = None,
    gpu: Annotated[str | None, typer.Option(help="GPU name, 'none' or 'auto'.")] = None,
    count: Annotated[int, typer.Option(help="Number of GPUs.")] = 1,
    batch: Annotated[int | None, typer.Option(help="Micro-batch per device.")] = None,
    seq: Annotated[int | None, typer.Option(help="Sequence length (tokens).")] = None,
    checkpointing: Annotated[bool | None, typer.Option("--checkpointing/--no-checkpointing")] = None,
    cross_entropy: Annotated[str | None, typer.Option(
        "--cross-entropy", help="standard, chunked (torchtune) or fused_linear (Liger Kernel).")] = None,
    optim: Annotated[str | None, typer.Option("--optim", help="Optimizer (config.training.optim).")] = None,
    in_backward: Annotated[bool, typer.Option(
        "--optimizer-in-backward", help="Step each parameter inside backward (no gradient buffer; sets "
                                        "accumulation 1 and no clipping).")] = False,
    compiled: Annotated[bool, typer.Option(
        "--torch-compile", help="Compile each block with torch.compile (config.training.torch_compile).")] = False,
    offload_activations: Annotated[bool, typer.Option(
        "--activation-offloading", help="Saved activations wait in host memory until backward "
                                        "(config.training.activation_offloading).")] = False,
    peft: Annotated[list[str] | None, typer.Option(
        "--peft", help="A method knob as KEY=VALUE (config.peft; repeatable; VALUE is JSON when it parses, else a "
                       "string), e.g. --peft r=32 --peft use_dora=true --peft 'modules_to_save=[\"lm_head\"]'.")] = None,
    training_knobs: Annotated[list[str] | None, typer.Option(
        "--training", help="Any config.training knob as KEY=VALUE (repeatable; `advisor knobs training` lists them), "
                           "e.g. --training gradient_checkpointing_reentrant=true.")] = None,
    quantization_knobs: Annotated[list[str] | None, typer.Option(
        "--quantization", help="Any config.quantization knob as KEY=VALUE (repeatable; `advisor knobs "
                               "quantization`), e.g. --quantization bitsandbytes_version=0.41.1.")] = None,
    load_in_8bit: Annotated[bool, typer.Option(
        "--load-in-8bit", help="qlora: the base in 8-bit LLM.int8() instead of 4-bit NF4 "
                               "(config.quantization.load_in_8bit).")] = False,
    gptq: Annotated[int | None, typer.Option(
        "--gptq", help="qlora: the base is a GPTQ checkpoint of this many bits (config.quantization.quant_method "
                       "'gptq', group size 128 unless --file says otherwise).")] = None,
    exact: Annotated[bool, typer.Option("--exact", help="Simulate the real step on fake tensors (seconds).")] = False,
    strategy: Annotated[str | None, typer.Option(help="Multi-GPU strategy: ddp, zero2, zero3, zero2_offload, "
                                                       "zero3_offload, zero3_offload_params (fsdp_grad_op, "
                                                       "fsdp_full_shard, fsdp_offload).")] = None,
    compare_gpus: Annotated[bool, typer.Option("--compare-gpus", help="Rank every catalog GPU × 1/2/4/8 by cost.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Peak memory (with breakdown), fit and, when calibrated, time and cost of a training config."""
    from advisor.schemas import EstimateRequest, parse

    body: dict[str, Any] = _read_json_file(file, "--file") if file else {}
    if model:
        body["model"] = model
    if method:
        body["method"] = method
    if gpu:
        body["hardware"] = {**body.get("hardware", {}), "gpu": gpu}
    if count != 1 or "hardware" in body:
        body.setdefault("hardware", {})
        if count != 1:
            body["hardware"]["count"] = count
    training = {**((body.get("config") or {}).get("training") or {}), **_knobs(training_knobs or [], "--training")}
    for key, value in (("per_device_train_batch_size", batch), ("max_seq_length", seq),
                       ("gradient_checkpointing", checkpointing), ("cross_entropy", cross_entropy),
                       ("optim", optim)):
        if value is not None:
            training[key] = value
    if in_backward:  # what the option needs, unless the file says otherwise (then its error names the field)
        training.update(optimizer_in_backward=True, **{k: v for k, v in (("gradient_accumulation_steps", 1),
                                                                          ("max_grad_norm", 0))
                                                       if k not in training})
    if offload_activations:
        training["activation_offloading"] = True
    if compiled:
        training["torch_compile"] = True
    if training:
        body["config"] = {**(body.get("config") or {}), "training": training}
    if peft:
        body["config"] = {**(body.get("config") or {}),
                          "peft": {**((body.get("config") or {}).get("peft") or {}), **_knobs(peft, "--peft")}}
    if quantization_knobs:
        config = body.get("config") or {}
        body["config"] = {**config, "quantization": {**(config.get("quantization") or {}),
                                                     **_knobs(quantization_knobs, "--quantization")}}
    if load_in_8bit:
        config = body.get("config") or {}
        body["config"] = {**config, "quantization": {**(config.get("quantization") or {}), "load_in_8bit": True}}
    if gptq is not None:
        config = body.get("config") or {}
        body["config"] = {**config, "quantization": {**(config.get("quantization") or {}), "quant_method": "gptq",
                                                     "bits": gptq}}
    if exact:
        body["exact"] = True
    if "hardware" not in body and compare_gpus:
        body["hardware"] = {"gpu": "h100-sxm"}
    req = parse(EstimateRequest, body)
    if compare_gpus:
        from advisor.estimator.fast import compare_gpus as rank_gpus

        with fit_status(console, "fitting the memory model for this architecture and method..."):
            rows = rank_gpus(req)
        if as_json:
            return _print_json(rows)
        return _render_comparison(rows)
    from advisor.estimator.service import run_estimate

    with fit_status(console, "simulating the training step on fake tensors..." if req.exact else "estimating..."):
        result = run_estimate(req, strategy=strategy)
    if as_json:
        return _print_json(result)
    _render_estimate(result)


def _render_comparison(rows: list[dict]) -> None:
    table = Table(title="GPUs ranked by cost for this job")
    for col in ("gpu", "count", "fits", "peak GiB", "strategy", "max micro-batch", "tokens/s", "hours", "$"):
        table.add_column(col, justify="left" if col in ("gpu", "strategy") else "right")
    for r in rows:
        fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
        table.add_row(r["gpu"], str(r["count"]), "[green]yes[/]" if r["fits"] else "[red]no[/]", fmt(r["peak_vram_gib"]),
                      r["strategy"], str(r["max_micro_batch"]), fmt(r["tokens_per_s"], "{:.0f}"),
                      fmt(r["train_hours"]), fmt(r["cost_usd"]))
    console.print(table)


def _render_estimate(result: dict) -> None:
    hw = result.get("hardware", {})
    fits = result.get("fits")
    verdict = "[green]fits[/]" if fits else ("[red]does not fit[/]" if hw.get("usable_memory_gib") else "[yellow]no GPU[/]")
    console.print(
        f"[bold]{result['model']}[/] · [bold]{result['method']}[/]"
        f"{' (' + str((result.get('config') or {}).get('peft', {}).get('peft_type')) + ')' if result['method'] == 'peft' else ''}"
        f" · micro-batch {result['micro_batch']} × "
        f"{result['seq_len']} tokens on {hw.get('name')} ×{hw.get('count', 1)}"
    )
    band = ""
    if result.get("peak_vram_low_gib") is not None:
        band = f" (band {result['peak_vram_low_gib']:.2f}–{result['peak_vram_high_gib']:.2f})"
    console.print(f"peak [bold]{result['peak_vram_gib']:.2f} GiB[/]{band} — {verdict}"
                  + (f", headroom {result['headroom_gib']:.2f} GiB" if result.get("headroom_gib") is not None else ""))
    if result.get("paged_optimizer_gib"):
        console.print(f"paged optimizer state {result['paged_optimizer_gib']:.2f} GiB in CUDA unified memory: it pages "
                      "to CPU RAM when the GPU is full, so the fit is judged without it (see the note)")
    table = Table(show_header=True)
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("")
    peak = max(result["peak_vram_gib"], sum(result["breakdown_gib"].values()), 1e-9)
    for key, value in result["breakdown_gib"].items():
        table.add_row(key, f"{value:.3f}", "█" * int(round(30 * value / peak)))
    console.print(table)
    for key in ("max_micro_batch", "tokens_per_s", "train_hours", "cost_usd"):
        if result.get(key) is not None:
            console.print(f"{key}: {result[key]}")
    alloc = result.get("allocator")
    if alloc:  # exact GPU estimate: the caching allocator's reserve from the replayed step
        console.print(f"allocator (replayed): reserved {alloc['reserved_peak_bytes'] / 2**30:.2f} GiB = allocated "
                      f"{alloc['allocated_peak_bytes'] / 2**30:.2f} GiB + {alloc['slack_bytes'] / 2**30:.2f} GiB cached "
                      f"in {alloc['segments']} segments; + context {alloc['context_bytes'] / 2**30:.2f} GiB")
    for key, value in result.get("provenance", {}).items():
        console.print(f"[dim]{key}: {value}[/]")
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def _register_calibrate() -> None:
    from advisor.calibration.cli import calibrate_command

    app.command("calibrate", help="Probe every method on this device, fit the estimator's device terms, write a profile.")(
        calibrate_command)


_register_calibrate()

# Command groups that live next to their feature (each module has `register(app)`): recommend, export, train,
# merge, jobs. A module not yet present is skipped only while it is being built; every one ships.
SUBCOMMAND_MODULES = ("advisor.recommend.cli", "advisor.export.cli", "advisor.train.cli", "advisor.jobs.cli")


def _register_subcommands() -> None:
    import importlib
    import importlib.util

    for name in SUBCOMMAND_MODULES:
        try:
            present = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            present = False
        if present:
            importlib.import_module(name).register(app)


_register_subcommands()


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
