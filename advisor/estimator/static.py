"""Exact static memory of a (model, method) pair: weights, trainable parameters, gradients, optimizer state.

The real method is applied to the real architecture cut to 1 and 2 layers (plus the blocks a method pins, such as
freeze tuning's trained ones: `pinned_blocks`) on the meta device (no memory, no
simulation); parameters are counted by dtype and role, and the per-layer difference extrapolates to the full
depth, which is exact for models whose blocks are identical (all catalog architectures). The result also
carries the architecture's widths that the activation model uses as features. Cached in memory and on disk.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import threading
from dataclasses import asdict, dataclass

import torch

from advisor.config import MethodConfig, method_key_dump
from advisor.files import write_text_atomic

_LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers")
_LOCK = threading.Lock()


@dataclass
class StaticTerms:
    """Bytes and counts for the whole model (already extrapolated to its depth)."""

    weights_bytes: int  # frozen parameters and buffers
    trainable_bytes: int
    trainable_params: int
    total_params: int
    gradient_bytes: int
    optimizer_bytes: int  # state after the first step
    optimizer_temp_bytes: int  # transient bytes inside optimizer.step (foreach copies)
    layers: int
    hidden: int
    intermediate: int
    q_dim: int
    kv_dim: int
    heads: int
    vocab: int
    family: str
    lookup_params: int = 0  # embedding tables (no matmul): left out of training FLOPs
    trainable_lookup_params: int = 0
    optimizer_flops_per_step: float = 0.0  # per optimizer step, whatever the tokens (GaLore's projections)
    decoder_matmul_params: int = 0  # encoder-decoder: the decoder's and the output head's matmul parameters
    # GaLore: fp32 bytes of the largest gradient matrix its projector decomposes (torch.linalg.svd); on CUDA the
    # solver's workspace and column-major copies, invisible to tensor accounting, scale with it (Profile.svd_workspace)
    svd_matrix_bytes: int = 0
    # bitsandbytes' paged optimizers (paged_adamw_8bit / _32bit) keep the moments of every parameter of ≥ 1e5
    # elements in CUDA unified memory (cudaMallocManaged, outside PyTorch's allocator): resident while the GPU has
    # room, paged to CPU RAM when it has not. Part of optimizer_bytes
    paged_optimizer_bytes: int = 0
    # the state of the optimizer the simulation ran (fused AdamW for bitsandbytes' optimizers, which cannot run on
    # fake tensors; otherwise optimizer_bytes): its creation in the first step is replaced by the real state's
    simulated_optimizer_bytes: int = -1
    # one transformer block's parameters (frozen + trainable) and its trainable part: what ZeRO-3 / FSDP gather onto
    # the device while the block runs; the rest of weights + trainable (embeddings, final norm, output head) is the
    # model's root, which FSDP keeps gathered from the first forward to the end of backward
    block_param_bytes: int = 0
    block_trainable_bytes: int = 0
    # PEFT's modules_to_save keep each module's frozen original beside the trained copy, and only the copy runs:
    # the originals' matmul parameters are in total_params but not in any FLOP
    idle_matmul_params: int = 0
    # a bitsandbytes base replaces the modules whose type is exactly nn.Linear (and GPT-2's Conv1D): weight matrices
    # elsewhere stay 16-bit (Falcon's FalconLinear subclass; MoE experts that transformers 5 stores as 3-D
    # parameters, Mixtral's gate_up_proj / down_proj). Embeddings and the output head are left out (never quantized)
    unquantized_weight_bytes: int = 0
    unquantized_modules: str = ""  # their module classes, for the note

    def to_dict(self) -> dict:
        return asdict(self)


def _layers(config) -> int:
    for f in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(config, f, None)
        if isinstance(v, int):
            return v
    from advisor.errors import AdvisorInputError

    raise AdvisorInputError("model", f"this {getattr(config, 'model_type', '?')} config has no layer count the "
                            "estimator can slice (num_hidden_layers / n_layer / num_layers at its top level): "
                            "multimodal models (a text_config inside) are not supported; give the language model's "
                            "own config")


def sliced_config(config, layers: int):
    """The same architecture with `layers` blocks in every stack (encoder and decoder for T5)."""
    c = copy.deepcopy(config)
    for f in _LAYER_FIELDS:
        if isinstance(getattr(c, f, None), int):
            setattr(c, f, layers)
    for attr in ("layer_types",):  # gemma2 / qwen2 alternate per-layer settings
        v = getattr(c, attr, None)
        if isinstance(v, list) and v:
            setattr(c, attr, (v * layers)[:layers])
    return c


def widths(config) -> dict[str, int]:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model")
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or getattr(cfg, "num_heads")
    kv = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "multi_query", False) and 1 or heads
    if getattr(cfg, "model_type", "") == "falcon" and not getattr(cfg, "new_decoder_architecture", False):
        kv = 1 if getattr(cfg, "multi_query", True) else heads
    hd = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or h // heads
    inter = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or getattr(cfg, "d_ff", None)
             or getattr(cfg, "ffn_hidden_size", None) or 4 * h)
    experts_per_token = getattr(cfg, "num_experts_per_tok", None) or 1
    return {"hidden": int(h), "intermediate": int(inter) * int(experts_per_token), "q_dim": int(heads * hd),
            "kv_dim": int(kv * hd), "heads": int(heads), "vocab": int(cfg.vocab_size)}


def _count(resolved, cfg: MethodConfig, layers: int) -> dict[str, int]:
    from advisor.engine import load_base_model, prepare

    sliced = copy.copy(resolved)
    sliced.config = sliced_config(resolved.config, layers)
    if cfg.training.torch_compile:  # counting runs nothing: no compile (and no reset of dynamo's caches under a fit)
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"torch_compile": False})})
    model = load_base_model(sliced, cfg, on_meta=True)
    prepared = prepare(model, sliced, cfg, on_meta=True, total_steps=100)
    out = {"weights": 0, "trainable": 0, "trainable_params": 0, "total_params": 0}
    seen = set()
    for p in prepared.model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        if p.requires_grad:
            out["trainable"] += nbytes
            out["trainable_params"] += p.numel()
        else:
            out["weights"] += nbytes
    out["unquantized"], modules = _unquantized_weights(prepared.model, cfg)
    trainable, total = prepared.param_counts()
    out["total_params"] = total
    out["lookup_params"], out["trainable_lookup_params"] = _lookup_params(prepared.model)
    out["idle_matmul_params"] = _idle_matmul_params(prepared.model)
    out["decoder_matmul_params"] = _decoder_matmul_params(prepared.model) if resolved.kind == "seq2seq" else 0
    for b in prepared.model.buffers():
        if id(b) not in seen:
            seen.add(id(b))
            out["weights"] += b.numel() * b.element_size()
    opt_bytes, temp_bytes = optimizer_bytes(prepared, cfg)
    out["optimizer"], out["optimizer_temp"] = opt_bytes, temp_bytes
    out["paged_optimizer"] = paged_optimizer_bytes(prepared, cfg)
    from advisor.estimator.coefficients import _simulation_config

    sim_cfg = _simulation_config(cfg)
    out["simulated_optimizer"] = opt_bytes if sim_cfg is cfg else optimizer_bytes(prepared, sim_cfg)[0]
    out["optimizer_flops"] = optimizer_flops(prepared, cfg)
    out["svd_matrix"] = svd_matrix_bytes(prepared, cfg)
    out["unquantized_modules"] = modules
    return out


def _unquantized_weights(model, cfg: MethodConfig) -> tuple[int, list[str]]:
    """Under a bitsandbytes base: bytes of frozen 16/32-bit weight matrices (2-D or more) in modules that are not
    exactly nn.Linear (which the quantizer replaces or deliberately skips), outside embeddings and the output head,
    and their module classes: what transformers 5's exact-type rule leaves 16-bit."""
    from advisor.memory.counter import _output_head

    q = cfg.quantization
    if q is None or q.quant_method == "gptq":
        return 0, []
    head = _output_head(model)
    skip = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    skip |= {id(p) for p in (head.parameters() if head is not None else ())}
    total, classes, seen = 0, set(), set()
    for mod in model.modules():
        # plain nn.Linear left 16-bit is deliberate (transformers' modules to skip or keep in fp32: the head, T5's wo)
        if (type(mod) is torch.nn.Linear or type(mod).__name__.startswith(("Sim", "Linear4bit", "Linear8bit"))
                or "lora" in type(mod).__name__.lower()):
            continue
        for p in mod.parameters(recurse=False):
            if id(p) in seen or id(p) in skip or p.requires_grad or p.dim() < 2 or p.element_size() < 2:
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
            classes.add(type(mod).__name__)
    return total, sorted(classes)


