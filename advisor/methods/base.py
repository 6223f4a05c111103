"""What a fine-tuning method is, to every part of the advisor.

One `MethodSpec` per method, registered once. The rules read its defaults and requirements, the estimator
and calibration read its build (which they run on meta/fake or real tensors), and the executor trains what
the same build returns. Seed-derived defaults live in `defaults.yaml` beside this file, each with its source.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from advisor.config import MethodConfig, QuantizationConfig, TrainingConfig, parse_training, pydantic_to_input_error
from advisor.errors import AdvisorInputError

if TYPE_CHECKING:  # torch is imported where a model is built, not to list or validate methods
    import torch

METHOD_IDS = (
    "full",
    "lora",
    "qlora",
    "adalora",
    "ia3",
    "bitfit",
    "prompt_tuning",
    "prefix_tuning",
    "adapter",
    "longlora",
    "galore",
    "molora",
)
_ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class BuildContext:
    """What a method's build needs to know besides the model."""

    kind: str  # "causal_lm" | "seq2seq"
    model_type: str
    on_meta: bool  # building for simulation (meta/fake tensors) rather than a real run
    training: TrainingConfig
    total_steps: int = 100
    quantization: QuantizationConfig | None = None


@dataclass
class Prepared:
    """A model ready to train with its method, and the method's hooks into the training step."""

    model: torch.nn.Module
    method: str
    peft: dict[str, Any]
    optimizer_params: list[dict] | None = None  # param groups; None → all trainable params in one group
    after_optimizer_step: Callable[[int], None] | None = None  # e.g. AdaLoRA's update_and_allocate(step)
    extra_loss: Callable[[], torch.Tensor | None] | None = None  # e.g. MoLoRA's router balance loss
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def param_counts(self) -> tuple[int, int]:
        seen: set[int] = set()
        total = trainable = 0
        for p in self.model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = _numel(p)
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total


def _numel(p: torch.Tensor) -> int:
    """Logical parameter count; bitsandbytes packs two 4-bit values per byte (and our stand-in does too)."""
    shape = getattr(p, "quant_shape", None) or getattr(getattr(p, "quant_state", None), "shape", None)
    if shape is not None:
        n = 1
        for s in shape:
            n *= int(s)
        return n
    return p.numel()


