"""`advisor train PLAN` and `advisor jobs list|show|cancel|resume` (registered by advisor/cli.py via `register`).

    advisor train rec.json --model ./tiny-llama --dataset data/alpaca.jsonl      # a recommendation
    advisor train plan.json                                                      # a job body, or an earlier run's
                                                                                 # output_dir/plan.json
    advisor train scenario.json --dataset data/train.jsonl                       # a scenario: recommended first
    advisor train plan.json --server http://127.0.0.1:8000                       # submit to a running API
    advisor jobs list | show ID | cancel ID | resume ID                          # local database or --server

Locally the job is recorded in the same database the API uses (ADVISOR_DB_URL, default a SQLite file under the
data root) and runs in the foreground in a worker process, with a progress bar (loss, tokens/s, peak memory, ETA).
Ctrl-C cancels it (the trainer saves a checkpoint first; `advisor jobs resume ID` continues it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from advisor.cli_guard import guard
from advisor.errors import AdvisorInputError

console = Console()
err_console = Console(stderr=True)

TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")
JOB_KEYS = ("model", "method", "config", "dataset", "output_dir", "recommendation", "max_steps", "save_total_limit",
            "estimate", "strategy", "num_processes", "name")

ServerOpt = Annotated[str | None, typer.Option("--server", help="URL of a running `advisor serve` (default: run "
                                                                "locally on this machine's database).")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="ADVISOR_API_TOKEN",
                                              help="Bearer token for --server (default: $ADVISOR_API_TOKEN).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables and progress bars.")]


# --------------------------------------------------------------------------- the plan
def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise AdvisorInputError("PLAN", f"file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise AdvisorInputError("PLAN", f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None


def plan_kind(plan: dict) -> str:
    """recommendation | job (a CONTRACT job body or an `advisor export` plan) | scenario."""
    if "decision" in plan or ("reasons" in plan and "method" in plan and "config" in plan):
        return "recommendation"
    if "method" in plan or "recommendation" in plan:
        return "job"
    if "hardware" in plan and "model" in plan:
        return "scenario"
    raise AdvisorInputError("PLAN", "not a recommendation (decision, method, config), a job/export plan (model, "
                                    "method, config, dataset) or a scenario (model, hardware, dataset)")


def body_from_plan(plan: Any, *, model: str | None = None, dataset: str | None = None, fmt: str | None = None,
                   output_dir: str | None = None, max_steps: int | None = None) -> tuple[dict, list[str]]:
    """The POST /v1/jobs body for a plan file and the command-line overrides; notes to show the user."""
    if not isinstance(plan, dict):
        raise AdvisorInputError("PLAN", "expected a JSON object")
    notes: list[str] = []
    if isinstance(plan.get("job"), dict) and "method" in plan["job"]:  # a training output's plan.json: train it again
        plan = {k: v for k, v in plan["job"].items() if k != "output_dir"}
        notes.append("the plan of an earlier training run (a new output directory)")
    kind = plan_kind(plan)
    if kind == "scenario":
        if not dataset and not (isinstance(plan.get("dataset"), dict) and plan["dataset"].get("path")):
            raise AdvisorInputError("--dataset", "a scenario needs the training data: --dataset PATH")
        try:
            from advisor.recommend import recommend
        except ImportError:
            raise AdvisorInputError("PLAN", "turning a scenario into a plan needs advisor.recommend, which this "
                                            "installation lacks; pass a recommendation or an export plan") from None
        rec = recommend(plan)
        if not isinstance(rec, dict):
            rec = rec.model_dump() if hasattr(rec, "model_dump") else dict(rec)
        if rec.get("decision") != "fine_tune":
            raise AdvisorInputError("PLAN", f"the advisor recommends {rec.get('decision')!r} for this scenario, not "
                                            "fine-tuning: nothing to train")
        if not rec.get("method"):
            why = "; ".join(sorted({r.get("why", "") for r in rec.get("rejected") or []}))[:500]
            raise AdvisorInputError("PLAN", f"no method is feasible for this scenario ({why or 'see advisor recommend'})")
        notes.append(f"recommended: {rec['method']}")
        body = {"recommendation": rec, "model": plan["model"] if isinstance(plan["model"], str) else None}
        ds = plan.get("dataset") or {}
        if isinstance(ds, dict) and ds.get("path"):
            body["dataset"] = {"path": ds["path"], "format": ds.get("format", "auto")}
    elif kind == "recommendation":
        body = {"recommendation": plan}
        if isinstance(plan.get("model"), str):
            body["model"] = plan["model"]
    else:
        body = {k: v for k, v in plan.items() if k in JOB_KEYS}
        dropped = sorted(set(plan) - set(JOB_KEYS))
        if dropped:
            notes.append(f"not part of a job, ignored: {', '.join(dropped)}")
        if isinstance(body.get("recommendation"), dict) and body.get("model") is None \
                and isinstance(body["recommendation"].get("model"), str):
            body["model"] = body["recommendation"]["model"]
    if model:
        body["model"] = model
    if dataset:
        current = body.get("dataset") if isinstance(body.get("dataset"), dict) else {}
        body["dataset"] = {**current, "path": dataset}
    if fmt:
        current = body.get("dataset") if isinstance(body.get("dataset"), dict) else {}
        body["dataset"] = {**current, "format": fmt}
    if output_dir:
        body["output_dir"] = output_dir
    if max_steps:
        body["max_steps"] = max_steps
    if not body.get("model"):
        raise AdvisorInputError("--model", "the plan names no model: pass --model (a local directory or hub id)")
    if not body.get("dataset"):
        raise AdvisorInputError("--dataset", "the plan names no training data: pass --dataset PATH")
    return body, notes


def _dataset_path(body: dict) -> str | None:
    ds = body.get("dataset")
    return ds if isinstance(ds, str) else ds.get("path") if isinstance(ds, dict) else None


def import_local_dataset(body: dict, notes: list[str]) -> dict:
    """A local file outside the data root is copied in (checked like an upload); jobs only read under the root."""
    from advisor.jobs import datasets
    from advisor.jobs.service import data_root

    path = _dataset_path(body)
    if not path:
        return body
    local = Path(path).expanduser()
    root = data_root()
    under_root = (root / local).resolve() if not local.is_absolute() else local.resolve()
    if under_root.is_relative_to(root) and under_root.exists():
        return body
    if not local.is_file():
        return body  # the job's validation names the problem
    real = local.resolve()
    if real.is_relative_to(root):
        return _with_path(body, str(real))
    datasets.extension_of(local.name)  # a supported file type, before copying anything
    tmp = datasets.datasets_dir() / f".incoming-{os.getpid()}-{time.time_ns()}"
    shutil.copyfile(real, tmp)
    fmt = (body.get("dataset") or {}).get("format", "auto") if isinstance(body.get("dataset"), dict) else "auto"
    record = datasets.store_upload(tmp, local.name, fmt or "auto")
    notes.append(f"copied {local} into the data root: {record.path} ({record.rows} rows, {record.format})")
    return _with_path(body, record.path)


def _with_path(body: dict, path: str) -> dict:
    ds = body.get("dataset")
    return {**body, "dataset": {**(ds if isinstance(ds, dict) else {}), "path": path}}


# --------------------------------------------------------------------------- progress
class ProgressView:
    """Renders job events: a bar with loss, tokens/s, peak memory and ETA, and a line for everything else."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task = None
        self.last_status: str | None = None
        self.final: dict | None = None

    def __enter__(self):
        if not self.quiet:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss [cyan]{task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("peak {task.fields[peak]} GiB"), TextColumn("ETA {task.fields[eta]}"),
                TimeElapsedColumn(), console=err_console, transient=False)
            self.progress.__enter__()
            self.task = self.progress.add_task("queued", total=None, loss="-", tps="-", peak="-", eta="-")
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def line(self, text: str) -> None:
        if self.quiet:
            return
        (self.progress.console if self.progress else err_console).print(text, highlight=False)

    def event(self, kind: str, ev: dict) -> None:
        p, task = self.progress, self.task
        if kind == "status":
            self.last_status = ev.get("status")
            if p is not None:
                p.update(task, description=self.last_status)
            extra = ev.get("error") or ev.get("reason") or ""
            if self.last_status in TERMINAL or extra:
                self.line(f"[bold]{self.last_status}[/]" + (f": {extra}" if extra else ""))
        elif kind == "start":
            if p is not None:
                p.update(task, total=ev.get("total_steps"), description="training")
            pred = ev.get("predicted") or {}
            predicted = f", predicted peak {pred['peak_vram_gib']:.3f} GiB" if pred.get("peak_vram_gib") else ""
            resumed = f", resumed from step {ev['resumed_from']}" if ev.get("resumed_from") else ""
            self.line(f"{ev.get('method', '')} on {ev.get('device')}: {ev.get('num_train')} training / "
                      f"{ev.get('num_val')} validation examples, micro-batch {ev.get('micro_batch')} × "
                      f"{ev.get('grad_accum')}, {ev.get('total_steps')} steps{predicted}{resumed}")
        elif kind == "step" and p is not None:
            eta = ev.get("eta_s")
            p.update(task, completed=ev.get("step"), total=ev.get("total_steps"),
                     loss=_fmt(ev.get("loss"), "{:.4f}"), tps=_fmt(ev.get("tokens_per_s"), "{:.0f}"),
                     peak=_fmt(ev.get("peak_memory_gib"), "{:.3f}"),
                     eta="-" if eta is None else time.strftime("%H:%M:%S", time.gmtime(max(0, eta))))
        elif kind == "eval":
            self.line(f"step {ev.get('step')}: eval loss {_fmt(ev.get('eval_loss'), '{:.4f}')}, perplexity "
                      f"{_fmt(ev.get('perplexity'), '{:.2f}')}")
        elif kind == "checkpoint":
            self.line(f"[dim]checkpoint {ev.get('path')}[/]")
        elif kind == "oom_retry":
            self.line(f"[yellow]out of memory at step {ev.get('step')}: retrying from the last checkpoint with "
                      f"micro-batch {ev.get('micro_batch')} × {ev.get('grad_accum')}[/]")
        elif kind == "cancel_requested":
            self.line("cancelling: the trainer saves a checkpoint at the end of this step")
        elif kind == "log":
            self.line(f"[dim]{ev.get('message')}[/]")