def _lookup_params(model) -> tuple[int, int]:
    """Parameters used by table lookup, not by a matmul: embedding tables (token, position), except one shared
    with the output head (that one is a matmul there). A lookup costs no FLOPs forward, and its gradient is a
    scatter-add of the incoming gradients, not a matmul: training-FLOP counts leave these parameters out
    (the convention of Kaplan et al. 2020, arXiv:2001.08361, for N). (all, trainable)"""
    from advisor.memory.counter import _output_head

    head_weight = getattr(_output_head(model), "weight", None)
    seen, total, trainable = set(), 0, 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Embedding):
            w = mod.weight
            if id(w) in seen or w is head_weight:
                continue
            seen.add(id(w))
            total += w.numel()
            trainable += w.numel() if w.requires_grad else 0
    return total, trainable


def _idle_matmul_params(model) -> int:
    """Parameters of the frozen originals that PEFT's `ModulesToSaveWrapper` keeps beside each trained copy (they
    never run while the adapter is active), except embedding tables, which `_lookup_params` already leaves out."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen, total = set(), 0
    for mod in model.modules():
        original = getattr(mod, "original_module", None) if type(mod).__name__ == "ModulesToSaveWrapper" else None
        if original is None:
            continue
        for p in original.parameters():
            if id(p) not in seen and id(p) not in tables:
                seen.add(id(p))
                total += p.numel()
    return total


def _decoder_matmul_params(model) -> int:
    """Encoder-decoder: parameters the decoder's tokens go through as matmuls (its blocks, with cross-attention, and
    the output head); tables (embeddings) are lookups. With a target length t ≠ s these see t tokens, not s."""
    seen, total = set(), 0
    for name, mod in model.named_modules():
        parts = name.split(".")
        if isinstance(mod, torch.nn.Embedding) or not ("decoder" in parts or "lm_head" in parts):
            continue
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def optimizer_bytes(prepared, cfg: MethodConfig) -> tuple[int, int]:
    """State bytes after a step, and the largest transient inside a step, from each parameter's shape and group.

    AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype (fused and foreach alike); foreach AdamW also
    holds one update-sized copy of every parameter at once; GaLore projects each 2-D gradient to rank r
    (states r x max(m, n), projector r x min(m, n)) and briefly holds the full-rank update of one matrix;
    bitsandbytes' 8-bit states are one byte per element plus fp32 block scales (tensors under 4096 elements stay
    32-bit) and its 32-bit optimizers keep both moments in fp32 whatever the parameter's dtype; Lion (bitsandbytes'
    lion_8bit / lion_32bit and their paged forms; Chen et al. 2023, arXiv:2302.06675) keeps one moment, in the same
    formats; Adafactor factors the second moment into row and column vectors (fp32).
    """
    name = cfg.training.optim
    groups = prepared.optimizer_params or [{"params": prepared.trainable_parameters()}]
    state = foreach_temp = largest_temp = 0
    eight_bit = name in ("adamw_8bit", "paged_adamw_8bit", "galore_adamw_8bit", "lion_8bit", "paged_lion_8bit")
    moments = 1 if "lion" in name else 2  # Lion: one moment (exp_avg), AdamW two
    for group in groups:
        rank = group.get("rank")
        for p in group["params"]:
            n, es = p.numel(), p.element_size()
            if name.startswith("galore") and rank is not None and p.dim() == 2:
                m, k = p.shape
                r = min(rank, m, k)
                low = r * max(m, k)
                moments = 2 * low + 2 * math.ceil(low / 256) * 4 if eight_bit else 2 * low * es
                state += moments + r * min(m, k) * es  # galore-torch counts steps in a Python int
                largest_temp = max(largest_temp, (m * k + low) * es)
            elif eight_bit:
                state += (moments * (n + math.ceil(n / 256) * 4) if n >= 4096 else moments * n * 4) + 4
            elif name in ("paged_adamw_32bit", "lion_32bit", "paged_lion_32bit"):
                state += moments * n * 4  # bitsandbytes' 32-bit states are fp32 whatever the parameter's dtype
            elif name == "lorafa":
                state += 2 * n * es  # PEFT's LoraFAOptimizer: exp_avg(_B), exp_avg_sq(_B); its step is a Python int
            elif name == "sgd":
                state += n * es
            elif name in ("adafactor", "galore_adafactor"):
                state += (p.shape[0] + n // p.shape[0]) * 4 if p.dim() > 1 else n * 4
            else:
                state += 2 * n * es + (0 if name.startswith("galore") else 4)  # torch's AdamW: a 0-d step tensor
                if name == "adamw_torch":
                    foreach_temp += n * es
    return state, max(foreach_temp, largest_temp)


PAGED_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "paged_lion_8bit", "paged_lion_32bit")
PAGED_MIN_ELEMENTS = 100_000  # bitsandbytes Optimizer8bit.get_state_buffer: smaller states stay ordinary tensors


def paged_optimizer_bytes(prepared, cfg: MethodConfig) -> int:
    """The part of the optimizer state a paged bitsandbytes optimizer allocates in CUDA unified memory: state1
    and state2 (uint8 for 8-bit, fp32 for 32-bit) of each parameter with ≥ 1e5 elements; block scales stay tensors."""
    name = cfg.training.optim
    if name not in PAGED_OPTIMIZERS:
        return 0
    per_element = (1 if "lion" in name else 2) * (1 if name.endswith("_8bit") else 4)
    params = [p for g in (prepared.optimizer_params or [{"params": prepared.trainable_parameters()}])
              for p in g["params"]]
    return sum(p.numel() * per_element for p in params if p.numel() >= PAGED_MIN_ELEMENTS)


def svd_matrix_bytes(prepared, cfg: MethodConfig) -> int:
    """GaLore: fp32 bytes of the largest 2-D gradient its projector decomposes (`torch.linalg.svd(G.float())`)."""
    if not cfg.training.optim.startswith("galore"):
        return 0
    sizes = [p.numel() * 4 for g in (prepared.optimizer_params or []) if g.get("rank") is not None
             for p in g["params"] if p.dim() == 2]
    return max(sizes, default=0)


def optimizer_flops(prepared, cfg: MethodConfig) -> float:
    """FLOPs of one optimizer step that do not scale with the tokens of the step.

    GaLore (Zhao et al. 2024, arXiv:2403.03507; `galore_torch`): every step projects each 2-D gradient G (m×n) to
    rank r (Pᵀ·G, 2·r·m·n FLOPs) and the rank-r update back (2·r·m·n); every `update_proj_gap` steps it recomputes
    P from an SVD of G (`torch.linalg.svd`, ≈ 4·m·n·min(m, n) FLOPs, the Golub-Kahan-Reinsch count), amortised
    over the gap. AdamW's elementwise work (~10 FLOPs per parameter) is left out, as for the other methods."""
    if not cfg.training.optim.startswith("galore"):
        return 0.0
    groups = prepared.optimizer_params or []
    flops = 0.0
    for group in groups:
        rank = group.get("rank")
        if rank is None:
            continue
        gap = max(int(group.get("update_proj_gap") or 200), 1)
        for p in group["params"]:
            if p.dim() != 2:
                continue
            m, n = p.shape
            r = min(rank, m, n)
            flops += 4.0 * r * m * n + 4.0 * m * n * min(m, n) / gap
    return flops


