"""Probe runs: each method on tiny real models on the local device, measured, next to the fast estimator's prediction.

One probe = (method, architecture, micro-batch, sequence length, gradient checkpointing). The grid is data
(`calibration/grid.yaml`); `plan_probes` expands it, `write_models` saves one tiny model per architecture (random
weights, the demo tokenizer) into a temporary directory, and `run_probe` measures one point with
`advisor.memory.simulate.measure_real` (the live-bytes counter, plus the CUDA allocator's statistics on a GPU) and
asks the fast estimator for the same config. A failing probe becomes a row with its error; the rest go on.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from advisor.errors import AdvisorInputError

GRID_PATH = Path(__file__).resolve().parents[2] / "calibration" / "grid.yaml"


@dataclass(frozen=True)
class Probe:
    method: str
    arch: str
    batch: int
    seq: int
    gc: bool
    index: int  # position of (batch, seq, gc) in the grid's point list (before skips): the `every: K` hold-out
    heldout: bool = False

    @property
    def key(self) -> str:
        return probe_key(asdict(self))


def probe_key(row: dict) -> str:
    """`method/arch/b<batch>/s<seq>/gc|nogc`: a probe's name, from a Probe's fields or a row of the probe table."""
    return f"{row['method']}/{row['arch']}/b{row['batch']}/s{row['seq']}/{'gc' if row['gc'] else 'nogc'}"


def load_grid(path: Path | None = None) -> dict[str, Any]:
    path = Path(path or GRID_PATH)
    try:
        grid = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise AdvisorInputError("grid", f"cannot read the probe grid {path}: {err}") from None
    if not isinstance(grid, dict) or "grids" not in grid or "archs" not in grid:
        raise AdvisorInputError("grid", f"{path} is not a probe grid (needs `archs` and `grids`)")
    return grid


def grid_name(device_kind: str, quick: bool) -> str:
    """The grid section for a device: `full` / `quick` on CPU, `cuda` / `cuda_quick` on a GPU."""
    if device_kind == "cuda":
        return "cuda_quick" if quick else "cuda"
    return "quick" if quick else "full"


def _points(section: dict) -> list[tuple[int, int, bool]]:
    if section.get("points"):
        return [(int(b), int(s), bool(g)) for b, s, g in section["points"]]
    return [(int(b), int(s), bool(g)) for s, g, b in itertools.product(
        section.get("seq", [128]), section.get("gradient_checkpointing", [False]), section.get("batch", [1]))]


def _skipped(grid: dict, method: str, gc: bool) -> str | None:
    skip = (grid.get("method_config", {}).get(method) or {}).get("skip") or {}
    if "gradient_checkpointing" in skip and bool(skip["gradient_checkpointing"]) == gc:
        return f"{method} refuses gradient_checkpointing={gc}"
    return None


def plan_probes(grid: dict, section_name: str, methods: list[str]) -> tuple[list[Probe], list[dict]]:
    """The probes of one grid section for `methods` (in METHOD_IDS order), and the skipped points with why."""
    section = grid["grids"][section_name]
    holdout = section.get("holdout") or {}
    points = _points(section)
    probes, skipped = [], []
    for method in methods:
        for arch, which in section["archs"].items():
            if which != "all" and method not in which:
                continue
            for index, (b, s, gc) in enumerate(points):
                reason = _skipped(grid, method, gc)
                if reason:
                    skipped.append({"method": method, "arch": arch, "batch": b, "seq": s, "gc": gc, "why": reason})
                    continue
                if "arch" in holdout:
                    held = arch == holdout["arch"]
                else:
                    k = int(holdout.get("every", 0) or 0)
                    held = k > 0 and index % k == k - 1
                probes.append(Probe(method, arch, b, s, gc, index, held))
    # interleave the methods (architecture, then grid point, then method): on a shared machine the load drifts over
    # a calibration's minutes, and method-major order let a busy stretch fall on one method's probes (the 2026-11-22
    # full-grid run timed GaLore faster than full fine-tuning on identical shapes, 44 vs 53 ms, although GaLore
    # does strictly more work); interleaved, a drift affects every method alike
    order = {m: i for i, m in enumerate(methods)}
    archs = list(section["archs"])
    probes.sort(key=lambda p: (archs.index(p.arch), p.index, order[p.method]))
    return probes, skipped


def holdout_description(grid: dict, section_name: str) -> str:
    holdout = grid["grids"][section_name].get("holdout") or {}
    if "arch" in holdout:
        arch = holdout["arch"]
        spec = grid["archs"][arch]
        return f"the whole architecture {arch} ({_arch_words(spec)}) is held out; the fit sees only the others"
    k = holdout.get("every")
    if k:
        return (f"every {_ordinal(int(k))} grid point of each method (grid positions {k - 1}, {2 * k - 1}, ... "
                "counting from 0) is held out")
    return "nothing is held out (held-out errors are in-sample)"


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def _arch_words(spec: dict) -> str:
    h = spec.get("hidden_size") or spec.get("n_embd") or spec.get("d_model")
    layers = spec.get("num_hidden_layers") or spec.get("n_layer") or spec.get("num_layers")
    heads = spec.get("num_attention_heads") or spec.get("n_head") or spec.get("num_heads")
    kv = spec.get("num_key_value_heads")
    attn = f", {heads} heads / {kv} KV heads" if kv and kv != heads else f", {heads} heads" if heads else ""
    return f"{spec['family']} h={h}, L={layers}{attn}"


def write_models(grid: dict, archs: list[str], directory: Path) -> dict[str, Path]:
    """One tiny model per architecture (random weights, the demo tokenizer) under `directory`."""
    from advisor.demo import train_tokenizer, write_tiny_model

    with _stdout_to_stderr():  # the Rust BPE trainer prints progress to fd 1; keep stdout clean for --json
        tokenizer = train_tokenizer()
    out = {}
    for arch in archs:
        spec = dict(grid["archs"][arch])
        family = spec.pop("family")
        out[arch] = write_tiny_model(Path(directory) / arch, family, tokenizer, **spec)
    return out


@contextlib.contextmanager
def _stdout_to_stderr():
    try:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
    except (OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def probe_config(grid: dict, probe: Probe) -> dict:
    family = grid["archs"][probe.arch]["family"]
    peft = dict(((grid.get("method_config", {}).get(probe.method) or {}).get("peft") or {}).get(family) or {})
    training = {**(grid.get("training") or {}), "per_device_train_batch_size": probe.batch,
                "max_seq_length": probe.seq, "gradient_checkpointing": probe.gc}
    return {"peft": peft, "training": training}


def predict(model_dir: Path, method: str, config: dict, target: str = "cpu") -> dict:
    """The fast estimator's tensor bytes (no device overhead) and training FLOPs per token for a probe on a `target`
    device ("cuda" / "cpu": whose kernels' saved tensors the activation fit counts)."""
    from advisor.estimator.fast import memory_model, step_flops, training_flops_per_token
    from advisor.estimator.plan import build_plan
    from advisor.estimator.profile import Profile
    from advisor.schemas import EstimateRequest

    plan = build_plan(EstimateRequest(model=str(model_dir), hardware={"gpu": "none"}, method=method, config=config))
    # an empty profile: overhead 0, so the prediction is the tensor bytes the fit relates to the measurement
    mm = memory_model(plan, profile=Profile("probe", "cpu", {}), target=target)
    peak, cats, phase = mm.peak(plan.batch_size)
    return {"predicted_tensor_bytes": int(peak), "predicted_phase": phase,
            # parameters (frozen and trained) at the peak: allocated once at load, in blocks the allocator reuses
            # without slack; the rest (activations, gradients, optimizer state, temporaries) is what it fragments
            "predicted_param_bytes": int(cats.get("weights", 0) + cats.get("trainable", 0)),
            "svd_matrix_bytes": int(mm.static.svd_matrix_bytes),
            "flops_per_token": training_flops_per_token(mm),
            "flops_per_step": step_flops(mm, plan.batch_size)}


def _prefit_init() -> None:
    import warnings

    import torch

    torch.set_num_threads(1)  # one process per core
    warnings.filterwarnings("ignore")


def _prefit_one(task: tuple[str, str, dict, str]) -> str | None:
    try:
        predict(Path(task[0]), task[1], task[2], task[3])
    except Exception as err:  # the probe itself will meet (and record) the same error
        return f"{type(err).__name__}: {err}"
    return None


def prefit(grid: dict, probes: list[Probe], model_dirs: dict[str, Path], workers: int, target: str = "cpu") -> int:
    """Fit the fast estimator's coefficients of every distinct probe config in `workers` processes, before any probe
    runs (so nothing competes with the timed steps). The fits land in the estimator's disk cache, where `predict`
    finds them. Returns how many configs were fitted in parallel (0: left to the probe loop)."""
    unique: dict[tuple, Probe] = {}
    for p in probes:  # the batch size is not part of a fit's key
        unique.setdefault((p.method, p.arch, p.seq, p.gc), p)
    tasks = [(str(model_dirs[p.arch]), p.method, probe_config(grid, p), target) for p in unique.values()]
    if workers <= 1 or len(tasks) < 2:
        return 0
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), initializer=_prefit_init,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_prefit_one, tasks))
    except Exception:  # no processes here (a sandbox, a frozen app): the probe loop fits them one by one
        return 0
    return len(tasks)