def _fmt(v, pattern: str) -> str:
    return "-" if v is None else pattern.format(v)


# --------------------------------------------------------------------------- local runs
def run_local(job_id: str, view: ProgressView, after: int = 0) -> dict:
    """Run a job this process has claimed (status running, runner cli) in a worker, following its events."""
    from advisor.jobs import service
    from advisor.jobs.queue import fail_if_still_running, spawn_worker, worker_log_path
    from advisor.jobs.store import JobStore

    store = JobStore()
    job = service.get(job_id, store)
    log_path = worker_log_path(job)
    proc = spawn_worker(job, store, log_path=log_path)
    cursor = after
    interrupted_at = None
    while True:
        try:
            for ev in store.events_after(job_id, cursor):
                cursor = ev.seq
                view.event(ev.type, ev.payload or {})
            if proc.poll() is not None:
                fail_if_still_running(store, job_id, proc.returncode, log_path)
                for ev in store.events_after(job_id, cursor):
                    cursor = ev.seq
                    view.event(ev.type, ev.payload or {})
                break
            time.sleep(0.2)
        except KeyboardInterrupt:
            if interrupted_at is not None and time.time() - interrupted_at < 5:
                proc.kill()  # a second Ctrl-C: stop now (the job stays resumable from its last checkpoint)
                continue
            interrupted_at = time.time()
            try:
                service.cancel(job_id, store)
            except service.JobStateError:
                pass
            view.line("cancelling (Ctrl-C again to kill the worker at once)")
    return service.describe(service.get(job_id, store), store)


