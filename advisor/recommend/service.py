"""scenario → rules → configs → estimate → rank: the Recommendation of CONTRACT.md.

One request, each step once:

1. **Scenario** (`advisor.rules.parse_scenario`); a `dataset.path` is profiled first (`dataset.py`): rows and token
   lengths, the longest example setting the sequence length the memory estimate uses.
2. **Rules** (`advisor.rules.evaluate`, one evaluation): the decision (fine-tune or not), each method's score from
   the seeds' decision trees, the methods the rules rule out, per-method hyperparameters with their sources, and the
   seeds' disagreements.
3. **Configs**: for every method the rules leave standing, the method's defaults (advisor/methods/defaults.yaml)
   overlaid with the rules' suggestions, the dataset's longest example as `max_seq_length` (capped at the model's
   positions), the precision the GPU supports (bf16; fp16 on cards without bf16 such as T4 and V100), and the
   warmup the seeds give in steps turned into a ratio of this run's steps.
4. **Estimate** (the fast estimator, one memory model per method and checkpointing setting): the largest
   micro-batch that fits each GPU. Gradient checkpointing only when needed: it stays off when the method fits at
   least half the suggested micro-batch without it. The micro-batch is the suggested one or the largest that fits,
   and accumulation keeps the seeds' effective batch. With several GPUs the first strategy that fits is taken in the
   order DDP, ZeRO-2, ZeRO-3, ZeRO-2 + offload, ZeRO-3 + offload, ZeRO-3 + parameter offload. A method that does
   not fit at micro-batch 1 with checkpointing under any strategy is rejected with its numbers; so is one over the
   budget (dollars or hours).
5. **Rank** by `priority`: the rules' score (which already holds the seeds' accuracy/speed/parameter tables for the
   stated priority) plus an estimator term: `cost` and `speed` subtract 3 points (one decision-tree leaf) per
   doubling of dollars / hours over the cheapest / fastest candidate, `balanced` 1 point per doubling of dollars,
   `min_params` 1.5 points per tenfold trainable parameters; `quality` uses the rules' score alone. Ties go to the
   seeds' method order.

Every reason cites its source (seed file § section, or `estimator`); the seeds' disagreements that touched the
chosen method are stated in `notes` with how they were settled.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from advisor.errors import AdvisorInputError
from advisor.estimator.fast import STRATEGY_ORDER

GIB = 2**30
STRATEGY_WORDS = {
    "single": "one GPU", "ddp": "DDP (replicated)", "zero2": "ZeRO-2 / FSDP SHARD_GRAD_OP",
    "zero3": "ZeRO-3 / FSDP FULL_SHARD", "zero2_offload": "ZeRO-2 + CPU offload",
    "zero3_offload": "ZeRO-3 + CPU offload",
    "zero3_offload_params": "ZeRO-3 / FSDP + CPU offload of parameters and optimizer state",
}
PRIORITY_WEIGHTS = {  # points per doubling (cost, speed, balanced) or per tenfold (min_params)
    "cost": ("cost_usd", 3.0, 2.0), "speed": ("train_hours", 3.0, 2.0), "balanced": ("cost_usd", 1.0, 2.0),
    "min_params": ("trainable_params", 1.5, 10.0), "quality": (None, 0.0, 2.0),
}
MAX_ALTERNATIVES = 4


@dataclass
class Candidate:
    method: str
    rule_score: float
    config: Any = None  # MethodConfig
    estimate: dict | None = None  # the full estimate, computed for the candidates shown
    summary: dict = field(default_factory=dict)  # cost/hours/params for ranking
    mm: Any = None
    max_micro_batch: int = 0
    strategy: str = "single"
    rejected: str | None = None
    rejected_numbers: dict = field(default_factory=dict)
    adjustments: list[str] = field(default_factory=list)
    score: float = 0.0


def recommend(scenario: Any, *, allow_any_path: bool = True) -> dict[str, Any]:
    """The Recommendation for a Scenario dict (CONTRACT.md). Bad input raises AdvisorInputError naming the field.

    `allow_any_path=False` (the REST API) refuses a `dataset.path` outside the data root."""
    from advisor.hardware import resolve_hardware
    from advisor.rules import evaluate, facts_from_scenario, parse_scenario

    started = time.perf_counter()
    sc = parse_scenario(scenario)
    rm = _resolve_model(sc.model)
    hw = resolve_hardware(sc.hardware)
    profile = None
    if sc.dataset.path:
        from advisor.recommend.dataset import profile_dataset

        path = sc.dataset.path if allow_any_path else str(_inside_data_root(sc.dataset.path))
        profile = profile_dataset(path, rm, sc.dataset.format)
        updates = {k: getattr(sc.dataset, k) if getattr(sc.dataset, k) is not None else profile[k]
                   for k in ("num_examples", "avg_tokens", "max_tokens")}
        if updates["avg_tokens"] > updates["max_tokens"]:
            updates["avg_tokens"] = float(updates["max_tokens"])
        sc = sc.model_copy(update={"dataset": sc.dataset.model_copy(update=updates)})
    ev = evaluate(facts_from_scenario(sc, resolved_model=rm, hardware_target=hw))

    out: dict[str, Any] = {
        "decision": ev.decision, "method": None, "config": None, "estimate": None, "reasons": [],
        "alternatives": [], "rejected": [], "notes": [],
    }
    if ev.decision != "fine_tune":
        out["reasons"] = [_reason(r) for r in ev.decision_rules] or [_fallback_reason(ev)]
        if ev.ranking:
            top = ev.ranking[0]
            out["notes"].append(
                f"If you fine-tune anyway, the rules rank {top} first for this model, data and hardware "
                f"(score {ev.method_scores[top]:g}); ask again with the context that changes the decision.")
        out["notes"] += [_conflict_note(c, {}) for c in ev.conflicts_for(None, include_static=False)
                         if not c["methods"]]
    else:
        # an encoder-decoder's decoder runs over the longest target (a summary, a label), not the source length
        target = (profile or {}).get("max_target_tokens") if rm.kind == "seq2seq" else None
        _fine_tune(out, sc, rm, hw, ev, target)
    out["advice"] = ev.notes
    out["conflicts"] = ev.conflicts_for(out["method"], include_static=True)
    out["fired"] = ev.fired
    out["scenario"] = sc.model_dump(mode="json")
    out["model"] = rm.id
    out["hardware"] = hw.to_public()
    if profile is not None:
        out["dataset_profile"] = profile
    out["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return out


_CATALOG_MODELS: dict[str, Any] = {}


def _resolve_model(ref):
    """resolve_model, remembering catalog entries (immutable data) across requests; the recommender never
    modifies a resolved model."""
    from advisor.catalog.models import find_model, resolve_model

    if isinstance(ref, str):
        entry = find_model(ref.strip())
        if entry is not None:
            rm = _CATALOG_MODELS.get(entry.id)
            if rm is None:
                rm = _CATALOG_MODELS[entry.id] = resolve_model(ref)
                rm.recommend_key = rm.cache_key()
            return rm
    rm = resolve_model(ref)
    rm.recommend_key = rm.cache_key()
    return rm


# ------------------------------------------------------------------------------------------------ fine-tuning
def _fine_tune(out: dict, sc, rm, hw, ev, target: int | None = None) -> None:
    from advisor.estimator.profile import profile_for

    ds = sc.dataset
    seq, seq_note, wanted = _sequence_length(ds, rm)
    precision = _precision(hw)
    profile = profile_for(hw)
    candidates = [Candidate(m, ev.method_scores[m]) for m in ev.ranking]
    _prefetch_fits(candidates, lambda c: _configure_and_fit(c, sc, rm, hw, ev, seq, precision, profile, wanted, target))
    for cand in candidates:
        try:
            _configure_and_fit(cand, sc, rm, hw, ev, seq, precision, profile, wanted, target)
        except AdvisorInputError as err:  # a method that cannot be built for this model (e.g. BitFit w/o biases)
            cand.rejected = f"{cand.method} cannot be configured for {rm.id}: {err.message}"
    _apply_budget(candidates, sc.budget)
    feasible = [c for c in candidates if c.rejected is None]
    _rank(feasible, sc.priority)

    out["rejected"] = [
        {"method": m, "why": "; ".join(r["says"] for r in why), "rules": why} for m, why in ev.infeasible.items()
    ] + [{"method": c.method, "why": c.rejected, **({"numbers": c.rejected_numbers} if c.rejected_numbers else {})}
         for c in candidates if c.rejected is not None]
    if seq_note:
        out["notes"].append(seq_note)
    if precision["note"]:
        out["notes"].append(precision["note"])
    if not feasible:
        out["reasons"] = [_reason(r) for r in ev.decision_rules] or [_fallback_reason(ev)]
        out["notes"].append(_nothing_fits_note(candidates, hw))
        suggestion = _hardware_suggestion(sc, ev, candidates)
        if suggestion:
            out["hardware_suggestion"] = suggestion
            out["notes"].append(
                f"Cheapest hardware where {suggestion['method']} fits: {suggestion['count']}× {suggestion['gpu']} "
                f"({suggestion['peak_vram_gib']:.1f} GiB per GPU"
                + (f", ${suggestion['cost_usd']:.2f}" if suggestion.get("cost_usd") is not None else "") + ").")
        return

    best = feasible[0]
    for c in feasible[:1 + MAX_ALTERNATIVES]:
        _finish(c)
    out["method"] = best.method
    out["config"] = best.config.model_dump(mode="json")
    out["estimate"] = _public_estimate(best)
    out["config_sources"] = ev.hyperparameter_sources.get(best.method, {})
    out["reasons"] = _reasons_for(best, ev, hw, causal=rm.kind != "seq2seq")
    out["alternatives"] = [
        {"method": c.method, "config": c.config.model_dump(mode="json"), "estimate": _public_estimate(c),
         "why_not_first": _why_not_first(c, best, sc.priority), "score": round(c.score, 3)}
        for c in feasible[1:1 + MAX_ALTERNATIVES]
    ]
    out["ranking"] = [{"method": c.method, "score": round(c.score, 3), "rule_score": c.rule_score} for c in feasible]
    by_method = {c.method: c for c in candidates}
    out["notes"] += [_conflict_note(c, by_method) for c in ev.conflicts_for(best.method, include_static=True)]
    out["notes"] += [f"{best.method}: {r['says']} ({r['source']})" for r in ev.method_notes.get(best.method, [])]
    out["notes"] += best.adjustments
    out["notes"] += [n for n in best.estimate.get("notes", []) if n not in out["notes"]]


def _prefetch_fits(candidates: list[Candidate], configure) -> None:
    """With ADVISOR_FIT_WORKERS > 1 (settings.fit_workers), the fits the candidates need run in parallel processes
    before the candidates are configured one by one, which then read them from the fit cache. Which fits a candidate
    needs depends on earlier ones (checkpointing is fitted when the step does not fit without it; offloading fits the
    step without it too), so the candidates are configured on copies with fitting turned into recording, and each wave's
    missing fits computed together, until a wave finds none missing."""
    from advisor.estimator import coefficients
    from advisor.settings import get_settings

    workers = get_settings().fit_workers
    if workers < 2:
        return
    for _ in range(3):
        with coefficients.collecting_misses() as misses:
            for cand in candidates:
                try:
                    configure(Candidate(cand.method, cand.rule_score))
                except (coefficients.FitMissing, AdvisorInputError):
                    pass
        if coefficients.fit_in_parallel(misses, workers) == 0:
            return


def _sequence_length(ds, rm) -> tuple[int, str | None, int]:
    """(tokens per example after truncation: the longest example capped at the model's positions, a note, the
    longest example uncapped: LongLoRA trains at that length with RoPE scaling)"""
    wanted = ds.max_tokens or (int(math.ceil(ds.avg_tokens * 2)) if ds.avg_tokens else 1024)
    limit = rm.max_positions
    note = None
    if ds.max_tokens is None:
        note = (f"max_tokens not given: the sequence length is {wanted} "
                f"({'2 × avg_tokens' if ds.avg_tokens else 'the default'}); give dataset.max_tokens or "
                "dataset.path for the longest example to set the memory peak.")
    full = max(8, int(wanted))
    if limit is not None and wanted > limit:
        note = (f"The longest example ({wanted} tokens) exceeds {rm.id}'s {limit} positions: examples are "
                f"truncated to {limit} tokens, except with LongLoRA, which extends the context by RoPE position "
                f"interpolation (config.training.rope_scaling).")
        wanted = limit
    return max(8, int(wanted)), note, full


def _precision(hw) -> dict[str, Any]:
    gpu = hw.gpu
    if hw.has_gpu and gpu is not None and not gpu.bf16_supported:
        return {"bf16": False, "fp16": True, "compute_dtype": "float16",
                "note": f"{gpu.name} has no bfloat16 support: fp16 mixed precision with loss scaling."}
    return {"bf16": True, "fp16": False, "compute_dtype": "bfloat16", "note": None}


def _configure_and_fit(cand: Candidate, sc, rm, hw, ev, seq: int, precision: dict, profile,
                       wanted: int | None = None, target: int | None = None) -> None:
    from advisor.estimator.fast import time_and_cost
    from advisor.methods import get_method

    spec = get_method(cand.method)
    suggested = ev.config_for(cand.method)
    training = dict(suggested["training"])
    warmup_steps = training.pop("warmup_steps", None)
    defaults = spec.default_training()
    micro = int(training.get("per_device_train_batch_size", defaults.get("per_device_train_batch_size", 4)))
    accum = int(training.get("gradient_accumulation_steps", defaults.get("gradient_accumulation_steps", 4)))
    effective = micro * accum
    training.update(max_seq_length=seq, bf16=precision["bf16"], fp16=precision["fp16"], torch_dtype=None)
    if target:
        training["max_target_length"] = int(target)
    limit = rm.max_positions
    if (cand.method == "longlora" and wanted and limit and wanted > limit
            and hasattr(rm.config, "rope_parameters")):
        # LongLoRA's purpose: train at the documents' length with position interpolation (Chen et al. 2023), the
        # way the LongLoRA paper extends Llama-2 from 4K to 32K-100K tokens
        factor = float(math.ceil(wanted / limit))
        seq = wanted
        training.update(max_seq_length=seq, rope_scaling={"type": "linear", "factor": factor})
        cand.adjustments.append(
            f"longlora: RoPE linear scaling × {factor:g} extends {rm.id} from {limit} to {int(limit * factor)} "
            f"positions, so the longest example ({wanted} tokens) trains untruncated.")
    quant = {"bnb_4bit_compute_dtype": precision["compute_dtype"]} if spec.quantized else None
    devices = max(1, hw.count) if hw.has_gpu else 1
    memory = hw.memory_gib * GIB if hw.has_gpu else None

    def build(gc: bool, micro_batch: int, accumulation: int):
        t = {**training, "gradient_checkpointing": gc, "per_device_train_batch_size": micro_batch,
             "gradient_accumulation_steps": accumulation}
        return spec.resolve_config({"peft": suggested["peft"], "training": t, "quantization": quant})

    def fit(gc: bool):
        cfg = build(gc, micro, accum)
        fm = _fitted_model(sc, rm, spec, cfg, hw, seq, profile)
        if memory is None:
            return fm, cfg, "ddp", micro
        for strategy in STRATEGY_ORDER if devices > 1 else ("ddp",):
            mb = fm.max_micro_batch(memory, strategy, devices)
            if mb >= 1:
                return fm, cfg, strategy, mb
        return fm, cfg, None, 0

    fm, cfg, strategy, max_mb = fit(False)
    gc = False
    if memory is not None and max_mb < max(1, micro // 2):
        try:
            fm_gc, cfg_gc, strategy_gc, max_mb_gc = fit(True)
        except AdvisorInputError:  # the method refuses checkpointing (prefix tuning)
            max_mb_gc = -1
        if max_mb_gc > max_mb or max_mb == max_mb_gc == 0:  # fits better, or neither fits (report with it on)
            if max_mb_gc > 0:
                cand.adjustments.append(
                    f"Gradient checkpointing on: without it {cand.method} fits "
                    + (f"only micro-batch {max_mb}" if max_mb else "no micro-batch") + f" on {hw.name}.")
            fm, cfg, strategy, max_mb, gc = fm_gc, cfg_gc, strategy_gc, max_mb_gc, True
    if strategy is None:
        peak_1 = min(fm.mm.fit_bytes(1, s, devices)[1] for s in (STRATEGY_ORDER if devices > 1 else ("ddp",)))
        cand.rejected = (f"needs {peak_1 / GIB:.1f} GiB per GPU at micro-batch 1"
                         f"{' with gradient checkpointing' if gc else ''}"
                         f"{' under the best sharding' if devices > 1 else ''}; {hw.name} has "
                         f"{hw.memory_gib:.1f} GiB usable" + (f" (×{devices})" if devices > 1 else ""))
        cand.rejected_numbers = {"peak_vram_gib_at_micro_batch_1": round(peak_1 / GIB, 2),
                                 "usable_gib": hw.memory_gib, "gpus": devices}
        return
    new_micro = min(micro, max_mb)
    new_accum = max(1, math.ceil(effective / (new_micro * devices)))
    if new_micro < micro:
        cand.adjustments.append(
            f"{cand.method}: micro-batch {new_micro} (the largest that fits) × accumulation {new_accum}"
            f"{f' × {devices} GPUs' if devices > 1 else ''} keeps the seeds' effective batch of {effective}.")
    epochs = float(training.get("num_train_epochs", defaults.get("num_train_epochs", 3)))
    total_steps = max(1, math.ceil(sc.dataset.num_examples / (new_micro * new_accum * devices))) * \
        max(1, math.ceil(epochs))
    if warmup_steps is not None:
        training["warmup_ratio"] = round(min(0.5, warmup_steps / total_steps), 4)
    changes = {"per_device_train_batch_size": new_micro, "gradient_accumulation_steps": new_accum}
    if warmup_steps is not None:
        changes["warmup_ratio"] = training["warmup_ratio"]
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update=changes)})  # values already validated
    mm = fm.for_plan(cfg, new_micro)
    timing = time_and_cost(mm, new_micro, strategy, devices)
    cand.config, cand.mm, cand.strategy = cfg, mm, strategy
    cand.max_micro_batch = max_mb
    cand.summary = {
        "cost_usd": timing["cost_usd"], "train_hours": timing["train_hours"], "tokens_per_s": timing["tokens_per_s"],
        "trainable_params": mm.static.trainable_params, "total_steps": total_steps,
        "effective_batch": new_micro * new_accum * devices,
    }


def _remembering(mm):
    """The memory model as a :class:`_RememberingModel` (same fields), so its micro-batch search runs once."""
    from advisor.estimator.fast import MemoryModel

    global _RememberingModel
    if _RememberingModel is None:
        class _RememberingModel(MemoryModel):  # noqa: N801 - defined lazily (keeps torch imports off module import)
            """A fitted memory model whose largest micro-batch per (memory, strategy, devices) is remembered across
            requests (it depends only on the fit and the memory, not on the request)."""

            def max_micro_batch(self, memory_bytes, strategy="ddp", devices=1, limit=4096):
                key = (memory_bytes, strategy, devices, limit)
                found = self.remembered.get(key)
                if found is None:
                    found = self.remembered[key] = super().max_micro_batch(memory_bytes, strategy, devices, limit)
                return found

    import dataclasses

    out = _RememberingModel(**{f.name: getattr(mm, f.name) for f in dataclasses.fields(mm)})
    out.remembered = getattr(mm, "remembered", {})
    return out


_RememberingModel = None


class _Fitted:
    """A memory model for one (architecture, method config, sequence length, profile), reusable across requests."""

    def __init__(self, mm):
        self.mm = _remembering(mm)

    def max_micro_batch(self, memory: float, strategy: str, devices: int) -> int:
        return self.mm.max_micro_batch(memory, strategy, devices)

    def for_plan(self, cfg, micro: int):
        import dataclasses

        plan = dataclasses.replace(self.mm.plan, config=cfg, batch_size=micro)
        out = dataclasses.replace(self.mm, plan=plan)
        out.remembered = self.mm.remembered
        return out


_FITTED: dict[tuple, _Fitted | AdvisorInputError] = {}
_FITTED_MAX = 4096


def _fitted_model(sc, rm, spec, cfg, hw, seq: int, profile) -> _Fitted:
    from advisor.estimator.fast import memory_model
    from advisor.estimator.plan import Plan
    from advisor.schemas import Dataset, EstimateRequest

    memory_cfg = cfg.model_dump_json(include={"method", "peft", "quantization"}) + cfg.training.model_dump_json(
        include={"torch_dtype", "optim", "bf16", "fp16", "gradient_checkpointing", "attn_implementation",
                 "max_seq_length", "rope_scaling", "max_target_length"})
    key = (rm.recommend_key, memory_cfg, seq, profile.id, hw.has_gpu)
    found = _FITTED.get(key)
    if isinstance(found, AdvisorInputError):  # this config cannot be built (remembered: the fit is not retried)
        raise found
    request = getattr(sc, "_estimate_request", None)
    if request is None:  # one per scenario: the plan reads only its dataset (time and cost)
        ds = sc.dataset
        request = EstimateRequest.model_construct(
            model=sc.model, hardware=sc.hardware, method=spec.id, config=None, exact=False,
            dataset=Dataset.model_construct(num_examples=ds.num_examples or None, avg_tokens=ds.avg_tokens,
                                            max_tokens=ds.max_tokens, path=None, format="auto"),
        )
        object.__setattr__(sc, "_estimate_request", request)
    plan = Plan(rm, spec, cfg, hw, cfg.training.per_device_train_batch_size, seq, request)
    if found is not None:
        out = _Fitted.__new__(_Fitted)
        out.mm = found.for_plan(cfg, plan.batch_size)
        out.mm.plan = plan
        return out
    if len(_FITTED) >= _FITTED_MAX:
        _FITTED.clear()
    try:
        fitted = _Fitted(memory_model(plan, profile))
    except AdvisorInputError as err:
        _FITTED[key] = err
        raise
    _FITTED[key] = fitted
    return fitted


def _finish(cand: Candidate) -> None:
    """The full estimate (breakdown, band, per-strategy peaks) — only for the candidates shown."""
    from advisor.estimator.fast import estimate_plan

    if cand.estimate is None:
        devices = cand.mm.plan.hardware.count if cand.mm.plan.hardware.has_gpu else 1
        est = estimate_plan(cand.mm.plan, strategy=cand.strategy if devices > 1 else None, mm=cand.mm)
        est.update(total_steps=cand.summary["total_steps"], effective_batch=cand.summary["effective_batch"])
        cand.estimate = est


def _apply_budget(candidates: list[Candidate], budget) -> None:
    for c in candidates:
        if c.rejected is not None or not c.summary:
            continue
        cost, hours = c.summary.get("cost_usd"), c.summary.get("train_hours")
        if budget.max_usd is not None and cost is not None and cost > budget.max_usd:
            c.rejected = f"over budget: ${cost:,.2f} > budget.max_usd ${budget.max_usd:,.2f}"
        elif budget.max_hours is not None and hours is not None and hours > budget.max_hours:
            c.rejected = f"over budget: {hours:.2f} h > budget.max_hours {budget.max_hours:g} h"


def _rank(feasible: list[Candidate], priority: str) -> None:
    from advisor.rules import load_rules

    key, points, base = PRIORITY_WEIGHTS.get(priority, PRIORITY_WEIGHTS["balanced"])
    values = {}
    if key is not None:
        for c in feasible:
            v = c.summary.get(key)
            if isinstance(v, (int, float)) and v > 0:
                values[c.method] = float(v)
    best = min(values.values()) if values else None
    for c in feasible:
        c.score = c.rule_score
        if best is not None and c.method in values:
            c.score -= points * math.log(values[c.method] / best, base)
    order = load_rules().method_index
    feasible.sort(key=lambda c: (-round(c.score, 9), order[c.method]))


# ------------------------------------------------------------------------------------------------ wording
def _reason(ref: dict) -> dict:
    return {"rule": ref["rule"], "says": ref["says"], "source": ref["source"]}


def _fallback_reason(ev) -> dict:
    return {"rule": "decision.default", "says": f"No rule argues against fine-tuning here: {ev.decision}.",
            "source": "advisor/rules/rules.yaml § decision_order"}


LOGITS_SHARE = 0.2  # logits at least this share of the peak's tensors: point to the fused loss
GRADIENTS_SHARE = 0.2  # gradients at least this share (one GPU): point to the optimizer step in backward
ACTIVATIONS_SHARE = 0.3  # activations at least this share with checkpointing on: point to activation offloading


def _reasons_for(best: Candidate, ev, hw, causal: bool = True) -> list[dict]:
    reasons = [_reason(r) for r in ev.decision_rules[:3]]
    reasons += [_reason(r) for r in ev.method_reasons.get(best.method, []) if r["weight"] > 0 and r["counted"]]
    est = best.estimate
    if est.get("fits") is not None:
        reasons.append({
            "rule": "estimator.fits",
            "says": (f"Peak {est['peak_vram_gib']:.1f} GiB per GPU (band {est['peak_vram_low_gib']:.1f}-"
                     f"{est['peak_vram_high_gib']:.1f}) of {hw.memory_gib:.1f} GiB usable on {hw.name} at micro-batch "
                     f"{est['micro_batch']} × {est['seq_len']} tokens"
                     + (f", {STRATEGY_WORDS.get(est['strategy'], est['strategy'])}" if hw.count > 1 else "")
                     + (", gradient checkpointing" if best.config.training.gradient_checkpointing else "") + "."),
            "source": "estimator",
        })
    parts = est.get("breakdown_gib") or {}
    logits = parts.get("logits") or 0.0
    tensors = sum(v for k, v in parts.items() if k != "overhead")
    if (tensors > 0 and logits >= LOGITS_SHARE * tensors
            and best.config.training.cross_entropy == "standard" and causal):
        reasons.append({
            "rule": "estimator.logits",
            "says": (f"The logits hold {logits:.2f} of the {tensors:.2f} GiB of tensors at the peak: "
                     "config.training.cross_entropy 'fused_linear' (Liger Kernel's fused linear cross-entropy, which "
                     "the executor runs too) keeps one chunk of them at a time; `advisor estimate --cross-entropy "
                     "fused_linear` gives the peak with it."),
            "source": "estimator",
        })
    gradients = parts.get("gradients") or 0.0
    training = best.config.training
    if (tensors > 0 and gradients >= GRADIENTS_SHARE * tensors and hw.count == 1
            and not training.optimizer_in_backward and best.method != "adalora"):
        reasons.append({
            "rule": "estimator.gradients",
            "says": (f"The gradients hold {gradients:.2f} of the {tensors:.2f} GiB of tensors at the peak: "
                     "config.training.optimizer_in_backward (each parameter steps inside backward and drops its "
                     "gradient, torchtune's optimizer_in_bwd; with gradient_accumulation_steps 1 and max_grad_norm 0) "
                     "never holds them all; `advisor estimate --optimizer-in-backward` gives the peak with it."),
            "source": "estimator",
        })
    activations = parts.get("activations") or 0.0
    if (tensors > 0 and activations >= ACTIVATIONS_SHARE * tensors and training.gradient_checkpointing
            and not training.activation_offloading):
        reasons.append({
            "rule": "estimator.activations",
            "says": (f"The activations hold {activations:.2f} of the {tensors:.2f} GiB of tensors at the peak, "
                     "with checkpointing on: config.training.activation_offloading (the saved activations wait in "
                     "host memory until backward, as torchtune / TRL / Axolotl offload them; slower by the PCIe "
                     "copies) keeps only the block being recomputed; `advisor estimate --activation-offloading` "
                     "gives the peak with it."),
            "source": "estimator",
        })
    high = est.get("peak_vram_high_gib")
    if est.get("fits") and high is not None and hw.memory_gib is not None and high > hw.memory_gib:
        reasons.append({
            "rule": "estimator.borderline",
            "says": (f"Close to the limit: the band's top ({high:.1f} GiB) is above the {hw.memory_gib:.1f} GiB usable. "
                     "`advisor estimate --exact` simulates this step and, with a GPU profile that measured the "
                     "allocator, replays it (Llama-2-7B on an H100: −2.8 … +0.5%)"
                     + (f"; or take micro-batch {est['micro_batch'] - 1} with more accumulation."
                        if est["micro_batch"] > 1 else ".")),
            "source": "estimator",
        })
    if est.get("train_hours") is not None:
        reasons.append({
            "rule": "estimator.time_cost",
            "says": (f"≈{est['tokens_per_s']:,.0f} tokens/s, {est['train_hours']:.2f} h"
                     + (f", ${est['cost_usd']:,.2f}" if est.get("cost_usd") is not None else "") + " for the dataset."),
            "source": "estimator",
        })
    return reasons


def _public_estimate(c: Candidate) -> dict:
    return {k: v for k, v in c.estimate.items() if k not in ("config", "notes")}


def _why_not_first(c: Candidate, best: Candidate, priority: str) -> str:
    parts = []
    if c.rule_score < best.rule_score:
        parts.append(f"the seeds' rules score it {c.rule_score:g} vs {best.rule_score:g} for {best.method}")
    elif c.rule_score > best.rule_score:
        parts.append(f"the rules score it higher ({c.rule_score:g} vs {best.rule_score:g}), but for priority "
                     f"'{priority}' the estimate favours {best.method}")
    ce, be = c.estimate, best.estimate
    if ce.get("cost_usd") is not None and be.get("cost_usd") is not None:
        parts.append(f"${ce['cost_usd']:,.2f} vs ${be['cost_usd']:,.2f}")
    elif ce.get("train_hours") is not None and be.get("train_hours") is not None:
        parts.append(f"{ce['train_hours']:.2f} h vs {be['train_hours']:.2f} h")
    parts.append(f"peak {ce['peak_vram_gib']:.1f} vs {be['peak_vram_gib']:.1f} GiB")
    if not parts[0].startswith("the"):
        parts.insert(0, f"ties on the rules' score ({c.rule_score:g}); the seeds' method order puts {best.method} first")
    return "; ".join(parts)


def _conflict_note(conflict: dict, by_method: dict[str, Candidate]) -> str:
    text = f"The sources disagree — {conflict['topic']} Settled: {conflict['resolution']}"
    evidence = []
    for m in conflict.get("methods") or []:
        c = by_method.get(m)
        if c is None:
            continue
        if c.rejected:
            evidence.append(f"{m} rejected ({c.rejected})")
        elif c.mm is not None:
            evidence.append(f"{m} {_peak_gib(c):.1f} GiB at micro-batch {c.mm.plan.batch_size}")
    if evidence:
        text += " Estimator: " + ", ".join(evidence) + "."
    return text


def _peak_gib(c: Candidate) -> float:
    if c.estimate is not None:
        return c.estimate["peak_vram_gib"]
    if "peak_gib" not in c.summary:
        devices = c.mm.plan.hardware.count if c.mm.plan.hardware.has_gpu else 1
        c.summary["peak_gib"] = c.mm.peak(c.mm.plan.batch_size, c.strategy, devices)[0] / GIB
    return c.summary["peak_gib"]


def _nothing_fits_note(candidates: list[Candidate], hw) -> str:
    numbers = [(c.rejected_numbers.get("peak_vram_gib_at_micro_batch_1"), c.method) for c in candidates
               if c.rejected_numbers]
    numbers = [n for n in numbers if n[0] is not None]
    over = [c for c in candidates if c.rejected and c.rejected.startswith("over budget") and c.summary]
    if over:
        cheapest = min(over, key=lambda c: (c.summary.get("cost_usd") or math.inf, c.summary.get("train_hours") or 0))
        return (f"Every method that fits is over the budget; the cheapest, {cheapest.method}, needs "
                + (f"${cheapest.summary['cost_usd']:,.2f}" if cheapest.summary.get("cost_usd") is not None else "")
                + f" and {cheapest.summary['train_hours']:.2f} h on {hw.count}× {hw.name}.")
    if not numbers:
        return "No method is feasible for this scenario (see rejected)."
    need, method = min(numbers)
    return (f"No method fits {hw.count}× {hw.name}: the smallest, {method}, needs {need:.1f} GiB per GPU at "
            f"micro-batch 1 with gradient checkpointing.")


def _hardware_suggestion(sc, ev, candidates: list[Candidate]) -> dict | None:
    """For the rules' favourite that was rejected on memory: the cheapest catalog GPU × count where it fits."""
    from advisor.estimator.fast import compare_gpus
    from advisor.schemas import EstimateRequest

    memory_rejected = [c for c in candidates if c.rejected_numbers]
    if not memory_rejected:
        return None
    c = min(memory_rejected, key=lambda x: x.rejected_numbers["peak_vram_gib_at_micro_batch_1"])
    cfg = ev.config_for(c.method)
    training = {k: v for k, v in cfg["training"].items() if k != "warmup_steps"}
    training.update(gradient_checkpointing=True, per_device_train_batch_size=1)
    req = EstimateRequest.model_validate({
        "model": sc.model, "hardware": {"gpu": "h100", "count": 1}, "method": c.method,
        "config": {"peft": cfg["peft"], "training": training},
        "dataset": {k: v for k, v in sc.dataset.model_dump().items()
                    if k in ("num_examples", "avg_tokens", "max_tokens") and v},
    })
    rows = [r for r in compare_gpus(req) if r["fits"]]
    if not rows:
        return None
    return {"method": c.method, **rows[0]}


def _inside_data_root(path: str):
    """The REST API reads dataset files only under the data root (symlinks resolved)."""
    from pathlib import Path

    from advisor.settings import get_settings

    root = get_settings().data_root.resolve()
    p = Path(path)
    full = (p if p.is_absolute() else root / p).resolve()
    if full != root and root not in full.parents:
        raise AdvisorInputError("dataset.path", f"{path!r} is outside the data root; upload it (POST /v1/datasets) "
                                                f"or place it under {root}")
    return full