def time_steps(resolved, cfg, batch_size: int, seq_len: int, steps: int, device: str, seed: int = 0) -> list[float]:
    """Seconds of each of `steps` plain training steps (no counter: its dispatch hook costs 1.4-2.6x on tiny models),
    built exactly as `measure_real` builds them (advisor.engine), synchronised on CUDA."""
    import torch

    from advisor.engine import load_base_model, make_batch, make_optimizer, prepare
    from advisor.memory.simulate import _vocab_size

    torch.manual_seed(seed)
    model = load_base_model(resolved, cfg, on_meta=False, random_init=resolved.path is None, device=device)
    prepared = prepare(model, resolved, cfg, on_meta=False, total_steps=100)
    optimizer = make_optimizer(prepared, cfg.training)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batch = {k: v.to(device) for k, v in make_batch(resolved.kind, batch_size, seq_len, _vocab_size(resolved.config),
                                                      generator=gen, target_len=cfg.training.max_target_length).items()}
    seconds = timed_steps(prepared, optimizer, batch, cfg.training, range(steps), device.startswith("cuda"))
    del prepared, optimizer, model, batch
    return seconds


def timed_steps(prepared, optimizer, batch, training, steps, cuda: bool) -> list[float]:
    """Seconds of each training step numbered in `steps` (synchronised before and after on CUDA)."""
    import torch

    seconds = []
    for step in steps:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(prepared, optimizer, batch, training, step)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def train_step(*args, **kwargs):
    from advisor.engine import train_step as step

    return step(*args, **kwargs)


