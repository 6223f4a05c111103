"""Memory coefficients of one (architecture, method config, sequence length): fitted from exact slice simulations.

The real method is applied to the real architecture cut to two depths (2 and 3 blocks, `slice_depths`; written below
as L ∈ {1, 2}, the first and second slice) and simulated on fake tensors at
micro-batch b ∈ {1, 2} (fake tensors do no arithmetic, so a slice of a 70B model costs ~0.3 s). For every phase
(forward, backward, optimizer) and every memory category, the four runs determine exactly the coefficients of

    bytes(L, b) = k0 + kL·(L-1) + kb·(b-1) + kLb·(L-1)·(b-1)

which is exact when the model's blocks are identical and memory is linear in the batch (SDPA/flash attention;
eager attention's s² term is per sequence, so it is linear in b too at a fixed sequence length). The closed form
then answers for the real depth and any micro-batch in microseconds. Fits are cached in memory and on disk.

With gradient checkpointing a window's peak is a maximum over moments inside one block's recomputation and
backward whose batch slopes differ, so it is convex, not linear, in b: the line through b = 1, 2 under-estimated
b = 4 by 2.7% (full fine-tuning, 2-block Llama, 64 tokens). Checkpointed configs are therefore also simulated at
b = 4, and every phase gets a second line through b = 2, 4 (`<phase>|b24`); the estimate takes the maximum over
phases, so each line serves the batches it bounds (a convex function's secant is exact at its ends).

Each slice is built once: two steps at micro-batch 1 (the first creates the optimizer state), then one step at
micro-batch 2 (and 4) with the state in place, which is what a fresh run's second step at that size holds; only
the first step's optimizer phase is carried over from micro-batch 1 (`_with_first_step`). Across the 12 methods,
GaLore, the 8-bit and in-backward optimizers, freeze tuning, LLaMA-Pro, the loss and offloading options, on a
decoder, GPT-2 and T5, every phase's bytes equal those of separate runs (FIT_VERSION 12); a fit builds 2 models
instead of 4-6 and runs 6-8 steps instead of 8-12.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from advisor.config import MethodConfig, method_key_dump, without_neutral_defaults
from advisor.files import write_text_atomic
from advisor.memory.counter import CATEGORIES
from advisor.settings import get_settings

FIT_VERSION = 12  # 12: one model per slice, larger micro-batches as later steps; 11: SIM_VERSION 10's quantized stand-ins
# backward_* are windows of backward whose composition is linear in depth and batch (advisor.memory.counter);
# "backward" (their maximum in the slice) is kept for models whose blocks the counter cannot find
PHASES = ("forward", "backward", "backward_head", "backward_first", "backward_last", "backward_tail",
          "backward_seam_upper", "backward_seam_lower", "optimizer", "optimizer_first")
_LOCK = threading.Lock()


@dataclass
class PhaseCoefficients:
    """category → (k0, kL, kb, kLb) for one phase."""

    terms: dict[str, tuple[float, float, float, float]]

    def bytes_by_category(self, layers: int, batch: int) -> dict[str, float]:
        dl, db = layers - 1, batch - 1
        return {c: k0 + kl * dl + kb * db + klb * dl * db for c, (k0, kl, kb, klb) in self.terms.items()}


@dataclass
class MemoryCoefficients:
    phases: dict[str, PhaseCoefficients]
    seq_len: int
    key: str
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"phases": {p: {c: list(v) for c, v in pc.terms.items()} for p, pc in self.phases.items()},
                "seq_len": self.seq_len, "key": self.key, "seconds": self.seconds, "version": FIT_VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> MemoryCoefficients:
        return cls({p: PhaseCoefficients({c: tuple(v) for c, v in terms.items()}) for p, terms in d["phases"].items()},
                   d["seq_len"], d["key"], d.get("seconds", 0.0))


# optimizers that cannot run on fake tensors (bitsandbytes' 8-bit kernels read their state's values) → the one the
# simulation runs instead; the state is replaced by the exact analytic bytes afterwards (static.optimizer_bytes)
SIMULATED_AS = {"adamw_8bit": "adamw_torch_fused", "paged_adamw_8bit": "adamw_torch_fused",
                "paged_adamw_32bit": "adamw_torch_fused", "galore_adamw_8bit": "galore_adamw",
                "lion_8bit": "adamw_torch_fused", "lion_32bit": "adamw_torch_fused",
                "paged_lion_8bit": "adamw_torch_fused", "paged_lion_32bit": "adamw_torch_fused"}


def _simulation_config(cfg: MethodConfig) -> MethodConfig:
    if cfg.training.optim in SIMULATED_AS:
        cfg = cfg.model_copy(deep=True)
        cfg.training.optim = SIMULATED_AS[cfg.training.optim]
    return cfg


def coefficient_key(resolved, cfg: MethodConfig, seq_len: int, target: str = "cpu") -> str:
    from advisor.memory.simulate import structure_markers

    basis = {
        "config": {k: v for k, v in resolved.config.to_dict().items()
                   if k not in ("_name_or_path", "transformers_version", "architectures", "num_hidden_layers",
                                "n_layer", "num_layers", "num_decoder_layers", "layer_types")},
        "kind": resolved.kind,
        "slices": list(slice_depths(resolved, cfg)),
        **structure_markers(resolved, cfg),
        "method": method_key_dump(_simulation_config(cfg)),
        "training": cfg.training.model_dump(mode="json", include={"torch_dtype", "bf16", "fp16", "gradient_checkpointing",
                                                                  "attn_implementation", "max_grad_norm", "cross_entropy", "optimizer_in_backward",
                                                                  "activation_offloading", "torch_compile", "gradient_checkpointing_reentrant",
                                                                  "max_target_length"}),
        "optim_family": "galore" if cfg.training.optim.startswith("galore") else _simulation_config(cfg).training.optim,
        "seq_len": seq_len,
        "target": target,
        "v": FIT_VERSION,
    }
    basis["training"] = without_neutral_defaults(basis["training"])
    from advisor.losses import loss_graph_key

    basis.update(loss_graph_key(cfg.training))
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _cache_path(key: str):
    return get_settings().fit_cache_dir / f"{key}.json"


_MEMO: dict[str, MemoryCoefficients] = {}  # the fits this process computed or read (a key names one fit anywhere)
_MEMO_MAX = 8192


def _remember(key: str, fitted: MemoryCoefficients) -> MemoryCoefficients:
    if len(_MEMO) >= _MEMO_MAX:
        _MEMO.pop(next(iter(_MEMO)))  # the oldest
    _MEMO[key] = fitted
    return fitted


def clear_memo() -> None:
    """Forget the fits held in memory (the disk cache stays)."""
    _MEMO.clear()


def _load(key: str) -> MemoryCoefficients | None:
    found = _MEMO.get(key)
    if found is not None:
        return found
    try:
        return _remember(key, MemoryCoefficients.from_dict(json.loads(_cache_path(key).read_text())))
    except (OSError, ValueError, KeyError):  # not on disk (a miss is not remembered: another process may write it)
        return None


class FitMissing(Exception):
    """Raised instead of fitting while `collecting_misses` is on: the fit is not in memory or on disk."""


_COLLECTING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fits_missing", default=None)


@contextlib.contextmanager
def collecting_misses():
    """Within: a fit that is not cached raises FitMissing instead of running, and is recorded in the yielded dict
    ({key: (resolved, config, sequence length, target)}), for `fit_in_parallel`."""
    misses: dict = {}
    token = _COLLECTING.set(misses)
    try:
        yield misses
    finally:
        _COLLECTING.reset(token)


_LISTENER: contextvars.ContextVar = contextvars.ContextVar("fit_listener", default=None)


@contextlib.contextmanager
def fit_listener(callback):
    """Within: `callback(event, info)` hears each fit this thread computes ("start", then "end"; info: method,
    gradient_checkpointing, seq_len, model), e.g. to show progress while a cold recommendation fits its candidates."""
    token = _LISTENER.set(callback)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def _tell(event: str, resolved, cfg: MethodConfig, seq_len: int) -> None:
    listener = _LISTENER.get()
    if listener is not None:
        try:
            listener(event, {"method": cfg.method, "gradient_checkpointing": cfg.training.gradient_checkpointing,
                             "seq_len": seq_len, "model": getattr(resolved, "id", None)})
        except Exception:  # noqa: BLE001 - progress display must never break a fit
            pass


def fit_coefficients(resolved, cfg: MethodConfig, seq_len: int, target: str = "cpu") -> MemoryCoefficients:
    """Fitted coefficients for this architecture/method/sequence length on a `target` device ("cuda" or "cpu": what
    its kernels save, see `simulate_in_process`), from memory, the disk cache or four slice runs."""
    key = coefficient_key(resolved, cfg, seq_len, target)
    found = _load(key)
    if found is not None:
        return found
    misses = _COLLECTING.get()
    if misses is not None:
        misses[key] = (resolved, cfg, seq_len, target)
        raise FitMissing(key)
    with _LOCK:
        found = _load(key)
        if found is not None:
            return found
        _tell("start", resolved, cfg, seq_len)
        fitted = _fit(resolved, _simulation_config(cfg), seq_len, key, target)
        _tell("end", resolved, cfg, seq_len)
        path = _cache_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(fitted.to_dict()))
        except OSError:
            pass
        return _remember(key, fitted)


def fit_from_payload(payload: dict) -> None:
    """In a child forked by the warm server: compute one fit into the fit cache (`fit_in_parallel`)."""
    from advisor.memory.simulate import model_from_payload

    fit_coefficients(model_from_payload(payload["model"]), MethodConfig.model_validate(payload["config"]),
                     int(payload["seq_len"]), payload["target"])


def fit_in_parallel(misses: dict, workers: int, timeout_s: float = 1800) -> int:
    """Compute the fits `collecting_misses` recorded in up to `workers` processes at once, each forked from the warm
    server, into the fit cache; returns how many finished. A fit that fails, or a server that cannot start, only
    leaves the fit to be computed in this process when it is asked for."""
    import os
    import subprocess
    import tempfile
    import time

    from advisor.memory.simulate import CHILD_ENV, model_payload, warm_server

    if workers < 2 or len(misses) < 2:
        return 0
    try:
        server = warm_server()
    except OSError:
        return 0
    env, done = {**os.environ, **CHILD_ENV}, 0
    pending = list(misses.items())
    running: list = []
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(prefix="advisor-fits-") as tmp:
        while (pending or running) and time.monotonic() < deadline:
            while pending and len(running) < workers:
                key, (resolved, cfg, seq_len, target) = pending.pop(0)
                child = server.start(f"fit-{key}", Path(tmp) / f"{key}.log", fit={
                    "model": model_payload(resolved), "config": cfg.model_dump(mode="json"), "seq_len": seq_len,
                    "target": target}, env=env, cwd=os.getcwd())
                if child is None:  # the server is gone: the rest is fitted here, when asked for
                    pending.clear()
                    break
                running.append(child)
            finished = [c for c in running if c.poll() is not None]
            done += sum(1 for c in finished if c.returncode == 0)
            running = [c for c in running if c.returncode is None]
            if running and not finished:
                time.sleep(0.05)
        for child in running:  # past the deadline
            child.kill()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                pass
    return done


def slice_depths(resolved, cfg: MethodConfig | None = None) -> tuple[int, int]:
    """The depths of the two slices the activation terms are fitted on: 2 and 3 blocks per stack. A one-block slice
    is degenerate: its top block is its bottom block (the counter's first and last backward windows coincide), and
    whatever the first block computes once for every later one is absent. Fitted on 1-2 blocks, that became per-block
    slope: T5's relative position bias (t5-small, b4 × 1024 with checkpointing: +6.1%), parallel attention + MLP
    blocks (GPT-J LoRA 1 × 512 +2.5%, phi-2 LoRA 2 × 2048 +12.6%), Gemma-2's first block (+1.1% with
    checkpointing). On 2-3 blocks each of these lands on the simulation; the fit costs 1.5× the 1-2 block one.
    A method that fixes the role of some blocks (freeze tuning's trained ones, `static.pinned_blocks`) keeps them in
    both slices: 2-3 blocks more than those. LLaMA-Pro's layout repeats every N blocks (`static.block_period`): its
    slices are 2 and 3 groups of N (1 and 2 frozen blocks before each new one)."""
    from advisor.estimator.static import block_period, pinned_blocks

    base = pinned_blocks(cfg) if cfg is not None else 0
    period = block_period(cfg) if cfg is not None else 1
    return (base + 2 * period, base + 3 * period)


def _with_first_step(phases: dict, at_one: dict) -> dict:
    """A later micro-batch's phases (one step with the state in place) with the first step's optimizer phase, which
    creates the state, added: micro-batch 1's, moved by what the later step's optimizer phase holds more per
    category (the micro-batch's inputs; activations are freed by then)."""
    first, steady, now = at_one.get("optimizer_first"), at_one.get("optimizer"), phases.get("optimizer")
    if first is None or steady is None or now is None:
        return phases
    cats = set(first["breakdown_bytes"]) | set(steady["breakdown_bytes"]) | set(now["breakdown_bytes"])
    moved = {c: first["breakdown_bytes"].get(c, 0) + now["breakdown_bytes"].get(c, 0)
             - steady["breakdown_bytes"].get(c, 0) for c in cats}
    moved = {c: v for c, v in moved.items() if v}
    return {**phases, "optimizer_first": {"peak_bytes": sum(moved.values()), "breakdown_bytes": moved}}


def _fit(resolved, cfg: MethodConfig, seq_len: int, key: str, target: str = "cpu") -> MemoryCoefficients:
    import time

    start = time.perf_counter()
    return _coefficients_from_runs(_slice_runs(resolved, cfg, seq_len, target), resolved, cfg, seq_len, key, start)


def _slice_runs(resolved, cfg: MethodConfig, seq_len: int, target: str) -> dict:
    """{(slice index, micro-batch): phases} for the two slices."""
    from advisor.estimator.static import sliced_config
    from advisor.memory.simulate import simulate_in_process

    runs: dict[tuple[int, int], dict] = {}
    depths = slice_depths(resolved, cfg)
    later = (2, 4) if cfg.training.gradient_checkpointing else (2,)
    for layers in (1, 2):  # slice index 1, 2 → depths[0], depths[1]
        sliced = copy.copy(resolved)
        sliced.config = sliced_config(resolved.config, depths[layers - 1])
        # one model per slice: two steps at micro-batch 1, then one step at each larger micro-batch with the state
        # in place (`simulate_in_process(later_sizes=...)`), as a fresh run's second step at that size
        # -- except compiled blocks: a new batch size makes torch.compile recompile with a dynamic batch dimension
        # (another graph, whose forward held 14-21% more in a 2-3 block Qwen2.5 slice), where a real run keeps one
        # size: each size is its own run there
        if cfg.training.torch_compile:
            for batch in (1, *later):
                runs[(layers, batch)] = simulate_in_process(sliced, cfg, batch, seq_len, target=target)["phases"]
            continue
        sim = simulate_in_process(sliced, cfg, 1, seq_len, target=target, later_sizes=later)
        runs[(layers, 1)] = sim["phases"]
        for batch in later:
            runs[(layers, batch)] = _with_first_step(sim["by_batch"][batch], sim["phases"])
    return runs


def _coefficients_from_runs(runs: dict, resolved, cfg: MethodConfig, seq_len: int, key: str,
                            start: float) -> MemoryCoefficients:
    """The coefficients through the slice runs' phases ({(slice index, micro-batch): phases})."""
    import time

    depths = slice_depths(resolved, cfg)
    first, step = depths[0], depths[1] - depths[0]
    phases = {}
    for low, high, suffix in ((1, 2, ""), (2, 4, "|b24")):
        points = [(layers, b) for layers in (1, 2) for b in (low, high)]
        if not all(p in runs for p in points):
            continue
        for phase in PHASES:
            if not all(phase in runs[p] for p in points):  # a window the counter did not see in every slice
                continue
            terms = {}
            for cat in CATEGORIES:
                v = {p: runs[p].get(phase, {}).get("breakdown_bytes", {}).get(cat, 0) for p in points}
                # the line through b = low, high for L = 1, 2, written as k0 + kL(L-1) + kb(b-1) + kLb(L-1)(b-1)
                s1 = (v[(1, high)] - v[(1, low)]) / (high - low)
                s2 = (v[(2, high)] - v[(2, low)]) / (high - low)
                a1 = v[(1, low)] - s1 * (low - 1)
                a2 = v[(2, low)] - s2 * (low - 1)
                # the slices are at depths first, first + step: the line through them, written from depth 1
                kl, klb = (a2 - a1) / step, (s2 - s1) / step
                k0, kb = a1 - kl * (first - 1), s1 - klb * (first - 1)
                if any((k0, kl, kb, klb)):
                    terms[cat] = (k0, kl, kb, klb)
            phases[phase + suffix] = PhaseCoefficients(terms)
    return MemoryCoefficients(phases, seq_len, key, time.perf_counter() - start)
