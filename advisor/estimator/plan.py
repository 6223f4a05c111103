"""What every estimate starts from: the resolved model, method config, hardware and the shape of the peak batch."""

from __future__ import annotations

from dataclasses import dataclass

from advisor.catalog.models import ResolvedModel, resolve_model
from advisor.config import MethodConfig
from advisor.errors import AdvisorInputError
from advisor.hardware import HardwareTarget, resolve_hardware
from advisor.methods import MethodSpec, get_method
from advisor.schemas import BREAKDOWN_KEYS, EstimateRequest


@dataclass
class Plan:
    model: ResolvedModel
    spec: MethodSpec
    config: MethodConfig
    hardware: HardwareTarget
    batch_size: int
    seq_len: int  # tokens of the longest batch (sets the peak)
    request: EstimateRequest
    notes: tuple[str, ...] = ()  # how the request was read (a method alias such as "dora")

    @property
    def training(self):
        return self.config.training

    @property
    def profile_method(self) -> str:
        """The method whose calibrated terms (achieved FLOP/s, error band, allocator replay) apply: the method
        itself, or for method "peft" the calibrated method nearest its PEFT type (weight adapters: LoRA)."""
        if self.spec.id == "peft":
            from advisor.methods.peft_any import rate_proxy

            return rate_proxy(self.config.peft or {})
        if self.spec.id in ("freeze", "llama_pro"):  # full fine-tuning's kernels on part of the model
            return "full"
        return self.spec.id

    @property
    def target(self) -> str:
        """The device kind whose kernels the memory model counts: "cuda" for a GPU, "cpu" without one."""
        return "cuda" if self.hardware.has_gpu else "cpu"


def build_plan(req: EstimateRequest) -> Plan:
    from advisor.methods import resolve_method_alias

    model = resolve_model(req.model)
    method, config, alias_note = resolve_method_alias(req.method, req.config)
    spec = get_method(method)
    if model.kind not in spec.kinds:
        raise AdvisorInputError("method", f"{spec.id} does not apply to {model.kind} models ({model.id})",
                                allowed=[m for m in _methods_for(model.kind)])
    cfg = spec.resolve_config(config)
    hardware = resolve_hardware(req.hardware)
    seq = cfg.training.max_seq_length
    if req.dataset is not None and req.dataset.max_tokens is not None:
        seq = min(seq, req.dataset.max_tokens)
    limit = model.max_positions
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    rope_scaled = isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in (None, "default")
    rs = cfg.training.rope_scaling
    if rs is not None and limit is not None:
        if not hasattr(model.config, "rope_parameters"):
            raise AdvisorInputError("config.training.rope_scaling",
                                    f"{model.id} has no rotary position embeddings to scale")
        limit = int(limit * rs.factor)
    if limit is not None and seq > limit and not rope_scaled:
        raise AdvisorInputError(
            "config.training.max_seq_length",
            f"{seq} tokens exceeds {model.id}'s max_position_embeddings ({limit}"
            + (f" with rope_scaling × {rs.factor:g}" if rs is not None else "") + "); lower it, or set "
            "config.training.rope_scaling (e.g. {'type': 'linear', 'factor': 8}; LongLoRA extends context that way)",
        )
    if cfg.training.max_target_length is not None and model.kind != "seq2seq":
        raise AdvisorInputError("config.training.max_target_length",
                                f"{model.id} is a decoder-only model: its labels are its inputs, so only "
                                "max_seq_length applies (max_target_length is for encoder-decoder models such as T5)")
    from advisor.engine import check_optimizer_in_backward, check_torch_compile

    if spec.id == "peft":
        from advisor.methods.peft_any import check_model

        check_model(cfg.peft, model.config)
    if spec.id == "freeze":
        from advisor.methods.freeze import validate

        validate(cfg.peft, None, model.num_layers)
    if spec.id == "llama_pro":  # every later term sees the expanded architecture (L + N blocks)
        from advisor.methods.freeze import expanded_model

        model = expanded_model(model, cfg.peft)
    check_optimizer_in_backward(cfg.training, spec.id, hardware.count)
    check_torch_compile(cfg.training, spec.id)
    return Plan(model, spec, cfg, hardware, cfg.training.per_device_train_batch_size, seq, req,
                (alias_note,) if alias_note else ())


def _methods_for(kind: str) -> list[str]:
    from advisor.methods import all_methods

    return [m.id for m in all_methods() if kind in m.kinds]


def breakdown_from_counter(raw: dict[str, float], overhead_bytes: float = 0, phase: str | None = None) -> dict[str, float]:
    """Counter categories → the public breakdown. Temporaries and the batch count as activations, except at an
    optimizer-step peak, where the temporaries are the update's own buffers (foreach AdamW's full-size
    intermediates) and count as optimizer."""
    out = dict.fromkeys(BREAKDOWN_KEYS, 0.0)
    spill = "optimizer" if phase == "optimizer" else "activations"
    for key, value in raw.items():
        if key != "overhead":
            out[key if key in out else spill] += value / 2**30
    out["overhead"] = overhead_bytes / 2**30
    return {k: round(v, 4) for k, v in out.items()}


def fit_fields(peak_bytes: int, hardware: HardwareTarget) -> dict:
    peak_gib = peak_bytes / 2**30
    if hardware.memory_gib is None:
        return {"fits": False, "headroom_gib": None}
    return {"fits": peak_gib <= hardware.memory_gib, "headroom_gib": round(hardware.memory_gib - peak_gib, 3)}