def _key(resolved, cfg: MethodConfig) -> str:
    basis = {"config": resolved.config.to_dict(), "kind": resolved.kind,
             "method": method_key_dump(cfg),
             "training": cfg.training.model_dump(mode="json", include={"torch_dtype", "optim", "bf16", "fp16"}),
             "v": 13}  # 9: SIM_VERSION 10's quantized stand-ins; 12: unquantized_weight_bytes; 13: Falcon's Linear
    basis["config"].pop("_name_or_path", None)
    basis["config"].pop("transformers_version", None)
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=4096)
def _cached(key: str) -> dict | None:
    path = _cache_path(key)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cache_path(key: str):
    from advisor.settings import get_settings

    return get_settings().cache_dir / "static" / f"{key}.json"


def static_terms(resolved, cfg: MethodConfig) -> StaticTerms:
    key = _key(resolved, cfg)
    data = _cached(key)
    if data is None:
        data = _compute(resolved, cfg)
        path = _cache_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(data))
        except OSError:
            pass
        _cached.cache_clear()
    return StaticTerms(**data)


def pinned_blocks(cfg: MethodConfig) -> int:
    """Blocks per stack whose role the method fixes (freeze tuning's trained blocks): slices keep them and add the
    others, so that every count stays linear in the depth it is extrapolated over."""
    from advisor.methods import get_method

    spec = get_method(cfg.method)
    return int(spec.pinned_blocks(cfg.peft or {})) if spec.pinned_blocks else 0


