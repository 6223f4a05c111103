"""The fast estimator: peak memory with breakdown, fit, largest micro-batch, multi-GPU sharding, time and cost.

Memory = the closed form of `coefficients.py` (fitted from exact slice simulations of the real architecture and
method) evaluated at the model's depth and the micro-batch, with the optimizer state replaced by its exact
analytic size (`static.py`), the device overhead of the calibration profile added, and sharding applied per
category for multi-GPU strategies. Time = training FLOPs / achieved FLOP/s (profile). Everything after the
first call for an (architecture, method config, sequence length) is arithmetic on cached coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from advisor.estimator.coefficients import MemoryCoefficients, fit_coefficients
from advisor.estimator.plan import Plan, breakdown_from_counter, build_plan
from advisor.estimator.profile import Profile, profile_for
from advisor.estimator.static import StaticTerms, static_terms
from advisor.schemas import EstimateRequest

GIB = 2**30

# Multi-GPU strategies: which categories are divided by the device count.
#   ddp: nothing (replicas); zero2 / fsdp_grad_op: gradients and optimizer state; zero3 / fsdp_full: everything
#   that is a parameter, gradient or optimizer state. Frozen weights are sharded only by zero3/fsdp_full, which is
#   why LoRA on 8 GPUs under DDP or ZeRO-2 still holds the whole base model on every GPU. "cpu": the category lives
#   in host memory (DeepSpeed's offload_optimizer; offload_param / FSDP's offload_params for zero3_offload_params,
#   where the device holds only what is gathered for the block running: `_shard`).
STRATEGIES = {
    "ddp": {"weights": False, "trainable": False, "gradients": False, "optimizer": False, "offload": False},
    "zero2": {"weights": False, "trainable": False, "gradients": True, "optimizer": True, "offload": False},
    "zero2_offload": {"weights": False, "trainable": False, "gradients": True, "optimizer": "cpu",
                      "offload": "optimizer"},
    "zero3": {"weights": True, "trainable": True, "gradients": True, "optimizer": True, "offload": False},
    "zero3_offload": {"weights": True, "trainable": True, "gradients": True, "optimizer": "cpu",
                      "offload": "optimizer"},
    "zero3_offload_params": {"weights": "cpu", "trainable": "cpu", "gradients": "cpu", "optimizer": "cpu",
                             "offload": "params"},
}
# FSDP's names: its CPU offload (offload_params) moves the parameters, their gradients and the optimizer step to the
# host, which is zero3_offload_params
STRATEGY_ALIASES = {"fsdp_grad_op": "zero2", "fsdp_full_shard": "zero3", "fsdp_offload": "zero3_offload_params"}
STRATEGY_ORDER = ("ddp", "zero2", "zero3", "zero2_offload", "zero3_offload",
                  "zero3_offload_params")  # least communication first


def resolve_strategy(strategy: str | None, devices: int) -> str | None:
    """A requested strategy's canonical name (None: the estimator picks). "single", which an estimate on one GPU
    reports, is accepted back for one device; an unknown name is a clear error naming the allowed ones."""
    from advisor.errors import AdvisorInputError

    if strategy is None:
        return None
    if strategy == "single":
        if devices > 1:
            raise AdvisorInputError("strategy", f"'single' is the one-GPU strategy, but hardware.count is {devices}",
                                    allowed=[*STRATEGIES, *STRATEGY_ALIASES])
        return "ddp"  # one device: nothing is replicated or sharded
    name = STRATEGY_ALIASES.get(strategy, strategy)
    if name not in STRATEGIES:
        raise AdvisorInputError("strategy", f"unknown strategy {strategy!r}",
                                allowed=["single", *STRATEGIES, *STRATEGY_ALIASES])
    return name


@dataclass
class MemoryModel:
    plan: Plan
    static: StaticTerms
    coefficients: MemoryCoefficients
    profile: Profile

    def peak(self, batch: int, strategy: str = "ddp", devices: int = 1) -> tuple[int, dict[str, float], str]:
        """(peak bytes per device, categories at the peak, phase) for a micro-batch and strategy."""
        shard = STRATEGIES[strategy]
        layers = self.static.layers
        best: tuple[float, dict[str, float], str, float] | None = None
        phase_values = {}
        windows = any(p.startswith("backward_") for p in self.coefficients.phases)
        for phase, coeffs in self.coefficients.phases.items():
            if phase.split("|")[0] == "backward" and windows:
                # the whole-backward peak of a 1-2 block slice is a maximum over moments whose composition
                # differs (activations at the start, gradients at the end): extrapolating it mixes them. The
                # windows (loss/head, top block, bottom block, embeddings) are each linear in depth and batch,
                # and a deep model's backward peaks in one of them (advisor.memory.counter)
                continue
            cats = coeffs.bytes_by_category(layers, batch)
            if phase.split("|")[0] == "optimizer_first":
                cats = state_created_in_step(cats, self.static)
            elif cats.get("optimizer", 0) > 0:
                cats["optimizer"] = float(self.static.optimizer_bytes)
            phase_values[phase] = cats
        # GaLore's SVD runs inside the optimizer step: its solver workspace (invisible to tensor accounting, fitted
        # per device by the calibration) competes for the peak in that phase only
        svd = self.profile.svd_workspace_factor() * self.static.svd_matrix_bytes
        paged = paged_state_bytes(self.static, self.plan.target, strategy, devices)
        for phase, cats in phase_values.items():
            cats = _shard(cats, shard, devices, self.static, phase)
            total = sum(cats.values())
            # paged optimizer state is not in PyTorch's allocator: no allocator overhead on it
            outside = paged_part(paged, cats)
            device = total + self.profile.overhead_bytes(total - outside) + (
                svd if phase.startswith("optimizer") else 0.0)
            if best is None or device > best[3]:
                best = (total, cats, phase.split("|")[0].split("_")[0], device, outside)
        total, cats, phase, _, outside = best
        overhead = self.profile.overhead_bytes(total - outside) + (svd if phase == "optimizer" else 0.0)
        cats["overhead"] = overhead
        return int(total + overhead), cats, phase

    def fit_bytes(self, batch: int, strategy: str = "ddp", devices: int = 1) -> tuple[int, int]:
        """(peak, the part of it that must be resident): a paged optimizer's state moves to CPU RAM when the GPU
        is full instead of failing the step, so fitting is judged on the rest."""
        peak, cats, _ = self.peak(batch, strategy, devices)
        return peak, int(peak - paged_part(paged_state_bytes(self.static, self.plan.target, strategy, devices), cats))

    def max_micro_batch(self, memory_bytes: float, strategy: str = "ddp", devices: int = 1, limit: int = 4096) -> int:
        """Largest micro-batch whose peak fits in `memory_bytes` (0 if even 1 does not fit)."""
        if self.fit_bytes(1, strategy, devices)[1] > memory_bytes:
            return 0
        lo, hi = 1, 2
        while hi <= limit and self.fit_bytes(hi, strategy, devices)[1] <= memory_bytes:
            lo, hi = hi, hi * 2
        hi = min(hi, limit + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.fit_bytes(mid, strategy, devices)[1] <= memory_bytes:
                lo = mid
            else:
                hi = mid
        return lo


def paged_state_bytes(static: StaticTerms, target: str, strategy: str = "ddp", devices: int = 1) -> float:
    """Per device, the optimizer state a paged bitsandbytes optimizer keeps in CUDA unified memory (0 off CUDA, where
    bitsandbytes falls back to ordinary tensors; 0 where a strategy offloads the state; divided where it shards it)."""
    if target != "cuda" or not static.paged_optimizer_bytes:
        return 0.0
    rule = STRATEGIES[strategy]["optimizer"] if devices > 1 else False
    if rule == "cpu":
        return 0.0
    return static.paged_optimizer_bytes / (devices if rule else 1)


def paged_part(paged: float, cats: dict[str, float]) -> float:
    """How much of a moment's optimizer bytes (`cats`, bytes by category) is paged state: none before it exists."""
    return min(paged, max(cats.get("optimizer", 0.0), 0.0))


