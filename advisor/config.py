"""The training configuration shape shared by recommendations, estimates and jobs (CONTRACT.md `config`).

``{"method": ..., "peft": {...}, "quantization": {...} | null, "training": {...}}``

`peft` holds the method's own knobs (validated by the method spec, which fills in its seed-derived defaults);
`training` is validated here once, with messages that name the field and what is allowed.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from advisor.errors import AdvisorInputError

OPTIMIZERS = (
    "adamw_torch_fused",
    "adamw_torch",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "lion_8bit",
    "lion_32bit",
    "paged_lion_8bit",
    "paged_lion_32bit",
    "lorafa",
    "sgd",
    "adafactor",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
)
ATTENTION = ("sdpa", "flash_attention_2", "eager")
DTYPES = ("bfloat16", "float16", "float32")
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


class RopeScaling(BaseModel):
    """RoPE position scaling: trains on sequences longer than the model's max_position_embeddings. `linear` is
    position interpolation (Chen et al. 2023), what LongLoRA uses to extend Llama-2 from 4K to 32K-100K tokens;
    the model's positions become max_position_embeddings × factor. Named as in Axolotl's `rope_scaling`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["linear", "dynamic", "yarn"] = "linear"
    factor: float = Field(..., gt=1, le=128, description="new context length / the model's max_position_embeddings")