def block_period(cfg: MethodConfig) -> int:
    """Blocks per repeating group of the method's layout (LLaMA-Pro: N groups of frozen blocks + one new block): the
    slices' depths step by it, 1 for every other method."""
    from advisor.methods import get_method

    spec = get_method(cfg.method)
    return max(1, int(spec.block_period(cfg.peft or {}))) if spec.block_period else 1


def _compute(resolved, cfg: MethodConfig) -> dict:
    base, period = pinned_blocks(cfg), block_period(cfg)
    with _LOCK, torch.no_grad():
        one, two = _count(resolved, cfg, base + period), _count(resolved, cfg, base + 2 * period)
    depth = _layers(resolved.config)

    def extrapolate(key: str) -> int:
        return int(one[key] + (depth - base - period) * (two[key] - one[key]) // period)

    trainable = extrapolate("trainable")
    w = widths(resolved.config)
    return {
        "weights_bytes": extrapolate("weights"),
        "trainable_bytes": trainable,
        "trainable_params": extrapolate("trainable_params"),
        "total_params": extrapolate("total_params"),
        "gradient_bytes": trainable,
        "optimizer_bytes": extrapolate("optimizer"),
        "optimizer_temp_bytes": extrapolate("optimizer_temp") if cfg.training.optim == "adamw_torch"
        else two["optimizer_temp"],
        "layers": depth,
        **w,
        "family": resolved.config.model_type,
        "lookup_params": extrapolate("lookup_params"),
        "trainable_lookup_params": extrapolate("trainable_lookup_params"),
        "idle_matmul_params": extrapolate("idle_matmul_params"),
        "unquantized_weight_bytes": extrapolate("unquantized"),
        "unquantized_modules": ", ".join(sorted(set(one["unquantized_modules"]) | set(two["unquantized_modules"]))),
        "optimizer_flops_per_step": extrapolate("optimizer_flops"),
        "decoder_matmul_params": extrapolate("decoder_matmul_params"),
        "svd_matrix_bytes": max(one["svd_matrix"], two["svd_matrix"]),
        "paged_optimizer_bytes": extrapolate("paged_optimizer"),
        "simulated_optimizer_bytes": extrapolate("simulated_optimizer"),
        "block_param_bytes": int(two["weights"] + two["trainable"] - one["weights"] - one["trainable"]) // period,
        "block_trainable_bytes": int(two["trainable"] - one["trainable"]) // period,
    }