def state_created_in_step(cats: dict[str, float], static: StaticTerms) -> dict[str, float]:
    """The first step creates the optimizer state inside the step, where the counter can only call it temporaries:
    count up to the state's size as state, so sharding divides it as it does the state."""
    if static.optimizer_bytes <= 0:
        return cats
    out = dict(cats)
    simulated = static.simulated_optimizer_bytes
    if simulated >= 0 and simulated != static.optimizer_bytes:
        # the slice ran fused AdamW in place of a bitsandbytes optimizer: the state it made is swapped for the real
        # one's (8-bit: a quarter of fp32 AdamW's; Llama-2-7B full fine-tuning's first step was 12.6 GiB too high)
        out["temporaries"] = max(0.0, out.get("temporaries", 0.0) - simulated) + static.optimizer_bytes
    moved = min(max(out.get("temporaries", 0.0), 0.0), float(static.optimizer_bytes))
    out["temporaries"] = out.get("temporaries", 0.0) - moved
    out["optimizer"] = out.get("optimizer", 0.0) + moved
    return out


def _shard(cats: dict[str, float], shard: dict, devices: int, static: StaticTerms,
           phase: str = "") -> dict[str, float]:
    """One device's bytes by category at a moment (`phase`) of one replica's step (`cats`) under a strategy."""
    if devices <= 1:
        return dict(cats)
    out = dict(cats)
    if shard["optimizer"] == "cpu" and phase.startswith("optimizer"):
        # the step runs on the host (DeepSpeed's CPU Adam / FSDP's offloaded step): its working copies are not here
        out["temporaries"] = 0.0
    if shard["offload"] == "params":
        return _offload_params(out, static)
    for key in ("weights", "trainable", "gradients", "optimizer"):
        rule = shard[key]
        if rule == "cpu":
            out[key] = 0.0
        elif rule:
            out[key] = cats.get(key, 0.0) / devices
    if shard["weights"]:
        # ZeRO-3/FSDP gather one block's parameters (and prefetch the next) at a time; the root unit (embeddings,
        # final norm, output head) stays gathered from the first forward to the end of backward (FSDP keeps the
        # root's parameters unsharded after forward: they are needed first in backward)
        block, root = _block_and_root(static)
        out["temporaries"] = out.get("temporaries", 0.0) + 2 * block + root * (1 - 1 / devices)
    return out


