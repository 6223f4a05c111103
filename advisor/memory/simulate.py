"""Exact memory of a training step without the hardware, and the same measurement on a real run.

`simulate_in_process` builds the real architecture and the real method on the meta device, turns every
tensor into a fake CPU tensor, runs training steps under `LiveBytes`, and reports the peak a device would
see. `measure_real` runs the identical steps on real tensors. The two agree to the byte on CPU (tested),
which is what lets the simulation stand in for hardware we do not have.

`simulate` runs the simulation in a separate process (a fake-tensor mistake can abort a process) and caches the
result on disk, keyed by the request and the library versions. The process is forked from a fork server
(`advisor.jobs.forkserver`, the one that starts job workers) that imported torch, transformers and PEFT once: every
simulation still runs in a fresh process, without paying the 5-15 s of imports each time (ADVISOR_WARM_SIMULATOR=0:
a fresh interpreter each).

GPU-side differences are explicit: the optimizer mirrors CUDA's default (fused AdamW; `adamw_torch` is
foreach), attention uses the SDPA path a real run takes when there is no padding (flash / memory-efficient
on CUDA, which save the same output and log-sum-exp), 4-bit layers use a stand-in with bitsandbytes' bytes,
`target="cuda"` counts what CUDA kernels save where CPU kernels save more (dropout masks, attention dropout;
`advisor.memory.simattn.CudaSemantics`), and the CUDA context and allocator overhead are not counted here (the
calibration profile adds them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from advisor.config import MethodConfig
from advisor.engine import int8_vectorwise_dequant, train_step
from advisor.errors import AdvisorInputError
from advisor.files import write_text_atomic
from advisor.memory.counter import LiveBytes, cuda_memory_stats
from advisor.memory.simattn import semantics, use_sim_masks

# 10: the quantized stand-ins replace what transformers' bitsandbytes quantizer replaces (GPT-2's Conv1D too; T5's
# `wo` kept in the load dtype, not fp32) -- QLoRA on those families was not byte-exact before
SIM_VERSION = 10


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "advisor_sim": str(SIM_VERSION)}


def _measure(prepared, optimizer, batch, training, steps: int, register_extra=None, see_inside=None,
             refresh_projections: bool = True, allocator_workspaces: list[int] | None = None,
             later_batches=None) -> dict:
    """`later_batches` (sizes, make): after the `steps` steps on `batch`, one more step on `make(size)` for each
    size, with the optimizer state in place; their phases come back under `"by_batch"` (used by `coefficients._slice_runs`)."""
    counter = LiveBytes(see_inside=see_inside, record_allocations=allocator_workspaces is not None)
    counter.register_model(prepared.model)
    counter.register_batch(batch)
    counter.register_optimizer(optimizer)
    if register_extra:
        register_extra(counter)
    best = {"peak": -1}
    per_step = []
    phases: dict[str, dict] = {}  # each phase's (and backward window's) highest peak over all steps
    counter.mark("steps")
    in_backward = bool(getattr(training, "optimizer_in_backward", False))
    with counter:
        for step in range(steps):
            start = time.perf_counter()
            if step == 1 and refresh_projections:
                refresh_projections_every_step(optimizer, after_project=counter.classify_optimizer_state)
            counter.reset_peak()
            res = train_step(prepared, optimizer, batch, training, step, counter=counter)
            rep = counter.report()
            per_step.append({"peak_bytes": rep.peak_bytes, "peak_phase": rep.peak_phase, "loss": res.loss,
                             "seconds": time.perf_counter() - start})
            # ties go to the later step: step 1 creates the optimizer state inside its optimizer phase, where the
            # counter can only call it temporaries; from step 2 on the same bytes are labelled optimizer state
            # (foreach AdamW's fp32 run peaks equally in both steps and was reported as 0 optimizer, 3x activations)
            if rep.peak_bytes >= best["peak"]:
                best = {"peak": rep.peak_bytes, "peak_phase": rep.peak_phase, "breakdown": rep.breakdown_at_peak}
            if step == 0 and steps > 1 and in_backward:
                # the first step makes the state inside backward, one parameter at a time (as temporaries, and as
                # fused AdamW's where a bitsandbytes optimizer is simulated by it): the later steps, which hold the
                # whole state through backward, are the ones to fit
                continue
            for k, v in rep.phases.items():
                # the first step's optimizer phase is kept apart: it creates the state (and GaLore's first SVD),
                # later steps hold the state. Which of the two peaks can change with depth (GaLore: the SVD's
                # temporaries win on a 1-2 block slice, the state on 32 blocks), so each gets its own fitted line
                if k == "optimizer" and step == 0 and steps > 1:
                    k = "optimizer_first"
                if v.peak_bytes >= phases.get(k, {}).get("peak_bytes", -1):
                    phases[k] = {"peak_bytes": v.peak_bytes, "breakdown_bytes": dict(v.breakdown), "step": step}
        by_batch = {}
        if later_batches is not None:
            sizes, make = later_batches
            for i, size in enumerate(sizes):
                batch = None  # the previous micro-batch is freed before the next one exists, as in a fresh run
                batch = make(size)
                counter.register_batch(batch)
                counter.reset_peak()
                train_step(prepared, optimizer, batch, training, steps + i, counter=counter)
                by_batch[size] = {k: {"peak_bytes": v.peak_bytes, "breakdown_bytes": dict(v.breakdown),
                                      "step": steps + i} for k, v in counter.report().phases.items()}
    counter.close()
    allocator = None
    if counter.allocation_events is not None:
        from advisor.memory.allocator import replay

        allocator = replay(counter.allocation_events, allocator_workspaces).to_dict()
        allocator["workspace_bytes"] = [int(w) for w in allocator_workspaces]
    return {
        "allocator": allocator,
        "peak_bytes": best["peak"],
        "peak_gib": best["peak"] / 2**30,
        "peak_phase": best["peak_phase"],
        "breakdown_bytes": best["breakdown"],
        # per phase the highest peak over the steps (step 1 builds optimizer state, later steps hold it: a
        # phase can peak in a different step than the run's peak does, and the slice fits need each phase's own)
        "phases": phases,
        **({"by_batch": by_batch} if later_batches is not None else {}),
        "steps": per_step,
        "end_bytes": counter.current_bytes,
    }


def refresh_projections_every_step(optimizer, after_project=None) -> int:
    """GaLore recomputes each projection (an SVD of the gradient) every `update_proj_gap` steps; from the second
    refresh on it runs with the whole optimizer state in place, where the first step's SVDs ran while the state was
    still being created. Measured runs are a few steps long, so from their second step on every step refreshes: the
    peak then covers the refresh steps of a real run. `after_project()` is called after each projection (the
    counter files the new projection matrix under optimizer state there, as the old one it replaces was).
    Returns the projectors changed (0 for other optimizers)."""
    changed = 0
    for state in optimizer.state.values():
        projector = state.get("projector") if isinstance(state, dict) else None
        if projector is None or not hasattr(projector, "update_proj_gap"):
            continue
        projector.update_proj_gap = 1
        if after_project is not None and not getattr(projector, "_advisor_wrapped", False):
            project = projector.project

            def wrapped(full_rank_grad, iter, _project=project):
                out = _project(full_rank_grad, iter)
                after_project()
                return out

            projector.project = wrapped
            projector._advisor_wrapped = True
        changed += 1
    return changed


def _quant_state_tensors(model) -> list[torch.Tensor]:
    """bitsandbytes keeps absmax/code tensors on a QuantState, and an 8-bit layer its row scales (`SCB`, on the
    weight until the first forward, then on the layer's state), outside parameters and buffers."""
    out = []
    for mod in model.modules():
        scb = getattr(getattr(mod, "weight", None), "SCB", None)
        if scb is None:
            scb = getattr(getattr(mod, "state", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            out.append(scb)
        qs = getattr(getattr(mod, "weight", None), "quant_state", None)
        if qs is None:
            continue
        for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
            if isinstance(t, torch.Tensor):
                out.append(t)
        if getattr(qs, "state2", None) is not None:
            out += [t for t in (qs.state2.absmax, qs.state2.code) if isinstance(t, torch.Tensor)]
    return out


def _to_fake(prepared) -> None:
    """Turn the meta model into fake CPU tensors (inside an active FakeTensorMode).

    `Module._apply` may create new Parameter objects, so method-made optimizer groups (GaLore) are re-pointed
    by parameter name, and weights tied before the conversion are tied again after it.
    """
    model = prepared.model
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    groups = None
    if prepared.optimizer_params:
        groups = [[names[id(p)][0] for p in g["params"]] for g in prepared.optimizer_params]
    tied = [ns for ns in names.values() if len(ns) > 1]
    # module by module over the de-duplicated tree: PEFT registers some modules twice (prompt learning's
    # `word_embeddings`), and a recursive _apply would convert them twice
    for _, module in model.named_modules():
        module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu"), recurse=False)
    for ns in tied:
        first = model.get_parameter(ns[0])
        for other in ns[1:]:
            owner, _, leaf = other.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, leaf, first)
    if groups is not None:
        params = dict(model.named_parameters(remove_duplicate=False))
        prepared.optimizer_params = [
            {**g, "params": [params[n] for n in group_names]} for g, group_names in zip(prepared.optimizer_params, groups)
        ]


def lycoris_adapters_always_on(model) -> int:
    """PEFT's LyCORIS layers (LoHa, LoKr) decide per forward whether to skip the adapter (`torch.rand(1) >
    module_dropout`), a branch on a random value that fake tensors cannot take. In a simulation the branch is taken
    (always so at the default module_dropout 0, the peak case otherwise) by clearing the layer's own training flag,
    which gates only that draw and rank dropout (its mask: one value per output feature, not counted); the base
    layer and the adapter's parameters keep theirs. Returns how many layers were set."""
    from peft.tuners.lycoris_utils import LycorisLayer

    n = 0
    for mod in model.modules():
        if isinstance(mod, LycorisLayer):
            mod.training = False
            n += 1
    return n


def simulate_in_process(resolved, cfg: MethodConfig, batch_size: int, seq_len: int, steps: int = 2,
                        total_steps: int = 100, target: str = "cpu", refresh_projections: bool = True,
                        allocator_workspaces: list[int] | None = None, later_sizes: tuple[int, ...] = ()) -> dict:
    """Fake-tensor simulation of `steps` training steps; returns the peak and its breakdown (bytes).

    `target` is the device whose kernels' saved tensors are counted: "cpu" (what the fake CPU tensors do, equal to
    a real CPU run to the byte) or "cuda" (`advisor.memory.simattn.CudaSemantics`: dropout keeps a boolean mask,
    SDPA applies attention dropout inside the flash kernel), what a GPU estimate needs. From the second step on,
    GaLore recomputes its projections every step (`refresh_projections_every_step`), as a real run does every
    `update_proj_gap` steps with the whole optimizer state in place.

    `later_sizes`: after those steps, one step at each of these micro-batches on the same model and optimizer state
    (`result["by_batch"][size]["phases"]`): what a fresh run's second step at that size sees, without building
    the model and running a first step again (`advisor.estimator.coefficients._slice_runs`)."""
    if cfg.method == "peft":  # any PEFT type: one whose layers do not run on fake tensors is a clear error, not a crash
        try:
            return _simulate(resolved, cfg, batch_size, seq_len, steps, total_steps, target, refresh_projections,
                             allocator_workspaces, later_sizes)
        except AdvisorInputError:
            raise
        except Exception as err:  # noqa: BLE001 -- PEFT's layers raise anything on shapes without values
            from advisor.methods.peft_any import peft_type_of

            raise AdvisorInputError("config.peft.peft_type",
                                    f"{peft_type_of(cfg.peft)}: PEFT's layers could not be simulated "
                                    f"({type(err).__name__}: {str(err)[:200]})") from None
    return _simulate(resolved, cfg, batch_size, seq_len, steps, total_steps, target, refresh_projections,
                     allocator_workspaces, later_sizes)


def _simulate(resolved, cfg: MethodConfig, batch_size: int, seq_len: int, steps: int, total_steps: int, target: str,
              refresh_projections: bool, allocator_workspaces: list[int] | None, later_sizes: tuple[int, ...] = ()
              ) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from advisor.engine import load_base_model, make_batch, make_optimizer, prepare

    t0 = time.perf_counter()
    model = load_base_model(resolved, cfg, on_meta=True)
    prepared = prepare(model, resolved, cfg, on_meta=True, total_steps=total_steps)
    trainable, total = prepared.param_counts()
    use_sim_masks(prepared.model)
    lycoris_adapters_always_on(prepared.model)
    # constants kept outside parameters/buffers (PEFT's virtual-token indices) are few bytes: let them in
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        _to_fake(prepared)
        optimizer = make_optimizer(prepared, cfg.training)
        vocab = _vocab_size(resolved.config)

        def batch_of(size: int) -> dict:
            return make_batch(resolved.kind, size, seq_len, vocab, fake=True, target_len=cfg.training.max_target_length)

        with semantics(target, prepared.model):
            # the batch is made inside the call, so that `_measure` holds its only reference (freed before a later one)
            result = _measure(prepared, optimizer, batch_of(batch_size), cfg.training, steps,
                              refresh_projections=refresh_projections, allocator_workspaces=allocator_workspaces,
                              later_batches=(tuple(later_sizes), batch_of) if later_sizes else None)
    result.update(trainable_params=trainable, total_params=total, seconds=time.perf_counter() - t0,
                  mode="simulated", device="fake-cpu", target=target, notes=prepared.notes)
    return result


def measure_real(resolved, cfg: MethodConfig, batch_size: int, seq_len: int, steps: int = 2,
                 total_steps: int = 100, device: str | None = None, seed: int = 0, semantics_of: str | None = None,
                 refresh_projections: bool = True, allocator_workspaces: list[int] | None = None) -> dict:
    """The same steps on real tensors (random init), measured by the same counter (+ CUDA allocator stats).

    `semantics_of="cuda"` runs a CPU measurement under the CUDA kernels' saving behaviour (`CudaSemantics`), the
    real-tensor counterpart of a `target="cuda"` simulation. `refresh_projections=False` measures as calibrations
    before SIM_VERSION 9 did: GaLore's projections computed once (see `refresh_projections_every_step`)."""
    from advisor.engine import load_base_model, make_batch, make_optimizer, prepare

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = load_base_model(resolved, cfg, on_meta=False, random_init=resolved.path is None, device=device)
    prepared = prepare(model, resolved, cfg, on_meta=False, total_steps=total_steps)
    trainable, total = prepared.param_counts()
    optimizer = make_optimizer(prepared, cfg.training)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batch = {k: v.to(device) for k, v in make_batch(resolved.kind, batch_size, seq_len, _vocab_size(resolved.config),
                                                      generator=gen, target_len=cfg.training.max_target_length).items()}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    int8 = cfg.quantization is not None and cfg.quantization.load_in_8bit
    with semantics(semantics_of or "cpu", prepared.model), _int8_training_path(device, int8):
        result = _measure(prepared, optimizer, batch, cfg.training, steps,
                          register_extra=lambda c: c.register(_quant_state_tensors(prepared.model), "weights"),
                          see_inside=_bnb_kernels(device, int8) if cfg.quantization is not None else None,
                          refresh_projections=refresh_projections, allocator_workspaces=allocator_workspaces)
    result.update(trainable_params=trainable, total_params=total, seconds=time.perf_counter() - t0,
                  mode="measured", device=device, cuda=cuda_memory_stats() if device.startswith("cuda") else None,
                  notes=prepared.notes)
    return result


def _bnb_kernels(device: str, int8: bool = False) -> dict | None:
    """On CPU, bitsandbytes' 4-bit matmul is a custom op whose default kernel dequantizes internally; run that
    kernel (bitsandbytes' own code) under the counter so its temporaries are measured, as a GPU's allocator would.
    8-bit: `_INT8_AS_ON_CUDA`."""
    if not device.startswith("cpu"):
        return None
    if int8:
        return dict(_INT8_AS_ON_CUDA)
    from bitsandbytes.backends.default.ops import _gemm_4bit_default_impl

    return {"bitsandbytes::gemm_4bit": _gemm_4bit_default_impl}


# ---- LLM.int8() on CPU, counted as CUDA allocates it
# A CPU run of a bitsandbytes 8-bit layer differs from a GPU's in two ways, both undone here for measurement:
# bitsandbytes trains on CPU with MatMul8bitFp (dequantize, then one matmul), on CUDA with MatMul8bitLt (int8
# matmul), so `_int8_training_path` routes CPU training through MatMul8bitLt; and its int8 ops are custom ops, opaque
# to the counter, whose CPU kernels allocate differently from the CUDA ones. The ops that run bitsandbytes' default
# (PyTorch) implementation on CUDA too are run as that implementation under the counter; the two with CUDA kernels
# (the row quantizer and the int32 → fp16 dequantizer) allocate what the CUDA registration allocates, their values
# written by bitsandbytes' own CPU kernel outside the count (as a CUDA kernel writes into its outputs).
@contextlib.contextmanager
def _int8_training_path(device: str, int8: bool):
    if not (int8 and device.startswith("cpu")):
        yield
        return
    import bitsandbytes as bnb
    from bitsandbytes.autograd._functions import MatMul8bitLt, MatmulLtState

    original = bnb.matmul

    def matmul(A, B, out=None, state=None, threshold=0.0, bias=None):
        state = state or MatmulLtState()
        if threshold > 0.0:
            state.threshold = threshold
        return MatMul8bitLt.apply(A, B, out, bias, state)

    bnb.matmul = matmul
    try:
        yield
    finally:
        bnb.matmul = original


def _uncounted():
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def _int8_vectorwise_quant_cuda(A, threshold=0.0):
    """bitsandbytes' CUDA registration: the int8 rows and fp32 row scales, and for a threshold |A| ≥ t as a
    boolean mask (|A| in fp16 first) to find the outlier columns."""
    rows = A.numel() // A.shape[-1]
    row_stats = torch.empty(rows, device=A.device, dtype=torch.float32)
    out_row = torch.empty(A.shape, device=A.device, dtype=torch.int8)
    outlier_cols = None
    if threshold > 0.0:
        outliers = A.abs() >= threshold
        if outliers.any():
            outlier_cols = torch.argwhere(outliers.any(dim=0)).view(-1)
        else:
            outlier_cols = torch.empty(0, device=A.device, dtype=torch.int64)
    with _uncounted():
        q, stats, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(A.clone(), threshold)
        out_row.copy_(q)
        row_stats.copy_(stats)
    if rows > 1 and outlier_cols is not None:
        out_row[:, outlier_cols] = 0
    return out_row, row_stats, outlier_cols


def _int8_mm_dequant_cuda(A, row_stats, col_stats, dtype=None, bias=None):
    """The CUDA registration: an fp16 result (bias added in place), then cast to `dtype`."""
    out = torch.empty_like(A, dtype=torch.float16)
    with _uncounted():
        out.copy_(torch.ops.bitsandbytes.int8_mm_dequant.default(A, row_stats, col_stats, dtype=torch.float16))
    if bias is not None:
        out.add_(bias)
    return out.to(dtype or torch.float16)


def _int8_scaled_mm_default(A, B, row_stats, col_stats, bias=None, dtype=None):
    """bitsandbytes' default implementation (what CUDA runs): the int8 matmul's int32 result, then dequantized."""
    out_i32 = torch.ops.bitsandbytes.int8_linear_matmul.default(A, B)
    return torch.ops.bitsandbytes.int8_mm_dequant.default(out_i32, row_stats, col_stats, dtype=dtype or torch.float16,
                                                          bias=bias)


def _int8_mixed_scaled_mm_default(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None):
    """bitsandbytes' default implementation (what CUDA runs): the outlier columns of A kept in 16-bit and their
    weight columns dequantized, added to the int8 product."""
    sub_b = None
    if outlier_cols is not None and outlier_cols.numel():
        sub_a = A[:, outlier_cols].contiguous()
        sub_b = torch.ops.bitsandbytes.int8_vectorwise_dequant.default(CB[:, outlier_cols].contiguous(), SCB)
        sub_b = sub_b.to(A.dtype).t()
    else:
        sub_a = torch.empty(0, device=A.device, dtype=A.dtype)
    output = torch.ops.bitsandbytes.int8_scaled_mm.default(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype)
    if sub_b is not None:
        output = output.addmm(sub_a, sub_b)
    return output, sub_a


_INT8_AS_ON_CUDA = {
    "bitsandbytes::int8_vectorwise_quant": _int8_vectorwise_quant_cuda,
    "bitsandbytes::int8_mm_dequant": _int8_mm_dequant_cuda,
    "bitsandbytes::int8_scaled_mm": _int8_scaled_mm_default,
    "bitsandbytes::int8_mixed_scaled_mm": _int8_mixed_scaled_mm_default,
    "bitsandbytes::int8_vectorwise_dequant": int8_vectorwise_dequant,
}


def _vocab_size(config) -> int:
    return int(getattr(config, "vocab_size", None) or config.get_text_config().vocab_size)


# --------------------------------------------------------------------------- subprocess + cache
def _config_payload(cfg: MethodConfig) -> dict:
    from advisor.config import (peft_without_neutral_defaults, quantization_without_neutral_defaults,
                                without_neutral_defaults)

    out = cfg.model_dump(mode="json")
    out["training"] = without_neutral_defaults(out["training"])
    out["peft"] = peft_without_neutral_defaults(out["peft"])
    out["quantization"] = quantization_without_neutral_defaults(out.get("quantization"))
    return out


def structure_markers(resolved, cfg: MethodConfig) -> dict:
    """What changed in how a model is simulated, for the cache keys of the simulations and of the fits built on them
    (present only where it applies, so other keys stay as they were): the encoder-decoder seam windows (counter
    `seam_upper/lower`), and Falcon's Linear subclass built as nn.Linear under bitsandbytes (engine)."""
    from advisor.engine import plain_linear_applies

    return {**({"seams": 1} if resolved.kind == "seq2seq" else {}),
            **({"plain_linear": 1} if plain_linear_applies(resolved.config.model_type, cfg) else {})}


def model_payload(resolved) -> dict:
    """The model as another process rebuilds it (`model_from_payload`)."""
    return {"id": resolved.id, "kind": resolved.kind,
            "config": resolved.raw_config if resolved.raw_config is not None else resolved.config.to_dict()}


def model_from_payload(m: dict):
    from advisor.catalog.models import resolve_model

    resolved = resolve_model(m["config"])
    resolved.id, resolved.kind = m["id"], m["kind"]
    return resolved


def _request_payload(resolved, cfg: MethodConfig, batch_size: int, seq_len: int, steps: int, total_steps: int,
                     target: str = "cpu", allocator_workspaces: list[int] | None = None) -> dict:
    extra = {} if allocator_workspaces is None else {"allocator_workspaces": [int(w) for w in allocator_workspaces]}
    extra.update(structure_markers(resolved, cfg))
    return {**extra,
        "model": model_payload(resolved),
        "config": _config_payload(cfg),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "total_steps": total_steps,
        "target": target,
    }


def cache_dir() -> Path:
    from advisor.settings import get_settings

    path = get_settings().cache_dir / "simulations"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(payload: dict) -> str:
    keyed = {k: v for k, v in payload.items()}
    keyed["model"] = {k: v for k, v in payload["model"].items() if k != "id"}
    keyed["model"]["config"] = {k: v for k, v in keyed["model"]["config"].items()
                                if k not in ("_name_or_path", "transformers_version", "architectures")}
    from advisor.losses import loss_graph_key

    keyed.update(loss_graph_key((payload.get("config") or {}).get("training") or {}))
    blob = json.dumps({"request": keyed, "versions": _versions()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def simulate(resolved, cfg: MethodConfig, batch_size: int, seq_len: int, steps: int = 2, total_steps: int = 100,
             use_cache: bool = True, timeout_s: float = 900, target: str = "cpu",
             allocator_workspaces: list[int] | None = None) -> dict:
    """Simulate in a subprocess, with an on-disk cache. Raises RuntimeError with the child's error text.
    `allocator_workspaces` (bytes of the device's library workspaces) also replays the step's allocations through
    the caching-allocator model (`result["allocator"]`, see advisor.memory.allocator)."""
    payload = _request_payload(resolved, cfg, batch_size, seq_len, steps, total_steps, target, allocator_workspaces)
    key = cache_key(payload)
    path = cache_dir() / f"{key}.json"
    if use_cache and path.exists():
        try:
            result = json.loads(path.read_text())
            result["cached"] = True
            return result
        except (OSError, json.JSONDecodeError):
            path.unlink(missing_ok=True)
    result = _in_child(payload, timeout_s)
    if "error" in result:
        if result.get("field"):
            from advisor.errors import AdvisorInputError

            raise AdvisorInputError(result["field"], result["error"].split(": ", 2)[-1])
        raise RuntimeError(result["error"])
    result["model_id"] = resolved.id
    write_text_atomic(path, json.dumps(result))
    result["cached"] = False
    return result


_SERVER = None
_SERVER_LOCK = threading.Lock()


def warm_simulator() -> bool:
    """Whether simulations fork from a warm server (ADVISOR_WARM_SIMULATOR, default on where there is os.fork)."""
    from advisor.settings import get_settings

    return get_settings().warm_simulator and hasattr(os, "fork")


def warm_server():
    """This process's fork server for simulations (advisor.jobs.forkserver, without a database), started on first
    use and again if it died."""
    global _SERVER
    from advisor.jobs.forkserver import ForkServer

    with _SERVER_LOCK:
        if _SERVER is None or not _SERVER.alive():
            import tempfile

            log = Path(tempfile.gettempdir()) / f"advisor-simulation-server-{os.getpid()}.log"
            started: dict = {}
            ready = threading.Event()

            def keep() -> None:
                # the server dies with the thread that started it (Linux's parent-death signal follows the creating
                # thread, not the process): a thread of its own, alive as long as the server, not the caller's
                # thread (a web server's pool thread may end a few seconds after the request)
                try:
                    started["server"] = ForkServer(None, log, env={**os.environ, **CHILD_ENV})
                except BaseException as err:  # noqa: BLE001 - raised in the caller below
                    started["error"] = err
                finally:
                    ready.set()
                if "server" in started:
                    started["server"].proc.wait()

            threading.Thread(target=keep, name="simulation-server", daemon=True).start()
            ready.wait()
            if "error" in started:
                raise started["error"]
            _SERVER = started["server"]
        return _SERVER


CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # a simulation reads nothing from the Hub


def _in_child(payload: dict, timeout_s: float) -> dict:
    """The simulation's result, computed in another process: forked from the warm server, else a fresh interpreter.
    Raises RuntimeError with the end of the child's output when it dies without a result, TimeoutError after
    `timeout_s`."""
    env = {**os.environ, **CHILD_ENV}
    if warm_simulator():
        import tempfile
        import uuid

        with tempfile.TemporaryDirectory(prefix="advisor-simulation-") as tmp:
            result, log = Path(tmp) / "result.json", Path(tmp) / "child.log"
            child = warm_server().start(f"simulation-{uuid.uuid4().hex}", log, timeout=timeout_s,
                                    simulate=payload, result=str(result), env=env, cwd=os.getcwd())
            if child is not None:  # else the server is gone or unusable: a fresh interpreter below
                try:
                    code = child.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    child.kill()
                    raise TimeoutError(f"simulation did not finish in {timeout_s:g} s") from None
                if result.exists():
                    return json.loads(result.read_text())
                tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
                raise RuntimeError(f"simulation failed (exit {code}): " + " | ".join(tail))
    try:
        proc = subprocess.run([sys.executable, "-m", "advisor.memory.simulate"], input=json.dumps(payload),
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"simulation did not finish in {timeout_s:g} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"simulation failed (exit {proc.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1])


def write_child_result(payload: dict, path: str) -> None:
    """In a child forked by the server: simulate and write the result where the caller waits for it."""
    write_text_atomic(Path(path), json.dumps(_child_result(payload), default=str))


def _child_main() -> None:
    payload = json.loads(sys.stdin.read())
    print(json.dumps(_child_result(payload), default=str), flush=True)


def _child_result(payload: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    try:
        resolved = model_from_payload(payload["model"])
        cfg = MethodConfig.model_validate(payload["config"])
        result = simulate_in_process(resolved, cfg, payload["batch_size"], payload["seq_len"], payload["steps"],
                                     payload["total_steps"], payload.get("target", "cpu"),
                                     allocator_workspaces=payload.get("allocator_workspaces"))
    except Exception as err:  # reported to the parent as data, not a traceback on stdout
        result = {"error": f"{type(err).__name__}: {err}", "field": getattr(err, "field", None)}
    return result


if __name__ == "__main__":
    _child_main()