def run_probe(grid: dict, probe: Probe, model_dir: Path, device: str, steps: int, memory_steps: int = 2) -> dict:
    """Measure one probe and predict it; never raises (a failure is a row with `error`).

    Memory: `memory_steps` steps under the live-bytes counter (`measure_real`; from the second step on the optimizer
    state exists and the peak repeats, which is also what the simulator runs). Time: a separate run of `steps` plain
    steps, median of steps 2..N (step 1 is warm-up)."""
    from advisor.catalog.models import resolve_model
    from advisor.memory.simulate import measure_real
    from advisor.methods import get_method

    row: dict[str, Any] = {k: v for k, v in asdict(probe).items() if k != "index"}
    row.update(tokens_per_step=probe.batch * probe.seq, device=device, error=None)
    start = time.perf_counter()
    config = probe_config(grid, probe)
    try:
        resolved = resolve_model(str(model_dir))
        cfg = get_method(probe.method).resolve_config(config)
        t_measure = time.perf_counter()
        measured = measure_real(resolved, cfg, probe.batch, probe.seq, steps=max(int(memory_steps), 2))
        _release(device)
        seconds = time_steps(resolved, cfg, probe.batch, probe.seq, max(int(steps), 2), device)
        row["measure_seconds"] = round(time.perf_counter() - t_measure, 3)
        row.update(
            measured_peak_bytes=int(measured["peak_bytes"]),
            measured_phase=measured.get("peak_phase"),
            step_seconds=statistics.median(seconds[1:]),
            step_seconds_min=min(seconds[1:]),
            warmup_seconds=seconds[0],
            counted_step_seconds=measured["steps"][-1]["seconds"],
            loss=measured["steps"][-1]["loss"],
            trainable_params=measured["trainable_params"],
            total_params=measured["total_params"],
        )
        cuda = measured.get("cuda")
        if cuda:
            row.update(cuda_max_reserved_bytes=int(cuda["max_reserved_bytes"]),
                       cuda_max_allocated_bytes=int(cuda["max_allocated_bytes"]),
                       cuda_context_bytes=int(cuda["context_bytes"]))
            # what the device holds for this process at its peak: the allocator's reserve + context/workspaces
            row["measured_device_bytes"] = row["cuda_max_reserved_bytes"] + row["cuda_context_bytes"]
        else:
            row["measured_device_bytes"] = row["measured_peak_bytes"]  # CPU: the counter is exact
        t_predict = time.perf_counter()
        row.update(predict(model_dir, probe.method, config, target=device_kind(device)))
        row["predict_seconds"] = round(time.perf_counter() - t_predict, 3)
        row.setdefault("flops_per_step", row["flops_per_token"] * row["tokens_per_step"])
    except Exception as err:  # a probe that cannot run is recorded, the calibration goes on
        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc(limit=3)[-1500:]
    finally:
        _release(device)
    row["wall_seconds"] = round(time.perf_counter() - start, 3)
    return row


def device_kind(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def _release(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