def _block_and_root(static: StaticTerms) -> tuple[float, float]:
    """(bytes of one block's parameters, bytes of the parameters outside the blocks)."""
    params = float(static.weights_bytes + static.trainable_bytes)
    block = float(static.block_param_bytes)
    if block <= 0:  # no per-block split known: the average block, no root
        return params / max(static.layers, 1), 0.0
    return block, max(params - block * static.layers, 0.0)


def _offload_params(cats: dict[str, float], static: StaticTerms) -> dict[str, float]:
    """ZeRO-3 with offload_param + offload_optimizer, FSDP FULL_SHARD with offload_params: parameters, gradients and
    the optimizer step live on the host; the device holds what is gathered to run: the model's root (embeddings,
    final norm, output head: FSDP keeps the root unit gathered from the first forward to the end of backward), the
    block running and the next one (prefetch), and the gradients of the unit being reduced before they go to the
    host. Activations, logits and temporaries are the replica's own, unchanged."""
    out = dict(cats)
    params = float(static.weights_bytes + static.trainable_bytes)
    block, root = _block_and_root(static)
    block_t = (float(static.block_trainable_bytes) if static.block_param_bytes > 0
               else static.trainable_bytes / max(static.layers, 1))
    root_t = max(static.trainable_bytes - block_t * static.layers, 0.0)
    gathered = min(params, root + 2 * block)
    gathered_t = min(float(static.trainable_bytes), root_t + 2 * block_t)
    out["trainable"] = gathered_t if cats.get("trainable", 0.0) > 0 else 0.0
    out["weights"] = gathered - out["trainable"]
    # the host holds every gradient: the device has one unit's (the root's is the largest: embeddings, head)
    out["gradients"] = min(cats.get("gradients", 0.0), max(root_t, block_t))
    out["optimizer"] = 0.0
    return out


def memory_model(plan: Plan, profile: Profile | None = None, target: str | None = None) -> MemoryModel:
    """`target` ("cuda" / "cpu") overrides the plan's device kind for the activation fit (a calibration predicts
    its own device's probes with no hardware named)."""
    profile = profile or profile_for(plan.hardware)
    coefficients = fit_coefficients(plan.model, plan.config, plan.seq_len, target or plan.target)
    return MemoryModel(plan, static_terms(plan.model, plan.config), coefficients, profile)