@dataclass(frozen=True)
class MethodSpec:
    id: str
    name: str
    summary: str
    build: Callable[[torch.nn.Module, dict[str, Any], BuildContext], Prepared]
    knobs: dict[str, Any]  # knob → library/paper fallback when the seeds give no value
    kinds: tuple[str, ...] = ("causal_lm", "seq2seq")
    requires: tuple[str, ...] = ()
    quantized: bool = False  # base weights loaded in 4-bit
    full_weights: bool = False  # saves a full model rather than an adapter
    mergeable: bool = True
    paper: str = ""
    validate: Callable[[dict[str, Any], BuildContext], None] | None = None
    # knobs beyond `knobs` that depend on the request (method "peft": the fields of the PEFT type's config class)
    open_knobs: Callable[[dict[str, Any]], list[str]] | None = None
    # blocks whose role the method's knobs fix (freeze tuning's trained blocks): the estimator's depth slices keep
    # them and vary the others, so that memory stays linear in the depth it extrapolates
    pinned_blocks: Callable[[dict[str, Any]], int] | None = None
    # blocks per repeating group of the stack (LLaMA-Pro: one new block per L/N frozen ones, N groups): the slices'
    # depths are multiples of it so that every slice has the method's layout
    block_period: Callable[[dict[str, Any]], int] | None = None

    # -- seed-derived defaults --------------------------------------------------------------
    @property
    def seed_defaults(self) -> dict[str, Any]:
        return _defaults_yaml().get(self.id, {}) or {}

    def default_peft(self) -> dict[str, Any]:
        hyper = self.seed_defaults.get("hyperparameters", {}) or {}
        out = {}
        for knob, fallback in self.knobs.items():
            entry = hyper.get(knob)
            out[knob] = entry["value"] if isinstance(entry, dict) and "value" in entry else fallback
        return out

    def default_training(self) -> dict[str, Any]:
        hyper = self.seed_defaults.get("hyperparameters", {}) or {}
        fields = TrainingConfig.model_fields
        out = {}
        for knob, entry in hyper.items():
            if knob in fields and isinstance(entry, dict) and "value" in entry:
                out[knob] = entry["value"]
        return out

    def citations(self) -> dict[str, str]:
        hyper = self.seed_defaults.get("hyperparameters", {}) or {}
        return {k: v.get("source", "") for k, v in hyper.items() if isinstance(v, dict)}

    # -- config resolution ----------------------------------------------------------------
    def resolve_config(self, config: dict | MethodConfig | None = None) -> MethodConfig:
        """Fill in defaults and validate, raising AdvisorInputError naming the field."""
        raw: dict[str, Any] = {}
        if isinstance(config, MethodConfig):
            raw = config.model_dump()
        elif config:
            raw = dict(config)
        if raw.get("method") not in (None, self.id):
            raise AdvisorInputError("config.method", f"{raw['method']!r} does not match method {self.id!r}")
        unknown = set(raw) - {"method", "peft", "quantization", "training"}
        if unknown:
            raise AdvisorInputError(
                f"config.{sorted(unknown)[0]}", "unknown field", allowed=["method", "peft", "quantization", "training"]
            )
        peft = self.default_peft()
        given = raw.get("peft") or {}
        if not isinstance(given, dict):
            raise AdvisorInputError("config.peft", f"must be an object of {self.id}'s knobs, got {type(given).__name__}")
        open_knobs = set(self.open_knobs(given)) if self.open_knobs else set()
        for key, value in given.items():
            if key not in self.knobs and key not in open_knobs:
                raise AdvisorInputError(f"config.peft.{key}", f"not a knob of {self.id}",
                                        allowed=sorted(set(self.knobs) | open_knobs))
            peft[key] = value
        training = {**self.default_training(), **(raw.get("training") or {})}
        parsed_training = parse_training(training)
        quant = raw.get("quantization")
        if self.quantized:
            try:
                quant_cfg = QuantizationConfig.model_validate(quant or {})
            except ValidationError as err:
                raise pydantic_to_input_error(err, "config.quantization") from None
            if not (quant_cfg.load_in_4bit or quant_cfg.load_in_8bit or quant_cfg.quant_method == "gptq"):
                raise AdvisorInputError("config.quantization.load_in_4bit",
                                        f"{self.id} needs a quantized base: load_in_4bit or load_in_8bit true")
        elif quant:
            raise AdvisorInputError("config.quantization", f"{self.id} trains unquantized weights; use qlora for 4-bit")
        else:
            quant_cfg = None
        if self.id == "galore" and not parsed_training.optim.startswith("galore_"):
            parsed_training.optim = "galore_adamw"
        elif self.id != "galore" and parsed_training.optim.startswith("galore_"):
            raise AdvisorInputError("config.training.optim", f"{parsed_training.optim} is GaLore's optimizer; use method 'galore'")
        if parsed_training.optim == "lorafa":
            if self.id not in ("lora", "qlora"):
                raise AdvisorInputError("config.training.optim", "lorafa (LoRA-FA: LoRA's A frozen, B's gradient "
                                        f"projected) optimizes LoRA adapters; method {self.id!r} has none",
                                        allowed=["lora", "qlora"])
            if peft.get("use_dora"):
                raise AdvisorInputError("config.peft.use_dora", "PEFT's LoRA-FA optimizer pairs each adapter's A and B "
                                        "and has no rule for DoRA's magnitude vector", allowed=["false"])
            if parsed_training.optimizer_in_backward:
                raise AdvisorInputError("config.training.optimizer_in_backward", "LoRA-FA's step projects B's "
                                        "gradient with its A, pair by pair, after backward", allowed=["false"])
        return MethodConfig(method=self.id, peft=peft, quantization=quant_cfg, training=parsed_training)

    def describe(self) -> dict[str, Any]:
        seeds = self.seed_defaults
        return {
            "id": self.id,
            "name": seeds.get("name", self.name),
            "summary": seeds.get("summary", self.summary),
            "applies_to": list(self.kinds),
            "requires": list(self.requires) + list(seeds.get("requires", []) or []),
            "quantized": self.quantized,
            "saves": "full model" if self.full_weights else "adapter",
            "mergeable": self.mergeable,
            "defaults": {"peft": self.default_peft(), "training": self.default_training()},
            "citations": self.citations(),
            "use_when": seeds.get("use_when", []),
            "dont_use_when": seeds.get("dont_use_when", []),
            "paper": self.paper,
            # the twelve are what the rules decide between; the others are estimated and trained on request
            "recommended_by_rules": self.id in METHOD_IDS,
        }


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if not _ID_RE.match(spec.id):
        raise ValueError(f"bad method id {spec.id!r}: lower-case letters, digits and _ only")
    if spec.id in _REGISTRY:
        raise ValueError(f"method {spec.id!r} is already registered")
    _REGISTRY[spec.id] = spec
    return spec


def registry() -> dict[str, MethodSpec]:
    return _REGISTRY


@functools.lru_cache(maxsize=1)
def _defaults_yaml() -> dict[str, Any]:
    path = Path(__file__).with_name("defaults.yaml")
    if not path.exists():
        return {}
    return yaml.safe_load(path.read_text()) or {}


# -- helpers shared by several methods ------------------------------------------------------------


def freeze(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def whole_knob(peft: dict, key: str, low: int, high: int, what: str = "") -> int:
    """peft[key] when it is an integer in low..high (a bool is not), else an AdvisorInputError naming
    config.peft.<key>; `what` says what the number is."""
    v = peft[key]
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise AdvisorInputError(f"config.peft.{key}", f"{what}{': ' if what else ''}must be an integer in "
                                f"{low}..{high:,}, got {v!r}")
    return v


def peft_task_type(ctx: BuildContext) -> str:
    return "SEQ_2_SEQ_LM" if ctx.kind == "seq2seq" else "CAUSAL_LM"


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of Linear-like layers (excluding the output head), e.g. q_proj, v_proj, c_attn."""
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, mod in model.named_modules():
        if mod is head:
            continue
        if isinstance(mod, nn.Linear) or type(mod).__name__ in ("Conv1D", "Linear4bit", "SimLinear4bit", "SimLinear8bit",
                                                                     "SimLinearGPTQ", "QuantLinear"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_targets(model: torch.nn.Module, targets: Any, field_name: str) -> None:
    """Raise a clear error when explicit target module names match no layer of the model."""
    if targets in (None, "all-linear") or isinstance(targets, str):
        return
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise AdvisorInputError(field_name, f"no layer named {missing} in this model", allowed=available)
