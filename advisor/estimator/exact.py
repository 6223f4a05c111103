"""`estimate --exact`: the fake-tensor simulation of the real model and method, reported as an Estimate."""

from __future__ import annotations

from advisor.estimator.plan import Plan, breakdown_from_counter, build_plan, fit_fields
from advisor.memory.simulate import simulate
from advisor.schemas import EstimateRequest


def exact_estimate(req: EstimateRequest, use_cache: bool = True, allocator: str = "auto",
                   strategy: str | None = None) -> dict:
    plan = build_plan(req)
    return exact_from_plan(plan, use_cache=use_cache, allocator=allocator, strategy=strategy)


def _sharded_peaks(plan: Plan, sim: dict, devices: int) -> dict[str, tuple[float, dict, str]]:
    """Per strategy, the simulated replica's highest moment once its parameters, gradients and optimizer state are
    divided as the strategy shards them (the fast estimator's `_shard`), over every simulated phase: (tensor bytes
    per device, categories, phase)."""
    from advisor.estimator.fast import STRATEGIES, _shard, state_created_in_step
    from advisor.estimator.static import static_terms

    static = static_terms(plan.model, plan.config)
    out = {}
    for name, shard in STRATEGIES.items():
        best = None
        for phase, p in (sim.get("phases") or {}).items():
            cats = {k: float(v) for k, v in (p.get("breakdown_bytes") or {}).items()}
            if phase == "optimizer_first" and not p.get("state_counted"):
                cats = state_created_in_step(cats, static)
            cats = _shard(cats, shard, devices, static, phase)
            total = sum(cats.values())
            if best is None or total > best[0]:
                best = (total, cats, phase.split("_")[0])
        out[name] = best or (float(sim["peak_bytes"]), dict(sim["breakdown_bytes"]), sim["peak_phase"])
    return out