# --------------------------------------------------------------------------- time and cost
def training_flops_per_token(mm: MemoryModel) -> float:
    """Training FLOPs per token of the batch (tokens per step = micro-batch × sequence length):

    ≈ 2N forward + 2N input-gradient backward + 2N_trained weight-gradient backward (+ 2N recompute with
    checkpointing) + attention's QKᵀ and AV (4·L·kv·q_dim per token forward, ×2 backward, + forward again with
    checkpointing), where N counts matmul parameters only: embedding tables are lookups (no FLOPs forward, a
    scatter-add backward) and are left out, the output head is a matmul and stays in (Kaplan et al. 2020); so are
    the frozen originals PEFT keeps beside `modules_to_save` copies, which never run (`idle_matmul_params`).
    Method terms: freeze tuning of the last blocks without checkpointing runs the frozen blocks below them forward
    only, and LLaMA-Pro the original blocks before its first new one; prompt tuning runs every layer over its virtual tokens too (× (s + p) / s); prefix tuning's
    keys include the p prefix tokens (kv = s + p); LongLoRA's S²-Attn attends within groups of ratio·s tokens
    during training (kv = ratio·s, when the sequence splits into ≥ 2 whole groups). GaLore's per-step projections
    do not scale with tokens: `step_flops` adds them per optimizer step. Encoder-decoder models count per source
    token: the decoder's matmul parameters see t = max_target_length tokens for every s source tokens (N_eff =
    N_enc + N_dec·t/s, trained parameters in the same proportion), and attention is the encoder's self-attention
    over s, the decoder's over t and its cross-attention over s (4·L·q·(s + t²/s + t) per source token)."""
    st, plan = mm.static, mm.plan
    n = max(st.total_params - st.lookup_params - st.idle_matmul_params, 0)
    trained = max(st.trainable_params - st.trainable_lookup_params, 0)
    s = plan.seq_len
    seq2seq = plan.model.kind == "seq2seq"
    t = (plan.training.max_target_length or s) if seq2seq else s
    if seq2seq and s > 0 and n > 0:
        n_eff = (n - st.decoder_matmul_params) + st.decoder_matmul_params * t / s
        trained, n = trained * n_eff / n, n_eff
    gc = plan.training.gradient_checkpointing
    peft = plan.config.peft or {}
    method = _flop_method(plan)
    below = forward_only_blocks(mm)
    per_block = max(n - st.vocab * st.hidden, 0) / max(st.layers, 1)
    n_back = n - below * per_block
    forward = 2 * n
    flops = forward + 2 * n_back + 2 * trained
    if gc:
        flops += 2 * n_back
    kv = s
    if method == "prefix_tuning":
        kv = s + int(peft.get("num_virtual_tokens") or 0)
    elif method == "longlora":
        ratio = float(peft.get("group_size_ratio") or 0.25)
        group = int(s * ratio)
        if group >= 2 and s % group == 0 and s >= 2 * group:
            kv = group
    attention = 4 * st.layers * kv * st.q_dim
    if seq2seq and s > 0:
        attention = 4 * st.layers * st.q_dim * (s + t * t / s + t)
    back = (st.layers - below) / max(st.layers, 1)
    flops += attention * (1 + 2 * back + (back if gc else 0))
    if method == "prompt_tuning" and s > 0:
        flops *= (s + int(peft.get("num_virtual_tokens") or 0)) / s
    return float(flops)


def forward_only_blocks(mm: MemoryModel) -> int:
    """Blocks a step runs forward only: freeze tuning with the last blocks trained and no checkpointing sends no
    gradient into the frozen blocks below them (with checkpointing transformers makes the embeddings' output require
    grad, and backward runs through every block); LLaMA-Pro likewise the original blocks before its first new one."""
    st, plan = mm.static, mm.plan
    if plan.training.gradient_checkpointing:
        return 0
    peft, method = plan.config.peft or {}, _flop_method(plan)
    if method == "freeze" and int(peft.get("trainable_layers") or 0) > 0:
        return st.layers - abs(int(peft.get("trainable_layers") or 0))
    if method == "llama_pro":
        return st.layers // max(int(peft.get("num_new_blocks") or 1), 1) - 1
    return 0


def _flop_method(plan: Plan) -> str:
    """The method whose FLOP terms apply: PEFT's prompt-learning types lengthen the sequence as prompt tuning does,
    its prefix tuning as ours does; every other PEFT type counts as a frozen base with trained parameters."""
    if plan.spec.id != "peft":
        return plan.spec.id
    name = peft_type_name(plan)
    from advisor.methods.peft_any import PROMPT_TYPES

    return "prompt_tuning" if name in PROMPT_TYPES else "prefix_tuning" if name == "PREFIX_TUNING" else "peft"


def peft_type_name(plan: Plan) -> str:
    from advisor.methods.peft_any import peft_type_of

    return peft_type_of(plan.config.peft or {}) if plan.spec.id == "peft" else plan.spec.id


def step_flops(mm: MemoryModel, batch: int) -> float:
    """Training FLOPs of one optimizer step of `batch` sequences: per-token FLOPs × tokens + the optimizer's
    per-step FLOPs (GaLore's projections, `StaticTerms.optimizer_flops_per_step`)."""
    return training_flops_per_token(mm) * batch * mm.plan.seq_len + float(mm.static.optimizer_flops_per_step)


# DoRA's step against LoRA's at the same rank and targets, measured: PEFT's MetaMathQA benchmark, Llama-3.2-3B r32 on
# q_proj/v_proj, batch 4, L40S: 35.8 s vs 31.0 s per 250 steps (5,860 vs 6,780 tokens/s, the means of the logged
# intervals; results/lora--llama-3.2-3B-rank32{,-dora}.json). Its extra work (the weight norm from the whole base
# weight, the base and LoRA outputs scaled apart) grows with the layers adapted: with more targets it is slower still
DORA_SPEED_FACTOR = 0.865
DORA_SPEED_SOURCE = ("PEFT MetaMathQA, Llama-3.2-3B r32 q/v on an L40S: DoRA 35.8 s vs LoRA 31.0 s per 250 steps; "
                     "more adapted layers cost more")