def _claim_and_run(job_id: str, view: ProgressView, allowed_from: tuple[str, ...]) -> dict:
    from advisor.jobs import service
    from advisor.jobs.store import JobStore

    store = JobStore()
    job = service.get(job_id, store)
    changed, job = store.claim(job_id, "cli", allowed_from=allowed_from)
    if not changed:
        raise service.JobStateError(f"job {job_id} is {job.status}; only an interrupted, cancelled or failed job "
                                    "can be resumed")
    return run_local(job_id, view, after=job.last_event_id - 1)


# --------------------------------------------------------------------------- a server
def _reachable(fn):
    """A server that cannot be reached: one line on stderr and exit code 1, not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import httpx

        try:
            return fn(*args, **kwargs)
        except httpx.TransportError as err:
            err_console.print(f"[bold red]error:[/] cannot reach the server: {err}", highlight=False)
            raise typer.Exit(code=1) from None

    return wrapper


def _client(server: str, token: str | None):
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=httpx.Timeout(60, read=None))


def _check(response) -> Any:
    if response.status_code >= 400:
        try:
            body = response.json()
            detail = body.get("detail", body)
            field = body.get("field")
        except ValueError:
            detail, field = response.text, None
        if response.status_code == 422:
            raise AdvisorInputError(field or "request", str(detail).removeprefix(f"{field}: ") if field else str(detail))
        err_console.print(f"[bold red]error:[/] HTTP {response.status_code}: {detail}", highlight=False)
        raise typer.Exit(code=1)
    return response.json()


def sse_events(client, job_id: str, after: int = 0) -> Iterator[tuple[int, str, dict]]:
    """(id, type, payload) from GET /v1/jobs/{id}/events, reconnecting with Last-Event-ID until the job ends."""
    import httpx

    cursor, failures = after, 0
    while True:
        finished = False
        try:
            headers = {"Last-Event-ID": str(cursor)} if cursor else {}
            with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    _check(response)
                failures = 0
                seq, kind, data = None, "message", []
                for line in response.iter_lines():
                    if line == "":
                        if data:
                            payload = json.loads("\n".join(data))
                            if seq is not None:
                                cursor = seq
                            yield cursor, kind, payload
                            if kind == "status" and payload.get("status") in TERMINAL:
                                finished = True
                        seq, kind, data = None, "message", []
                    elif line.startswith(":"):
                        continue
                    else:
                        name, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if name == "id":
                            seq = int(value)
                        elif name == "event":
                            kind = value
                        elif name == "data":
                            data.append(value)
        except httpx.TransportError:
            failures += 1
            if failures > 30:
                raise
            time.sleep(1.0)
            continue
        if finished:
            return
        status = _check(client.get(f"/v1/jobs/{job_id}"))["status"]
        if status in TERMINAL:
            return
        time.sleep(0.5)


def follow_server(client, job_id: str, view: ProgressView, after: int = 0) -> dict:
    try:
        for _seq, kind, payload in sse_events(client, job_id, after):
            view.event(kind, payload)
    except KeyboardInterrupt:
        view.line(f"stopped following; the job goes on (advisor jobs cancel {job_id} --server ...)")
    return _check(client.get(f"/v1/jobs/{job_id}"))


def _upload_if_local(client, body: dict, notes: list[str]) -> dict:
    path = _dataset_path(body)
    if not path or not Path(path).expanduser().is_file():
        return body  # a path on the server (under its data root)
    local = Path(path).expanduser()
    ds = body.get("dataset") if isinstance(body.get("dataset"), dict) else {}
    with open(local, "rb") as fh:
        record = _check(client.post("/v1/datasets", files={"file": (local.name, fh)},
                                    data={"format": ds.get("format", "auto") or "auto"}))
    notes.append(f"uploaded {local}: {record['path']} ({record['rows']} rows, {record['format']})")
    return _with_path(body, record["path"])


# --------------------------------------------------------------------------- output
def _summary(job: dict) -> None:
    m = job.get("metrics") or {}
    console.print(f"[bold]{job['id']}[/] {job['status']} · {job.get('method')} · step {job.get('step')}/"
                  f"{job.get('total_steps')} · {job.get('output_dir')}")
    if job.get("error"):
        console.print(f"[red]{job['error']}[/]", highlight=False)
    parts = [f"{k} {_fmt(m.get(k), '{:.4g}')}" for k in ("loss", "eval_loss", "perplexity", "tokens_per_s",
                                                         "peak_vram_gib") if m.get(k) is not None]
    if parts:
        console.print(" · ".join(parts))
    cmp_ = job.get("predicted_vs_measured") or {}
    for key, row in cmp_.items():
        if key == "peak_memory":
            console.print(f"peak memory: predicted {row['predicted_gib']:.4f} GiB, measured {row['measured_gib']:.4f} "
                          f"GiB ({row['relative_error'] * 100:+.1f}%)")
            if row.get("note"):
                console.print(f"[dim]  {row['note']}[/]")
        elif key == "tokens_per_s" and row.get("predicted"):
            console.print(f"tokens/s: predicted {row['predicted']:.0f}, measured {row['measured']:.0f} "
                          f"({row['relative_error'] * 100:+.1f}%)")
    for r in job.get("oom_retries") or []:
        console.print(f"[yellow]OOM retry at step {r.get('step')}: micro-batch {r.get('previous_micro_batch')} → "
                      f"{r.get('micro_batch')}[/]")


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _exit_code(job: dict) -> int:
    return {"succeeded": 0, "cancelled": 130, "interrupted": 130}.get(job["status"], 1)


# --------------------------------------------------------------------------- commands
@guard
@_reachable
def train_command(
    plan: Annotated[Path, typer.Argument(help="A recommendation JSON, an `advisor export` plan (or a POST /v1/jobs "
                                              "body), or a scenario (with --dataset).")],
    dataset: Annotated[str | None, typer.Option(help="Training data (JSONL/JSON/CSV/Parquet); a local file outside "
                                                     "the data root is copied in (or uploaded with --server).")] = None,
    model: Annotated[str | None, typer.Option(help="Model directory or hub id (a recommendation names none).")] = None,
    data_format: Annotated[str | None, typer.Option("--format", help="auto | alpaca | chat | completion | text")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Under the data root (default data_root/jobs/<id>/).")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many optimizer steps.")] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    detach: Annotated[bool, typer.Option("--detach", help="With --server: submit and print the id, do not follow.")]
    = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a plan: record a job and run it here with a progress bar (or submit it to --server and follow it)."""
    body, notes = body_from_plan(_read_json(plan), model=model, dataset=dataset, fmt=data_format,
                                 output_dir=output_dir, max_steps=max_steps)
    if server:
        with _client(server, token) as client:
            body = _upload_if_local(client, body, notes)
            job = _check(client.post("/v1/jobs", json=body))
            for note in notes:
                err_console.print(f"[dim]{note}[/]", highlight=False)
            err_console.print(f"job [bold]{job['id']}[/] queued on {server}", highlight=False)
            if detach:
                return _print_json(job) if as_json else console.print(job["id"])
            with ProgressView(quiet=as_json) as view:
                final = follow_server(client, job["id"], view)
    else:
        from advisor.jobs import service

        body = import_local_dataset(body, notes)
        job = service.submit(body, runner="cli", status="running")
        for note in notes:
            err_console.print(f"[dim]{note}[/]", highlight=False)
        err_console.print(f"job [bold]{job.id}[/] → {job.output_dir}", highlight=False)
        with ProgressView(quiet=as_json) as view:
            final = run_local(job.id, view)
    if as_json:
        _print_json(final)
    else:
        _summary(final)
    raise typer.Exit(code=_exit_code(final))