def exact_from_plan(plan: Plan, use_cache: bool = True, allocator: str = "auto", strategy: str | None = None) -> dict:
    """The simulated step; on a GPU with a profile that measured the allocator (`allocator_replay`) and a method whose
    every allocation the counter sees, the device's reserve comes from replaying the step's allocations
    (`allocator="auto"`); `allocator="fitted"` adds the profile's fitted overhead instead, the fast estimator's own
    (what bench.accuracy compares the fast closed form with)."""
    from advisor.estimator.profile import profile_for

    if allocator not in ("auto", "fitted"):
        raise ValueError(f"allocator must be 'auto' or 'fitted', got {allocator!r}")
    from advisor.estimator.fast import check_strategy, first_fitting_strategy, resolve_strategy, strategies_for

    devices = plan.hardware.count
    strategy = resolve_strategy(strategy, devices)
    check_strategy(plan, strategy)
    profile = profile_for(plan.hardware)
    # one replica's allocation trace: a sharded run allocates differently, so several GPUs use the fitted overhead
    from advisor.estimator.coefficients import _simulation_config

    # bitsandbytes' 8-bit optimizers read their state's values (data-dependent: they cannot run on fake tensors):
    # the step is simulated with fused AdamW and the state replaced by its exact analytic size, as the fast model does
    sim_config = _simulation_config(plan.config)
    substituted = sim_config is not plan.config
    # a paged optimizer's state is outside the allocator (unified memory): not in a replay, no overhead on it
    paged_optim = plan.config.training.optim.startswith("paged_")
    replay = (profile.allocator_replay(plan.profile_method)
              if plan.target == "cuda" and allocator == "auto" and devices == 1 and not substituted
              and not paged_optim else None)
    sim = simulate(plan.model, sim_config, plan.batch_size, plan.seq_len, use_cache=use_cache, target=plan.target,
                   allocator_workspaces=replay["workspace_bytes"] if replay else None)
    if substituted:
        sim = _analytic_optimizer_state(plan, sim)
    allocator = sim.get("allocator")
    if replay and allocator:
        # what max_memory_reserved will say (the step's allocations through the caching-allocator model) + the
        # device memory outside the allocator, both measured on the profile's GPU
        peak = int(allocator["reserved_peak_bytes"]) + int(replay["context_bytes"])
        overhead_bytes = peak - sim["peak_bytes"]
        overhead_source = (f"{profile.id}: allocator replay (advisor.memory.allocator: the simulated step's "
                           f"{allocator['events']} allocations through a model of PyTorch's CUDA caching allocator, "
                           f"with {len(replay['workspace_bytes'])} library workspaces of "
                           f"{sum(replay['workspace_bytes']) / 2**20:.0f} MiB) + context "
                           f"{replay['context_bytes'] / 2**20:.1f} MiB; {replay.get('source', '')}")
        band_low, band_high = float(replay["band"]["low"]), float(replay["band"]["high"])
        band_source = f"{profile.id}: {replay['band'].get('source', '')}"
    else:
        outside = _paged_at(plan, sim["breakdown_bytes"], "ddp", 1)
        overhead_bytes, overhead_source = exact_overhead(plan, sim["peak_bytes"] - outside, sim)
        peak = sim["peak_bytes"] + overhead_bytes
        band_low, band_high = profile.band(plan.profile_method)
        band_source = profile.band_source(plan.profile_method)
    from advisor.estimator.fast import legacy_bnb_notes

    notes = (list(plan.notes) + list(sim.get("notes", [])) + ([plan.model.note] if plan.model.note else [])
             + list(profile.notes)
             + legacy_bnb_notes(plan.config))
    breakdown = breakdown_from_counter(sim["breakdown_bytes"], overhead_bytes, sim["peak_phase"])
    at_peak = sim["breakdown_bytes"]  # bytes by category at the peak (per device below, when sharded)
    phase = sim["peak_phase"]
    multi = {}
    if devices > 1:
        memory = plan.hardware.memory_gib * 2**30 if plan.hardware.memory_gib is not None else None
        sharded = {name: (tensors + exact_overhead(plan, int(tensors))[0], cats, ph)
                   for name, (tensors, cats, ph) in _sharded_peaks(plan, sim, devices).items()}
        if strategy is None:  # the first that fits, as the fast estimator picks
            strategy = first_fitting_strategy(lambda s: sharded[s][0], memory, strategies_for(plan))
        device_peak, cats, phase = sharded[strategy]
        at_peak = cats
        overhead_bytes = int(device_peak - sum(cats.values()))
        peak = int(device_peak)
        breakdown = breakdown_from_counter(cats, overhead_bytes, phase)
        multi = {"strategy": strategy,
                 "per_strategy_gib": {name: round(v[0] / 2**30, 3) for name, v in sharded.items()}}
        notes.append(f"per-device peak under {strategy} on {devices} GPUs: the simulated replica's parameters, "
                     "gradients and optimizer state divided as the strategy shards them (full sharding gathers one "
                     "block and prefetches the next), with the profile's fitted overhead")
    paged = _paged_at(plan, at_peak, multi.get("strategy", "ddp"), devices)
    resident = peak - paged  # what must fit: a paged optimizer's state pages to CPU RAM when the GPU is full
    if paged > 0:
        from advisor.estimator.fast import device_peak, paged_note

        memory = plan.hardware.memory_gib * 2**30 if plan.hardware.memory_gib is not None else None
        notes.append(paged_note(plan.config.training.optim, paged,
                                0.0 if memory is None else max(0.0, min(paged, peak - memory))))
        peak = device_peak(peak, resident, memory)
    return {
        "peak_vram_gib": round(peak / 2**30, 3),
        "peak_bytes": peak,
        "peak_vram_low_gib": round(peak * (1 + band_low) / 2**30, 3),
        "peak_vram_high_gib": round(peak * (1 + band_high) / 2**30, 3),
        **fit_fields(resident, plan.hardware),
        **({"paged_optimizer_gib": round(paged / 2**30, 3)} if paged > 0 else {}),
        "breakdown_gib": breakdown,
        "peak_phase": phase,
        "strategy": multi.get("strategy", "single"),
        **({"per_strategy_gib": multi["per_strategy_gib"]} if multi else {}),
        "micro_batch": plan.batch_size,
        "seq_len": plan.seq_len,
        "trainable_params": sim["trainable_params"],
        "total_params": sim["total_params"],
        "method": plan.spec.id,
        "model": plan.model.id,
        "hardware": plan.hardware.to_public(),
        "config": plan.config.model_dump(mode="json"),
        "provenance": {
            "memory": "simulated: real architecture and method on fake tensors, 2 training steps, exact live-bytes counter",
            "overhead": overhead_source,
            "profile": profile.id,
            "band": band_source,
            "cached": bool(sim.get("cached")),
        },
        **({"allocator": {**allocator, "context_bytes": int(replay["context_bytes"])}} if replay and allocator else {}),
        "notes": notes,
        "simulation_seconds": round(sim.get("seconds", 0.0), 2),
    }