# Host↔GPU transfer rate for paged optimizer state that does not fit: PCIe 4.0 ×16 is 32 GB/s per direction in
# theory, ≈ 25 GB/s in practice for pinned or unified-memory page migration (NVIDIA's bandwidthTest on A100 hosts)
PAGING_BYTES_PER_S = 25e9


def offloaded_activation_bytes(mm: MemoryModel, batch: int) -> float:
    """Bytes activation offloading sends to the host in one micro-batch's forward (and back in its backward): the
    activations resident when backward starts (its `backward_head` window) without offloading minus those it leaves
    on the device, each from its own fit."""
    plan = mm.plan
    if not plan.training.activation_offloading or plan.target != "cuda":
        return 0.0
    plain = plan.config.model_copy(deep=True)
    plain.training.activation_offloading = False

    def resident(coefficients) -> float:
        phase = coefficients.phases.get("backward_head") or coefficients.phases["backward"]
        return phase.bytes_by_category(mm.static.layers, batch).get("activations", 0.0)

    whole = resident(fit_coefficients(plan.model, plain, plan.seq_len, plan.target))
    return max(float(whole - resident(mm.coefficients)), 0.0)


def block_count(mm: MemoryModel) -> int:
    """The transformer blocks a step runs: the static terms' layer count (a plan's LLaMA-Pro model is already the
    expanded one), and an encoder-decoder's decoder stack too (the static terms count a layer per stack)."""
    c, layers = mm.plan.model.config, mm.static.layers
    if getattr(c, "is_encoder_decoder", False):
        dec = getattr(c, "num_decoder_layers", None)
        layers += int(dec) if isinstance(dec, int) and dec > 0 else layers
    return layers


def time_and_cost(mm: MemoryModel, batch: int, strategy: str, devices: int, paged_spill_bytes: float = 0.0) -> dict:
    plan = mm.plan
    per_token = training_flops_per_token(mm)
    rate, rate_source = mm.profile.achieved_flops(plan.profile_method, plan.hardware)
    if rate is None:
        return {"tokens_per_s": None, "train_hours": None, "cost_usd": None, "time_source": rate_source}
    rate *= mm.profile.method_speed_factor(plan.profile_method)
    if plan.profile_method != plan.spec.id:
        rate_source += (f"; {peft_type_name(plan)} has no probe of its own: timed at {plan.profile_method}'s rate, "
                        "the calibrated method nearest in how it runs")
    slowdown = 1.0  # of the whole step, launches included
    if (plan.config.peft or {}).get("use_dora"):
        slowdown = DORA_SPEED_FACTOR
        rate *= DORA_SPEED_FACTOR
        rate_source += f"; × {DORA_SPEED_FACTOR} for DoRA ({DORA_SPEED_SOURCE})"
    # parameter offload runs the same host-side optimizer step as zero3_offload; its parameter traffic is added below
    scaling = (mm.profile.multi_gpu_efficiency("zero3_offload" if strategy == "zero3_offload_params" else strategy)
               if devices > 1 else 1.0)
    tokens_per_step = max(batch * plan.seq_len, 1)
    # the optimizer's per-step FLOPs (GaLore) spread over the step's tokens (one step per micro-batch: gradient
    # accumulation would spread them further, so this errs slow)
    per_token_all = per_token + float(mm.static.optimizer_flops_per_step) / tokens_per_step
    tokens_per_s = rate / per_token_all * devices * scaling
    # a step cannot be shorter than the launches of its kernels (eager PyTorch, block after block): a short sequence
    # at micro-batch 1 waits for Python, not the GPU (calibrated per block on the probes; held-out probes: 14% median
    # error floored against 13× too fast from FLOPs alone, `throughput.launch_floor_heldout`)
    blocks = block_count(mm)
    floor_s, floor_source = mm.profile.launch_floor(plan.profile_method, plan.training.gradient_checkpointing, blocks)
    if floor_s is not None:  # a block run forward only launches about a third of a trained block's kernels
        below = min(forward_only_blocks(mm), blocks)
        floor_s = floor_s * (blocks + 1 - below * 2 / 3) / (blocks + 1) / slowdown
    compute_s = tokens_per_step * per_token_all / rate
    if floor_s is not None and floor_s > compute_s:
        tokens_per_s = tokens_per_step / floor_s * devices * scaling
        rate_source += (f"; launch-bound: {floor_s * 1000:.1f} ms per micro-batch step ({floor_source}) exceeds "
                        f"the {compute_s * 1000:.1f} ms its FLOPs take")
    offload_s = 0.0
    if devices > 1 and STRATEGIES[strategy]["offload"] == "params":
        # every micro-batch copies each device's parameter shard host → device for the forward and again for the
        # backward, and its gradient shard back, over PCIe (not overlapped with compute: errs slow)
        st = mm.static
        offload_s = (2 * (st.weights_bytes + st.trainable_bytes) + st.trainable_bytes) / devices / PAGING_BYTES_PER_S
        seconds = tokens_per_step * devices / tokens_per_s + offload_s
        tokens_per_s = tokens_per_step * devices / seconds
        rate_source += f"; + {offload_s:.2f} s per micro-batch of parameter offload traffic at 25 GB/s"
    moved = offloaded_activation_bytes(mm, batch)
    if moved > 0:
        # the copies run on the compute stream (advisor.offload, transformers' offload): each activation goes out in
        # forward and back in backward over PCIe, not overlapped (torchtune's side streams hide part of it)
        seconds = 2 * moved / PAGING_BYTES_PER_S
        offload_s += seconds
        tokens_per_s = tokens_per_step * devices / (tokens_per_step * devices / tokens_per_s + seconds)
        rate_source += (f"; + {seconds:.3f} s per micro-batch copying {moved / GIB:.2f} GiB of activations to the host "
                        "and back at 25 GB/s")
    paging = 0.0
    if paged_spill_bytes > 0:
        # the state that does not fit goes in and out once per optimizer step (every gradient_accumulation_steps
        # micro-batches)
        paging = 2 * paged_spill_bytes / PAGING_BYTES_PER_S
        micro_per_step = max(plan.training.gradient_accumulation_steps, 1)
        seconds = tokens_per_step * devices / tokens_per_s + paging / micro_per_step
        tokens_per_s = tokens_per_step * devices / seconds
        rate_source += f"; + paging {paged_spill_bytes / GIB:.2f} GiB of optimizer state per step at 25 GB/s"
    out = {"tokens_per_s": round(tokens_per_s, 1), "train_hours": None, "cost_usd": None, "time_source": rate_source,
           "flops_per_token": per_token_all, "paging_seconds_per_step": paging,
           "offload_seconds_per_micro_batch": offload_s}
    ds = plan.request.dataset
    if ds is not None and ds.num_examples:
        avg = ds.avg_tokens or (ds.max_tokens or plan.seq_len)
        tokens = ds.num_examples * min(avg, plan.seq_len) * plan.training.num_train_epochs
        hours = tokens / tokens_per_s / 3600
        out["train_hours"] = float(f"{hours:.4g}")
        price = plan.hardware.gpu.usd_per_hour if plan.hardware.gpu is not None else None
        if price is not None:
            out["cost_usd"] = float(f"{hours * price * devices:.4g}")
    return out