class TrainingConfig(BaseModel):
    """Training arguments, named as in transformers' `TrainingArguments` where one exists."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate.")
    num_train_epochs: float = Field(3, gt=0, le=1000, description="Passes over the dataset (fractions allowed).")
    per_device_train_batch_size: int = Field(4, ge=1, le=65536, description="Micro-batch per device.")
    gradient_accumulation_steps: int = Field(
        4, ge=1, le=65536, description="Micro-batches per optimizer step: the effective batch is micro-batch × this × GPUs.")
    max_seq_length: int = Field(1024, ge=8, le=2_097_152, description="Tokens per example after truncation.")
    max_target_length: int | None = Field(
        None, ge=1, le=2_097_152,
        description="Encoder-decoder models only: target (decoder) tokens per example after truncation, as "
                    "`max_target_length` in transformers' seq2seq examples; default: max_seq_length. Short targets "
                    "(labels of a classifier, a summary) make the decoder's activations and logits a fraction of "
                    "the encoder's.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of the steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Decoupled weight decay (AdamW).")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 turns clipping off.")
    gradient_checkpointing: bool = Field(
        False, description="Keep only each block's input in forward and recompute the block in backward: activation "
                           "memory of one block instead of all, at about one more forward of compute.")
    gradient_checkpointing_reentrant: bool = Field(
        False,
        description="Checkpoint with torch's reentrant implementation (use_reentrant=True: transformers' default "
                    "before 5, LLaMA-Factory's use_reentrant_gc) instead of the non-reentrant one. Equal memory with "
                    "today's libraries; it matters where a library keeps tensors outside autograd's saved tensors "
                    "(bitsandbytes before 0.43.2, see quantization.bitsandbytes_version).")
    bf16: bool = Field(True, description="bfloat16 compute (autocast); weights follow `torch_dtype`.")
    fp16: bool = Field(False, description="float16 compute with loss scaling (GPUs without bf16, e.g. T4).")
    torch_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="dtype the base weights are loaded in; default: bfloat16 if bf16, float16 if fp16, else float32."
    )
    optim: str = Field("adamw_torch_fused", description=f"Optimizer; one of {', '.join(OPTIMIZERS)}.")
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description="Attention kernel: sdpa / flash_attention_2 keep no sequence × sequence scores; eager does "
                            "(the S² term).")
    rope_scaling: RopeScaling | None = Field(None, description="Extend the context beyond the model's positions "
                                             "(e.g. {'type': 'linear', 'factor': 8} for LongLoRA 4K → 32K).")
    cross_entropy: Literal["standard", "chunked", "fused_linear"] = Field(
        "standard",
        description="How a causal LM's loss meets its logits: 'standard' (every position's logits at once, upcast "
                    "to fp32: ≈ 12 bytes per token × vocabulary at the peak), 'chunked' (torchtune's "
                    "CEWithChunkedOutputLoss, 8 slices: ≈ 6), 'fused_linear' (Liger Kernel's fused linear "
                    "cross-entropy: no logits outlive a chunk of tokens). See advisor/losses.py.")
    optimizer_in_backward: bool = Field(
        False,
        description="Step each parameter's optimizer inside backward, as soon as its gradient is complete, and free "
                    "the gradient (torchtune's optimizer_in_bwd): the whole model's gradients never exist at once. "
                    "One GPU, gradient_accumulation_steps 1, max_grad_norm 0, not with fp16 or AdaLoRA.")
    activation_offloading: bool = Field(
        False,
        description="Move the tensors the forward pass saves for backward to host memory and bring them back when "
                    "backward needs them (torchtune's / TRL's / Axolotl's activation_offloading): with gradient "
                    "checkpointing only the blocks' inputs stay behind on the device, and then not even those. "
                    "The output head and the loss are not offloaded. See advisor/offload.py.")
    torch_compile: bool = Field(
        False,
        description="Compile each transformer block with torch.compile (torchtune's compile: True): AOTAutograd's "
                    "min-cut partitioner saves fewer activations and recomputes cheap ones in backward. Inductor on "
                    "CUDA; the estimate runs the same partitioning without code generation "
                    "(aot_eager_decomp_partition), which is also what a CPU run uses. Not with AdaLoRA.")
    packing: bool = Field(False, description="Concatenate examples into full max_seq_length rows (every row is the "
                                             "longest: memory is estimated at max_seq_length).")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Random seed of the run (NumPy takes 0..2^32-1).")
    logging_steps: int = Field(10, ge=1, description="Steps between logged losses.")
    save_steps: int = Field(200, ge=1, description="Steps between checkpoints.")
    eval_steps: int = Field(200, ge=1, description="Steps between evaluations on the held-out split.")

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        if v not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {v!r}; allowed: {', '.join(OPTIMIZERS)}")
        return v

    @model_validator(mode="after")
    def _precision(self) -> TrainingConfig:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 cannot both be true; choose one")
        if self.torch_dtype is None:
            self.torch_dtype = "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32"
        return self

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


# transformers' BitsAndBytesConfig default, which Axolotl and LLaMA-Factory load with (neither exposes it)
LLM_INT8_THRESHOLD = 6.0


class QuantizationConfig(BaseModel):
    """The frozen base's quantization. bitsandbytes (the default), named as in `transformers.BitsAndBytesConfig`:
    4-bit NF4/FP4 (QLoRA) or 8-bit LLM.int8() (`load_in_8bit: true`, what Axolotl's `load_in_8bit` and
    LLaMA-Factory's `quantization_bit: 8` load). Or a GPTQ checkpoint (`quant_method: "gptq"`, `bits`,
    `group_size`, as in its config.json's quantization_config): LoRA on an already-quantized model."""

    model_config = ConfigDict(extra="forbid")

    quant_method: Literal["bitsandbytes", "gptq"] = Field(
        "bitsandbytes", description="bitsandbytes quantizes at load; gptq: the checkpoint is already GPTQ-quantized "
                                    "(needs gptqmodel to train)")
    bits: Literal[2, 3, 4, 8] = Field(4, description="GPTQ only: bits per weight")
    group_size: int = Field(128, ge=-1, description="GPTQ only: weights per scale/zero group along the input (-1: one "
                                                    "group per column)")

    load_in_4bit: bool = Field(True, description="bitsandbytes 4-bit weights (QLoRA); load_in_8bit selects 8-bit instead.")
    load_in_8bit: bool = Field(
        False, description="LLM.int8(): int8 weights with one fp32 scale per output row; activations quantized per "
                           "row in every matmul, outlier columns (|x| ≥ llm_int8_threshold) kept in 16-bit. Not "
                           "with FSDP / ZeRO-3 (bitsandbytes' int8 weights cannot be sharded).")
    llm_int8_threshold: float = Field(LLM_INT8_THRESHOLD, ge=0, description="8-bit only: the outlier threshold (0: no outliers).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type: NormalFloat4 (QLoRA's) or plain FP4.")
    bnb_4bit_use_double_quant: bool = Field(
        True, description="Quantize the per-block scales too (8-bit): about 0.37 bits per weight saved.")
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the 4-bit weights are dequantized to for each matmul.")
    bitsandbytes_version: str | None = Field(
        None, description="The bitsandbytes the run will use, e.g. \"0.41.1\" (default: the installed one, or a "
                          "release after 0.43.1). Before 0.43.2 the 4-bit matmul kept its input until backward "
                          "(bitsandbytes PR #1270, 'fix QLoRA mem bug'): one more saved activation per 4-bit layer, "
                          "and with non-reentrant checkpointing those are kept for every block.")

    @field_validator("bitsandbytes_version")
    @classmethod
    def _a_bitsandbytes_version(cls, v: str | None, info) -> str | None:
        if v is not None:
            if info.data.get("quant_method") != "bitsandbytes":
                raise ValueError("bitsandbytes_version applies to a bitsandbytes base, not to a GPTQ checkpoint")
            parse_bnb_version(v)
        return v

    @model_validator(mode="after")
    def _one_width(self) -> QuantizationConfig:
        if self.quant_method == "gptq":
            if self.load_in_8bit:
                raise ValueError("load_in_8bit is bitsandbytes' LLM.int8(); a GPTQ checkpoint sets its width with bits")
            if self.group_size == 0:
                raise ValueError("group_size must be a positive number of weights or -1 (one group per column)")
            self.load_in_4bit = False
            return self
        if (self.bits, self.group_size) != (4, 128):  # a dumped bitsandbytes config carries the defaults back
            raise ValueError("bits and group_size describe a GPTQ checkpoint: set quant_method 'gptq', or use "
                             "load_in_4bit / load_in_8bit for bitsandbytes")
        if self.load_in_8bit:
            if self.load_in_4bit and "load_in_4bit" in self.model_fields_set:
                raise ValueError("load_in_4bit and load_in_8bit cannot both be true; choose one (load_in_8bit "
                                 "alone selects 8-bit)")
            self.load_in_4bit = False
        return self


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    peft: dict[str, Any] = Field(default_factory=dict)
    quantization: QuantizationConfig | None = None
    training: TrainingConfig = Field(default_factory=TrainingConfig)


# training options added after caches existed: at these values they stay out of cache keys, so the simulations and
# fits cached before them still serve (advisor.memory.simulate, advisor.estimator.coefficients)
KEY_NEUTRAL_DEFAULTS = {"cross_entropy": "standard", "optimizer_in_backward": False, "activation_offloading": False,
                        "torch_compile": False, "gradient_checkpointing_reentrant": False}


# the same for method knobs added after caches existed (PEFT's modules_to_save, None unless asked for)
PEFT_KEY_NEUTRAL_DEFAULTS = {"modules_to_save": None, "autocast_adapter_dtype": True}


def peft_without_neutral_defaults(peft: dict) -> dict:
    return {k: v for k, v in peft.items()
            if not (k in PEFT_KEY_NEUTRAL_DEFAULTS and PEFT_KEY_NEUTRAL_DEFAULTS[k] == v)}


GPTQ_FIELDS = ("quant_method", "bits", "group_size")

# bitsandbytes 0.43.2 (2024-07-23) stopped MatMul4Bit keeping its input A on ctx (PR #1270, commit 9e753741)
BNB_HOLDS_4BIT_INPUT_BEFORE = (0, 43, 2)
LAST_BNB_HOLDING_4BIT_INPUT = "0.43.1"


def parse_bnb_version(text: str) -> tuple[int, ...]:
    """'0.41.1' → (0, 41, 1); anything else is refused (a ValueError naming what is allowed)."""
    m = re.fullmatch(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?(?:(?:\.|\+|-|rc|dev|post)[\w.+-]*)?\s*", str(text))
    if not m:
        raise ValueError(f"bitsandbytes_version {text!r} is not a version: write it as bitsandbytes does, e.g. "
                         "\"0.41.1\" or \"0.45\"")
    return tuple(int(g or 0) for g in m.groups()[:3])


@functools.lru_cache(maxsize=1)
def installed_bnb_version() -> str | None:
    """The installed bitsandbytes' version (what the executor trains with), or None (read once per process)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


def bnb_version_of(q: QuantizationConfig | dict | None) -> str | None:
    """The bitsandbytes a 4-bit run of `q` uses: the one it names, else the installed one."""
    if q is None:
        return None
    named = q.get("bitsandbytes_version") if isinstance(q, dict) else q.bitsandbytes_version
    return named or installed_bnb_version()


def bnb_holds_4bit_input(q: QuantizationConfig | dict | None) -> bool:
    """Whether the 4-bit matmul of `q`'s bitsandbytes (named, else installed) keeps its input until backward
    (every release before 0.43.2)."""
    if q is None:
        return False
    d = q if isinstance(q, dict) else q.model_dump()
    if d.get("quant_method", "bitsandbytes") != "bitsandbytes" or d.get("load_in_8bit") or not d.get("load_in_4bit", True):
        return False
    version = bnb_version_of(q)
    try:
        return bool(version) and parse_bnb_version(version) < BNB_HOLDS_4BIT_INPUT_BEFORE
    except ValueError:  # an installed build with an odd version string: today's behaviour
        return False


def quantization_settings(q: QuantizationConfig | None) -> dict | None:
    """The settings that apply to `q`'s kind: a GPTQ checkpoint's (quant_method, bits, group_size), or bitsandbytes'
    (the BitsAndBytesConfig keyword arguments), for exports that write one or the other."""
    if q is None:
        return None
    d = q.model_dump(mode="json")
    if q.quant_method == "gptq":
        return {k: d[k] for k in GPTQ_FIELDS}
    d.pop("bitsandbytes_version", None)  # describes the run's library, not a BitsAndBytesConfig argument
    return {k: v for k, v in d.items() if k not in GPTQ_FIELDS}


def method_key_dump(cfg: MethodConfig) -> dict:
    """`cfg`'s method, PEFT knobs and quantization as cache keys see them (neutral defaults left out)."""
    out = cfg.model_dump(mode="json", include={"method", "peft", "quantization"})
    out["peft"] = peft_without_neutral_defaults(out.get("peft") or {})
    out["quantization"] = quantization_without_neutral_defaults(out.get("quantization"))
    return out


def quantization_without_neutral_defaults(q: dict | None) -> dict | None:
    """A dumped quantization config as cache keys see it: a bitsandbytes one without the GPTQ fields (added after
    caches existed; a bitsandbytes config only ever holds their defaults), so its keys stay as they were."""
    if q and q.get("quant_method", "bitsandbytes") == "bitsandbytes":
        out = {k: v for k, v in q.items() if k not in GPTQ_FIELDS and k != "bitsandbytes_version"}
        if bnb_holds_4bit_input(q):  # only what changes the simulation enters the keys (and the simulation's request):
            out["bitsandbytes_version"] = LAST_BNB_HOLDING_4BIT_INPUT  # every version before 0.43.2 as one; later: neutral
        return out
    return q


def without_neutral_defaults(training: dict) -> dict:
    return {k: v for k, v in training.items() if not (k in KEY_NEUTRAL_DEFAULTS and KEY_NEUTRAL_DEFAULTS[k] == v)}


def pydantic_to_input_error(err: ValidationError, prefix: str) -> AdvisorInputError:
    """The first validation problem as an AdvisorInputError whose field is the dotted path."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    field = f"{prefix}.{loc}" if loc else prefix
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    return AdvisorInputError(field, msg)


def parse_training(data: dict | None, prefix: str = "config.training") -> TrainingConfig:
    try:
        return TrainingConfig.model_validate(data or {})
    except ValidationError as err:
        raise pydantic_to_input_error(err, prefix) from None


def _type_of(annotation) -> tuple[str, list | None]:
    """A field's type as a user writes it, and its allowed values where they are a fixed list."""
    import types
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        values = list(typing.get_args(annotation))
        return _type_of(type(values[0]))[0], values
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args:
        kind, allowed = _type_of(args[0])
        return f"{kind} or null", allowed
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object", None
    names = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object", list: "array"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation))), None


def config_reference() -> dict[str, list[dict]]:
    """Every knob of `config.training` and `config.quantization`: name, type, default, allowed values, limits and
    description (GET /v1/config, `advisor knobs`). `config.peft` holds each method's own knobs (GET /v1/methods)."""
    out = {}
    for section, model in (("training", TrainingConfig), ("quantization", QuantizationConfig)):
        rows = []
        for name, field in model.model_fields.items():
            kind, allowed = _type_of(field.annotation)
            if name == "optim":
                allowed = list(OPTIMIZERS)
            limits = {}
            for meta in field.metadata:
                for op in ("gt", "ge", "lt", "le"):
                    if getattr(meta, op, None) is not None:
                        limits[op] = getattr(meta, op)
            default = field.get_default(call_default_factory=True)
            rows.append({"name": name, "type": kind,
                         "default": default.model_dump() if isinstance(default, BaseModel) else default,
                         **({"allowed": allowed} if allowed else {}), **({"limits": limits} if limits else {}),
                         "description": (field.description or "").strip() or None})
        out[section] = rows
    return out
