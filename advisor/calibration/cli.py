"""`advisor calibrate [--methods a,b] [--quick] [--out PATH] [--json]` (registered in advisor/cli.py).

`advisor calibrate --from-jobs [--refit PROFILE] [--out PATH]` refits with finished training jobs instead of probing
(advisor/calibration/from_jobs.py).

Also runnable on its own: ``python -m advisor.calibration.cli --quick``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from advisor.cli_guard import guard
from advisor.errors import AdvisorInputError

console = Console()
err_console = Console(stderr=True)
MIB = 2**20


_guard = guard


@_guard
def calibrate_command(
    methods: Annotated[str | None, typer.Option(
        help="Comma-separated method ids to probe (default: all twelve).")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick",
        help="The small grid: one architecture, three points per method (about 1-2 minutes on CPU).")] = False,
    out: Annotated[Path | None, typer.Option(
        help="Where to write the profile (default: profiles/calibration/<cpu|cuda>-<device>.json).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables.")] = False,
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU only: torch threads for the probes (default: calibration/grid.yaml's cpu_threads, else all "
                    "cores); 1 gives stable timings on a busy shared machine.")] = None,
    refit: Annotated[Path | None, typer.Option(
        help="Fit again from this profile's probe table instead of probing (writes to --out, default: in place)."
    )] = None,
    repredict: Annotated[bool, typer.Option(
        "--repredict", help="With --refit: ask the current fast estimator again for every probe.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Go on from an interrupted calibration: keep the probes already measured (each finished "
                         "probe is appended to <out>.rows.jsonl while it runs) and run only the rest.")] = False,
    from_jobs: Annotated[bool, typer.Option(
        "--from-jobs", help="Refit the profile (--refit PATH, default the one estimates use here) with the measured "
                            "throughput/memory of succeeded training jobs (--methods filters them); no probing.")] = False,
) -> None:
    """Measure every method on this machine (CUDA if present, else CPU), fit the estimator's device terms and
    write a calibration profile; prints predicted vs measured on probes held out of the fit."""
    from advisor.calibration.run import calibrate, parse_methods

    parse_methods(methods)  # bad input fails before any work
    if from_jobs:
        if repredict:
            raise AdvisorInputError("--repredict", "does not apply with --from-jobs")
        from advisor.calibration.from_jobs import calibrate_from_jobs

        result = calibrate_from_jobs(methods=parse_methods(methods) if methods else None, base=refit, out=out)
        if as_json:
            payload = {**_json_result(result), **{k: result[k] for k in ("base_profile", "jobs", "jobs_summary",
                                                                          "skipped_jobs", "notes")}}
            sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
        else:
            render_jobs(result)
        return
    if refit is not None:
        from advisor.calibration.run import refit as run_refit

        if repredict and not as_json and err_console.is_terminal:
            with err_console.status("re-predicting every probe with the current estimator..."):
                result = run_refit(refit, out=out, repredict=True)
        else:
            result = run_refit(refit, out=out, repredict=repredict)
        if as_json:
            sys.stdout.write(json.dumps(_json_result(result), indent=2, default=str) + "\n")
        else:
            render(result)
        return
    elif repredict:
        raise AdvisorInputError("--repredict", "only applies with --refit PATH")
    if as_json:
        result = calibrate(methods=methods, quick=quick, out=out, threads=threads, resume=resume)
        sys.stdout.write(json.dumps(_json_result(result), indent=2, default=str) + "\n")
        return
    if not err_console.is_terminal:  # logs and CI: one line per probe instead of a bar that never redraws
        def log(done: int, total: int, label: str) -> None:
            err_console.print(f"[{done}/{total}] {label}", highlight=False, markup=False)

        result = calibrate(methods=methods, quick=quick, out=out, progress=log, threads=threads,
                           resume=resume)
        render(result)
        return
    columns = (TextColumn("[bold]calibrating[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task("starting", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label)

        result = calibrate(methods=methods, quick=quick, out=out, progress=progress, threads=threads,
                               resume=resume)
    render(result)


def _json_result(result: dict) -> dict:
    p = result["profile"]
    return {"profile_path": result["profile_path"], "wall_seconds": result["wall_seconds"], "grid": result["grid"],
            "device": p["device"], "status": p["status"], "overhead": p["overhead"], "band": p["band"],
            "throughput": {k: v for k, v in p["throughput"].items() if k != "fit"},
            "summary": result["summary"], "heldout": result["heldout"], "failures": p["calibration"]["failures"]}


def _short_how(how: str) -> str:
    if how.startswith("least squares: slope"):
        return "slope+intercept"
    if how.startswith("least squares through"):
        return "through origin"
    if how.startswith("median"):
        return "median (degenerate)"
    return how or "-"


def _pct(v) -> str:
    return "-" if v is None else f"{v * 100:+.2f}%"


def _abs_pct(v) -> str:
    return "-" if v is None else f"{abs(v) * 100:.2f}%"


def render(result: dict) -> None:
    p = result["profile"]
    cal = p["calibration"]
    console.print(f"[bold]{p['device']['name']}[/] · {result['grid']} grid · {cal['fit_split']['train']} training + "
                  f"{cal['fit_split']['heldout']} held-out probes ({cal['fit_split']['failed']} failed) · "
                  f"{result['wall_seconds']:.0f} s")
    console.print(f"[dim]held out: {cal['holdout']}[/]")
    table = Table(title="Held-out probes: predicted (fitted profile) vs measured")
    for col in ("method", "arch", "b", "s", "ckpt", "pred MiB", "meas MiB", "mem err", "pred ms", "meas ms",
                "time err"):
        table.add_column(col, justify="left" if col in ("method", "arch") else "right")
    for r in result["heldout"]:
        pred_t = r.get("predicted_step_seconds")
        table.add_row(r["method"], r["arch"], str(r["batch"]), str(r["seq"]), "on" if r["gc"] else "off",
                      f"{r['predicted_device_bytes'] / MIB:.3f}", f"{r['measured_device_bytes'] / MIB:.3f}",
                      _pct(r.get("memory_error")), "-" if pred_t is None else f"{pred_t * 1e3:.0f}",
                      f"{r['step_seconds'] * 1e3:.0f}", _pct(r.get("time_error")))
    console.print(table)
    tp = p["throughput"]
    fits = tp.get("fit", {})
    per = (cal["summary"].get("heldout") or {}).get("per_method", {})
    summary = Table(title="Per method: fitted rate and held-out errors")
    rate_col = "MFU" if p["device"]["kind"] == "cuda" else "GFLOP/s"
    for col in ("method", rate_col, "t0 ms", "fit", "held out", "max |mem err|", "median |time err|"):
        summary.add_column(col, justify="left" if col in ("method", "fit") else "right")
    for method, f in fits.items():
        if p["device"]["kind"] == "cuda":
            mfu = (tp.get("mfu_measured") or {}).get(method)
            rate = "-" if mfu is None else f"{mfu:.3f}"
        else:
            r = (tp.get("achieved_flops") or {}).get(method)
            rate = "-" if r is None else f"{r / 1e9:.3g}"
        h = per.get(method, {})
        summary.add_row(method, rate, f"{f.get('t0', 0) * 1e3:.0f}", _short_how(f.get("how", "")),
                        str(h.get("n", 0)), _abs_pct(h.get("memory_abs_error_max")),
                        _abs_pct(h.get("time_abs_error_median")))
    console.print(summary)
    held = cal["summary"].get("heldout") or {}
    o, b = p["overhead"], p["band"]
    console.print(f"memory overhead: context {o['context_bytes'] / MIB:.1f} MiB, allocator fraction "
                  f"{o['allocator_fraction']:.4f}; band [{_pct(b['low'])}, {_pct(b['high'])}]")
    if held.get("n"):
        console.print(f"held-out memory |error|: median {_abs_pct(held['memory_abs_error_median'])}, max "
                      f"{_abs_pct(held['memory_abs_error_max'])}; step time |error|: median "
                      f"{_abs_pct(held['time_abs_error_median'])}, p90 {_abs_pct(held['time_abs_error_p90'])}")
    for f in cal["failures"]:
        console.print(f"[yellow]failed:[/] {f['probe']}: {f['error']}")
    console.print(f"[green]wrote[/] {result['profile_path']}")
    console.print(f"[dim]{p['status']}[/]")


def render_jobs(result: dict) -> None:
    table = Table(title=f"Training jobs in the fit: error before (profile {result['base_profile']}) and after")
    for col in ("job", "method", "b", "s", "time err before", "time err after", "mem err before", "mem err after"):
        table.add_column(col, justify="left" if col in ("job", "method") else "right")
    for r in result["jobs"]:
        table.add_row(r["job"], r["method"], str(r["batch"]), str(r["seq"]), _pct(r["time_error_before"]),
                      _pct(r["time_error_after"]), _pct(r["memory_error_before"]), _pct(r["memory_error_after"]))
    console.print(table)
    s = result["jobs_summary"]
    console.print(f"{s['jobs']} jobs ({s['memory_rows']} with a comparable memory measurement): median |time error| "
                  f"{_abs_pct(s['time_abs_error_median_before'])} → {_abs_pct(s['time_abs_error_median_after'])}, "
                  f"median |memory error| {_abs_pct(s['memory_abs_error_median_before'])} → "
                  f"{_abs_pct(s['memory_abs_error_median_after'])}")
    for skip in result["skipped_jobs"]:
        console.print(f"[dim]skipped {skip['job']} ({skip['method']}): {skip['why']}[/]")
    for note in result["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"[green]wrote[/] {result['profile_path']}")


def main() -> None:  # pragma: no cover - `python -m advisor.calibration.cli`
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    typer.run(calibrate_command)


if __name__ == "__main__":  # pragma: no cover
    main()