# --------------------------------------------------------------------------- the answer
# bitsandbytes' 8-bit weights (Int8Params, with their row scales on the layer's state) cannot be sharded or offloaded
# by FSDP or ZeRO-3: an 8-bit base replicates its weights on every GPU
REPLICATED_WEIGHTS = ("ddp", "zero2", "zero2_offload")


def strategies_for(plan: Plan) -> tuple[str, ...]:
    """The multi-GPU strategies this plan can run under, least communication first."""
    q = plan.config.quantization
    if q is not None and (q.load_in_8bit or q.quant_method == "gptq"):
        return tuple(s for s in STRATEGY_ORDER if s in REPLICATED_WEIGHTS)
    return STRATEGY_ORDER


def check_strategy(plan: Plan, strategy: str | None) -> None:
    from advisor.errors import AdvisorInputError

    allowed = strategies_for(plan)
    if strategy is not None and plan.hardware.count > 1 and strategy not in allowed:
        what = ("a GPTQ checkpoint's packed integer weights (config.quantization.quant_method 'gptq')"
                if plan.config.quantization.quant_method == "gptq"
                else "bitsandbytes' 8-bit weights (config.quantization.load_in_8bit)")
        raise AdvisorInputError("strategy", f"{strategy} shards or offloads the weights, which {what} do not support",
                                allowed=list(allowed))


def first_fitting_strategy(peak_of: Callable[[str], float], memory_bytes: float | None,
                           order: tuple[str, ...] = STRATEGY_ORDER) -> str:
    """The first strategy of `order` (least communication first) whose per-device peak fits."""
    for strategy in order:
        if memory_bytes is None or peak_of(strategy) <= memory_bytes:
            return strategy
    return order[-1]


def choose_strategy(mm: MemoryModel, memory_bytes: float | None, batch: int, devices: int) -> str:
    if devices <= 1:
        return "ddp"
    return first_fitting_strategy(lambda s: mm.fit_bytes(batch, s, devices)[1], memory_bytes, strategies_for(mm.plan))