jobs_app = typer.Typer(no_args_is_help=True, add_completion=False, help="List, inspect, cancel and resume jobs.")


@jobs_app.command("list")
@guard
@_reachable
def list_command(status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
                 limit: Annotated[int, typer.Option(min=1)] = 50, server: ServerOpt = None, token: TokenOpt = None,
                 as_json: JsonOpt = False) -> None:
    """Jobs, newest first."""
    from advisor.jobs.db import STATUSES

    if status is not None and status not in STATUSES:
        raise AdvisorInputError("--status", f"unknown status {status!r}", allowed=STATUSES)
    if server:
        with _client(server, token) as client:
            params: dict[str, Any] = {"limit": limit}
            if status:
                params["status"] = status
            rows = _check(client.get("/v1/jobs", params=params))
    else:
        from advisor.jobs import service
        from advisor.jobs.store import JobStore

        rows = [service.describe(j) for j in JobStore().list(status, limit)]
    if as_json:
        return _print_json(rows)
    from rich import box

    table = Table(title=f"Jobs ({len(rows)})", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for col in ("id", "status", "method", "step", "loss", "tok/s", "peak GiB"):
        table.add_column(col, no_wrap=True, min_width=22 if col == "id" else None,
                         justify="right" if col in ("step", "loss", "tok/s", "peak GiB") else "left")
    for r in rows:
        m = r.get("metrics") or {}
        table.add_row(r["id"], r["status"], str(r.get("method")), f"{r.get('step')}/{r.get('total_steps') or '?'}",
                      _fmt(m.get("loss"), "{:.3f}"), _fmt(m.get("tokens_per_s"), "{:.0f}"),
                      _fmt(m.get("peak_vram_gib"), "{:.3f}"))
    console.print(table)


@jobs_app.command("show")
@guard
@_reachable
def show_command(job_id: Annotated[str, typer.Argument(help="The job id.")], server: ServerOpt = None,
                 token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Status, progress, metrics and predicted vs measured of one job."""
    job = _get(job_id, server, token)
    if as_json:
        return _print_json(job)
    _summary(job)


@jobs_app.command("cancel")
@guard
@_reachable
def cancel_command(job_id: Annotated[str, typer.Argument(help="The job id.")], server: ServerOpt = None,
                   token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Cancel a queued or running job (a running one checkpoints first, so it can be resumed)."""
    if server:
        with _client(server, token) as client:
            job = _check(client.post(f"/v1/jobs/{job_id}/cancel"))
    else:
        from advisor.jobs import service
        from advisor.jobs.store import JobStore

        store = JobStore()
        job = _local(lambda: service.describe(service.cancel(job_id, store), store))
    if as_json:
        return _print_json(job)
    console.print(f"{job_id}: {'cancel requested' if job['status'] == 'running' else job['status']}")


@jobs_app.command("resume")
@guard
@_reachable
def resume_command(job_id: Annotated[str, typer.Argument(help="The job id.")], server: ServerOpt = None,
                   token: TokenOpt = None,
                   queue: Annotated[bool, typer.Option("--queue", help="Locally: queue it for a running server "
                                                                       "instead of running it here.")] = False,
                   follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Follow its progress.")] = True,
                   as_json: JsonOpt = False) -> None:
    """Resume an interrupted, cancelled or failed job from its newest checkpoint."""
    from advisor.jobs import service

    if server:
        with _client(server, token) as client:
            job = _check(client.post(f"/v1/jobs/{job_id}/resume"))
            if follow:
                with ProgressView(quiet=as_json) as view:
                    job = follow_server(client, job_id, view, after=job["last_event_id"] - 1)
    elif queue:
        from advisor.jobs.store import JobStore

        store = JobStore()
        job = _local(lambda: service.describe(service.resume(job_id, store), store))
    else:
        with ProgressView(quiet=as_json or not follow) as view:
            job = _local(lambda: _claim_and_run(job_id, view, service.RESUMABLE))
    if as_json:
        _print_json(job)
    else:
        _summary(job)
    if job["status"] in TERMINAL:
        raise typer.Exit(code=_exit_code(job))


def _local(fn):
    from advisor.jobs import service

    try:
        return fn()
    except service.JobNotFound as err:
        err_console.print(f"[bold red]error:[/] {err.message}", highlight=False)
        raise typer.Exit(code=1) from None
    except service.JobStateError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(code=1) from None


def _get(job_id: str, server: str | None, token: str | None) -> dict:
    if server:
        with _client(server, token) as client:
            return _check(client.get(f"/v1/jobs/{job_id}"))
    from advisor.jobs import service
    from advisor.jobs.store import JobStore

    store = JobStore()
    return _local(lambda: service.describe(service.get(job_id, store), store))


def register(app: typer.Typer) -> None:
    app.command("train", help="Train a plan as a job: locally with a progress bar, or on --server.")(train_command)
    app.add_typer(jobs_app, name="jobs")


__all__ = ["register", "body_from_plan", "sse_events"]