def _analytic_optimizer_state(plan: Plan, sim: dict) -> dict:
    """`sim` (run with fused AdamW) with each phase's optimizer state set to the configured optimizer's exact bytes,
    and the peak taken again over the phases."""
    from advisor.estimator.fast import state_created_in_step
    from advisor.estimator.static import static_terms

    static = static_terms(plan.model, plan.config)
    state = static.optimizer_bytes
    sim = {**sim, "phases": {k: {**v, "breakdown_bytes": dict(v.get("breakdown_bytes") or {})}
                             for k, v in (sim.get("phases") or {}).items()}}
    best = None
    for name, phase in sim["phases"].items():
        if name == "optimizer_first":
            # the state being made: fused AdamW's swapped for the real one's, counted as state up to its size, as in
            # the fast model (state_counted: _sharded_peaks must not do it again)
            before = sum(phase["breakdown_bytes"].values())
            phase["breakdown_bytes"] = {k: int(v) for k, v in
                                        state_created_in_step(phase["breakdown_bytes"], static).items()}
            phase["peak_bytes"] = int(phase["peak_bytes"] - before + sum(phase["breakdown_bytes"].values()))
            phase["state_counted"] = True
        held = phase["breakdown_bytes"].get("optimizer", 0)
        if held > 0 and name != "optimizer_first":
            phase["breakdown_bytes"]["optimizer"] = state
            phase["peak_bytes"] = int(phase["peak_bytes"] - held + state)
        if name.startswith("backward_"):
            continue  # windows of the backward phase, which is itself a phase
        if best is None or phase["peak_bytes"] > best[1]["peak_bytes"]:
            best = (name, phase)
    if best is not None:
        sim.update(peak_bytes=best[1]["peak_bytes"], breakdown_bytes=best[1]["breakdown_bytes"],
                   peak_phase=best[0].split("_")[0])
    from advisor.estimator.coefficients import SIMULATED_AS

    optim = plan.config.training.optim
    sim["notes"] = list(sim.get("notes", [])) + [
        f"{optim} cannot run on fake tensors (bitsandbytes reads its state's values): the step was simulated with "
        f"{SIMULATED_AS.get(optim, 'another optimizer')} and the optimizer state replaced by its exact size"]
    return sim


def _paged_at(plan: Plan, cats: dict, strategy: str, devices: int) -> int:
    """The paged optimizer state in unified memory at a moment (`cats`: bytes by category), per device."""
    from advisor.estimator.fast import paged_part, paged_state_bytes
    from advisor.estimator.static import static_terms

    if not plan.config.training.optim.startswith("paged_"):
        return 0
    static = static_terms(plan.model, plan.config)
    return int(paged_part(paged_state_bytes(static, plan.target, strategy, devices), cats))


def exact_overhead(plan: Plan, tensor_bytes: int, sim: dict | None = None) -> tuple[int, str]:
    """The profile's overhead on top of the simulated peak; for GaLore also its SVD workspace, which exists during
    the optimizer step only (it raises the peak when the optimizer phase plus the workspace exceeds it)."""
    from advisor.estimator.profile import profile_for
    from advisor.estimator.static import static_terms

    profile = profile_for(plan.hardware)
    overhead = profile.overhead_bytes(tensor_bytes)
    factor = profile.svd_workspace_factor()
    phases = (sim or {}).get("phases") or {}
    peaks = [phases[k]["peak_bytes"] for k in ("optimizer", "optimizer_first") if k in phases]
    optimizer_peak = max(peaks) if peaks else None
    if factor and optimizer_peak is not None and plan.config.training.optim.startswith("galore"):
        svd = factor * static_terms(plan.model, plan.config).svd_matrix_bytes
        overhead = max(overhead, optimizer_peak + profile.overhead_bytes(optimizer_peak) + svd - tensor_bytes)
    return int(overhead), profile.overhead_source()