def fast_estimate(req: EstimateRequest, strategy: str | None = None) -> dict:
    return estimate_plan(build_plan(req), strategy=strategy)


def estimate_plan(plan: Plan, strategy: str | None = None, mm: MemoryModel | None = None) -> dict:
    mm = mm or memory_model(plan)
    hw = plan.hardware
    devices = hw.count
    memory_bytes = hw.memory_gib * GIB if hw.memory_gib is not None else None
    batch = plan.batch_size
    strategy = resolve_strategy(strategy, devices)
    check_strategy(plan, strategy)
    strategy = strategy or choose_strategy(mm, memory_bytes, batch, devices)
    whole, cats, phase = mm.peak(batch, strategy, devices)
    paged = int(paged_part(paged_state_bytes(mm.static, plan.target, strategy, devices), cats))
    resident = whole - paged
    # paged state beyond the device's memory stays in CPU RAM: the device holds at most its memory
    peak = device_peak(whole, resident, memory_bytes)
    band_low, band_high = mm.profile.band(plan.profile_method)
    result = {
        "peak_vram_gib": round(peak / GIB, 3),
        "peak_bytes": peak,
        # what torch.cuda.max_memory_reserved() reports: the peak without the CUDA context (the allocator's reserve)
        # and without a paged optimizer's state (unified memory, outside the allocator)
        "peak_reserved_gib": round((resident - mm.profile.context_bytes()) / GIB, 3),
        "peak_reserved_bytes": int(resident - mm.profile.context_bytes()),
        "peak_vram_low_gib": round(peak * (1 + band_low) / GIB, 3),
        "peak_vram_high_gib": round(peak * (1 + band_high) / GIB, 3),
        "fits": None if memory_bytes is None else resident <= memory_bytes,
        "headroom_gib": None if memory_bytes is None else round((memory_bytes - resident) / GIB, 3),
        "breakdown_gib": breakdown_from_counter(cats, cats.get("overhead", 0.0), phase),
        "peak_phase": phase,
        "micro_batch": batch,
        "seq_len": plan.seq_len,
        "max_micro_batch": None if memory_bytes is None else mm.max_micro_batch(memory_bytes, strategy, devices),
        "trainable_params": mm.static.trainable_params,
        "total_params": mm.static.total_params,
        "method": plan.spec.id,
        "model": plan.model.id,
        "hardware": hw.to_public(),
        "strategy": strategy if devices > 1 else "single",
        "config": plan.config.model_dump(mode="json"),
    }
    if paged > 0:
        result["paged_optimizer_gib"] = round(paged / GIB, 3)
    if devices > 1:
        result["per_strategy_gib"] = {s: round(mm.peak(batch, s, devices)[0] / GIB, 3) for s in strategies_for(plan)}
    spill = 0.0 if memory_bytes is None else max(0.0, min(float(paged), whole - memory_bytes))
    timing = time_and_cost(mm, batch, strategy, devices, paged_spill_bytes=spill)
    result.update({k: timing[k] for k in ("tokens_per_s", "train_hours", "cost_usd")})
    result["provenance"] = {
        "memory": f"fitted:{mm.coefficients.key} (exact slice simulations of this architecture and method) "
                  f"+ exact parameter/optimizer bytes",
        "overhead": mm.profile.overhead_source(),
        "band": mm.profile.band_source(plan.profile_method),
        "time": timing["time_source"],
        "profile": mm.profile.id,
    }
    notes = list(plan.notes) + list(mm.profile.notes)
    if plan.spec.id == "peft":
        from advisor.methods.peft_any import notes as peft_notes

        notes += peft_notes(plan.config.peft, plan.model.config)
    if plan.model.note:
        notes.append(plan.model.note)
    if memory_bytes is None:
        notes.append("no GPU given: memory is reported, fit is not judged")
    if plan.training.torch_compile:
        notes.append("torch_compile: memory is that of AOTAutograd's partitioning of each block (what inductor "
                     "partitions, simulated without code generation; inductor's fused kernels can only hold fewer "
                     "temporaries); time is the uncompiled rate of the profile (compile's speed-up and its first-step "
                     "compile time are not measured)")
    q = plan.config.quantization
    if q is not None and q.load_in_8bit:
        notes.append("8-bit base (LLM.int8()): memory follows bitsandbytes' MatMul8bitLt, what CUDA trains with (no "
                     "outlier columns: a real model's few keep tokens × columns in 16-bit); time uses the 4-bit QLoRA "
                     "rate of the profile (8-bit matmuls were not measured)")
        if devices > 1:
            notes.append("8-bit weights cannot be sharded (FSDP / ZeRO-3): every GPU holds the whole base")
    if q is not None and q.quant_method == "gptq":
        notes.append(f"GPTQ base ({q.bits}-bit, group size {q.group_size}): memory follows gptqmodel's training path "
                     "(each adapted layer's weight dequantized and kept by the matmul for backward: with gradient "
                     "checkpointing one block's at a time); time uses the profile's 4-bit QLoRA rate (GPTQ's "
                     "dequantization was not measured); training it needs gptqmodel")
        if devices > 1:
            notes.append("GPTQ's packed integer weights are buffers, which FSDP / ZeRO-3 do not shard: every GPU holds "
                         "the whole base")
    notes += legacy_bnb_notes(plan.config)
    kept = mm.static.unquantized_weight_bytes
    if q is not None and kept > 0:
        bits = 8 if q.load_in_8bit else 4
        notes.append(f"{kept / GIB:.1f} GiB of the base's weights stay 16-bit: bitsandbytes, as transformers "
                     f"{_transformers_version()} loads it, replaces only modules whose type is exactly nn.Linear, and "
                     f"this model's {mm.static.unquantized_modules} are not (a Linear subclass, or MoE experts stored "
                     "as 3-D parameters). transformers 4 quantized them (isinstance; per-expert linear layers): there "
                     f"they would take about {kept * bits / 16 / GIB:.1f} GiB")
    if paged > 0:
        notes.append(paged_note(plan.training.optim, paged, spill, timing.get("paging_seconds_per_step", 0.0)))
    result["notes"] = notes
    return result


def device_peak(whole: int, resident: int, memory_bytes: float | None) -> int:
    """The device's peak when a paged optimizer's state (whole − resident) may not all fit: resident while the
    state fits beside it, else the device's whole memory (the rest of the state pages to CPU RAM)."""
    if whole == resident or memory_bytes is None:
        return int(whole)
    return int(min(whole, max(resident, memory_bytes)))


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def paged_note(optim: str, paged: float, spill: float = 0.0, paging_seconds: float = 0.0) -> str:
    return (f"{optim}: {paged / GIB:.2f} GiB of optimizer state live in CUDA unified memory (bitsandbytes' paged "
            "buffers, outside PyTorch's allocator): counted in peak_vram_gib as far as the GPU has room, not in "
            "peak_reserved_gib; when the GPU is full they page to CPU RAM instead of failing, so fits and headroom "
            "(and max_micro_batch) leave them out"
            + (f". Here {spill / GIB:.2f} GiB of them do not fit: every optimizer step pages them over PCIe "
               f"(≈ +{paging_seconds:.2f} s per step, in tokens/s)" if spill > 0 else ""))


def compare_gpus(req: EstimateRequest, counts=(1, 2, 4, 8)) -> list[dict]:
    """Every catalog GPU × count, ranked by cost for the job (those that do not fit last)."""
    from advisor.catalog.gpus import load_gpus
    from advisor.hardware import HardwareTarget

    plan = build_plan(req)
    mm = memory_model(plan)
    rows = []
    for gpu in load_gpus():
        for count in counts:
            plan.hardware = HardwareTarget(gpu.name, count, float(gpu.usable_memory_gib), gpu)
            mm.plan = plan
            est = estimate_plan(plan, mm=mm)
            rows.append({"gpu": gpu.id, "count": count, "fits": est["fits"], "peak_vram_gib": est["peak_vram_gib"],
                         "strategy": est["strategy"], "max_micro_batch": est["max_micro_batch"],
                         "tokens_per_s": est["tokens_per_s"], "train_hours": est["train_hours"],
                         "cost_usd": est["cost_usd"], "usd_per_hour": gpu.usd_per_hour})
    rows.sort(key=lambda r: (not r["fits"], math.inf if r["cost_usd"] is None else r["cost_usd"],
                             math.inf if r["train_hours"] is None else r["train_hours"]))
    return rows


def legacy_bnb_notes(cfg) -> list[str]:
    """What a bitsandbytes before 0.43.2 (named in config.quantization.bitsandbytes_version, else installed) adds."""
    from advisor.config import bnb_holds_4bit_input, bnb_version_of

    if not bnb_holds_4bit_input(cfg.quantization):
        return []
    t = cfg.training
    where = ("with non-reentrant checkpointing, kept for every block: checkpointing does not see them"
             if t.gradient_checkpointing and not t.gradient_checkpointing_reentrant else
             "with reentrant checkpointing, only inside the block being recomputed" if t.gradient_checkpointing else
             "one more saved activation per 4-bit layer")
    return [f"bitsandbytes {bnb_version_of(cfg.quantization)}: before 0.43.2 its 4-bit matmul keeps each layer's input "
            f"until backward (bitsandbytes PR #1270), {where}; bitsandbytes 0.43.2 or later does not hold them"]
