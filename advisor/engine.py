"""Load a base model, apply a method, make its optimizer, run one training step.

The simulator (meta → fake tensors), the calibration probes (real tensors on the local device) and the
executor all go through these functions, so what is estimated is what is trained.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from advisor.config import MethodConfig, TrainingConfig, bnb_holds_4bit_input
from advisor.losses import computing_loss
from advisor.methods import BuildContext, Prepared, get_method

# Library messages that say nothing to a user of the advisor: PEFT asking transformers' deprecated
# `is_gradient_checkpointing`, PEFT meeting the estimator's 4/8-bit stand-ins (SimLinear4bit/8bit, below), and BEFT/BitFit
# noting that a bias-less base layer cannot be merged (the estimator builds such layers to count bytes).
for _message in (r"`is_gradient_checkpointing` is deprecated", r"Unsupported layer type .*SimLinear[48]bit",
                 r"Detected that the base layer has no bias term"):
    warnings.filterwarnings("ignore", message=_message)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------- 4-bit stand-in (simulation)
class _Dequant4bitMatmul(torch.autograd.Function):
    """Mirrors bitsandbytes' MatMul4Bit with its default kernel: in forward and again in backward, the block
    scales are dequantized to fp32 (double quantization), then the weight to the compute dtype, then one matmul."""

    @staticmethod
    def forward(ctx, x, packed, absmax, shape, dtype, holds_input=False):
        ctx.shape, ctx.dtype = shape, dtype
        # kept on ctx, not save_for_backward, as MatMul4Bit keeps `ctx.tensors`/`ctx.state`: non-reentrant
        # checkpointing stops its recomputation once every *saved* tensor is back, so a saved weight here would
        # recompute the block's last 4-bit matmul (dequantized weight + output) that a real run skips
        ctx.packed, ctx.absmax = packed, absmax
        # bitsandbytes before 0.43.2 also kept the input there (`ctx.tensors = (A, B)`, never read in backward;
        # PR #1270): alive as long as the graph (past this node's backward), out of reach of checkpointing's hooks
        ctx.held_input = x if holds_input and ctx.needs_input_grad[0] else None
        scales = _dequant_scales(absmax)
        w = torch.empty(shape, dtype=dtype, device=x.device)
        out = torch.nn.functional.linear(x, w)
        del scales, w
        return out

    @staticmethod
    def backward(ctx, grad_out):
        absmax = ctx.absmax
        scales = _dequant_scales(absmax, in_place=True)
        w = torch.empty(ctx.shape, dtype=ctx.dtype, device=grad_out.device)
        grad = torch.matmul(grad_out, w)
        del scales, w  # ctx.held_input stays: bitsandbytes never cleared ctx.tensors, so it lived as long as the graph
        return grad, None, None, None, None, None


def _dequant_scales(absmax: torch.Tensor, in_place: bool = False) -> torch.Tensor | None:
    """8-bit block scales → fp32: dequantize_blockwise, then + offset -- a second fp32 buffer in the forward
    kernel (`gemm_4bit`'s default implementation), in place in backward (`F.dequantize_4bit`, bitsandbytes 0.50)."""
    if absmax.dtype != torch.uint8:
        return None
    tmp = torch.empty(absmax.shape, dtype=torch.float32, device=absmax.device)
    if in_place:
        return tmp.add_(0.0)
    return tmp + 0.0


class SimLinear4bit(nn.Module):
    """Same storage as a bitsandbytes NF4 `Linear4bit`: packed uint8 weight + block absmax (+ double quant)."""

    def __init__(self, linear: nn.Module, compute_dtype: torch.dtype, blocksize: int = 64, double_quant: bool = True,
                 holds_input: bool = False):
        super().__init__()
        self.holds_input = holds_input  # bitsandbytes < 0.43.2 (config.quantization.bitsandbytes_version)
        out_f, in_f = _out_in(linear)
        n = out_f * in_f
        dev = linear.weight.device
        self.in_features, self.out_features = in_f, out_f
        self.compute_dtype = compute_dtype
        self.quant_dtype = linear.weight.dtype  # a QuantState's `dtype`: what dequantize_4bit gives back
        self.weight = nn.Parameter(torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=dev), requires_grad=False)
        self.weight.quant_shape = (out_f, in_f)
        blocks = math.ceil(n / blocksize)
        if double_quant:  # 8-bit absmax per block, fp32 absmax per 256 of those, the NF4 table (16 fp32), the
            # 8-bit table of the block scales (256 fp32) and their fp32 offset -- a bitsandbytes QuantState's tensors
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=dev))
            self.register_buffer("absmax2", torch.empty(math.ceil(blocks / 256), dtype=torch.float32, device=dev))
            self.register_buffer("code", torch.empty(16 + 256 + 1, dtype=torch.float32, device=dev))
        else:
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.float32, device=dev))
            self.register_buffer("code", torch.empty(16, dtype=torch.float32, device=dev))
        self.bias = linear.bias

    def forward(self, x):
        inp_dtype = x.dtype
        x = x.to(self.compute_dtype)
        out = _Dequant4bitMatmul.apply(x, self.weight, self.absmax, (self.out_features, self.in_features), self.compute_dtype,
                                       self.holds_input)
        if self.bias is not None:
            out = out + self.bias.to(self.compute_dtype)
        return out.to(inp_dtype)

    def dequantize(self) -> torch.Tensor:
        """What `bitsandbytes.functional.dequantize_4bit(weight, quant_state)` allocates: the block scales in place,
        then the whole weight in the QuantState's dtype (PEFT's DoRA calls it in every forward)."""
        _dequant_scales(self.absmax, in_place=True)
        return torch.empty((self.out_features, self.in_features), dtype=self.quant_dtype, device=self.weight.device)


def _dequantize_module_weight_with_standin(original):
    """PEFT's `dequantize_module_weight`, which knows bitsandbytes' own layers, also dequantizing the stand-in."""

    def dequantize_module_weight(module):
        if isinstance(module, (SimLinear4bit, SimLinear8bit)):
            return module.dequantize()
        return original(module)

    dequantize_module_weight.advisor_standin = True
    return dequantize_module_weight


def _teach_peft_the_standin() -> None:
    import peft.tuners.lora.dora as dora

    if not getattr(dora.dequantize_module_weight, "advisor_standin", False):
        dora.dequantize_module_weight = _dequantize_module_weight_with_standin(dora.dequantize_module_weight)


_teach_peft_the_standin()


# --------------------------------------------------------------------------- 8-bit stand-in (simulation)
class _Int8MatmulLt(torch.autograd.Function):
    """Mirrors bitsandbytes' `MatMul8bitLt` (LLM.int8(), the path CUDA trains with) for a frozen int8 weight:

    forward: the input cast to fp16 (a copy unless it is fp16), quantized per row to int8 with fp32 row scales (the
    CUDA quantizer also builds |x| in fp16 and the boolean outlier mask, `x.abs() >= threshold`, when the threshold is
    > 0), the int8 matmul's int32 output, dequantized to fp16 and cast to the input's dtype; the input is kept on
    `ctx` (MatMul8bitLt's `ctx.tensors`, not `save_for_backward`: see `_Dequant4bitMatmul`) until backward.
    backward: the whole weight dequantized to the input's dtype (`state.CB.to(dtype).mul_(SCB / 127)`), then one
    matmul. Outlier columns are data: fake tensors have none (a real model's few keep tokens × columns in 16-bit)."""

    @staticmethod
    def forward(ctx, x, weight, scb, bias, threshold):
        rows, cols = x.numel() // x.shape[-1], x.shape[-1]
        a = x.reshape(rows, cols)
        a16 = a.to(torch.float16)
        row_stats = torch.empty(rows, dtype=torch.float32, device=x.device)
        quantized = torch.empty(a.shape, dtype=torch.int8, device=x.device)
        if threshold > 0.0:
            outliers = a16.abs() >= threshold
            outliers.any()  # the one-element flag the kernel branches on
            del outliers
        outlier_cols = torch.empty(0, dtype=torch.int64, device=x.device)
        del a16
        sub_a = torch.empty(0, dtype=x.dtype, device=x.device)  # no outlier columns
        out_i32 = torch.empty((rows, weight.shape[0]), dtype=torch.int32, device=x.device)
        out16 = torch.empty((rows, weight.shape[0]), dtype=torch.float16, device=x.device)
        if bias is not None:
            out16.add_(bias)  # the dequantizer adds the bias in place (fused when it is fp16)
        out = out16.to(x.dtype)
        del out16, out_i32, quantized, row_stats, outlier_cols
        ctx.kept = (sub_a, a)
        ctx.weight, ctx.scb, ctx.dtype, ctx.shape = weight, scb, x.dtype, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        grad_bias = grad_out.sum(0, dtype=ctx.bias_dtype) if ctx.needs_input_grad[3] else None
        g = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        w = torch.empty(ctx.weight.shape, dtype=ctx.dtype, device=g.device)
        w.mul_(ctx.scb.unsqueeze(1).mul(1.0 / 127.0))
        grad = torch.matmul(g.to(ctx.dtype), w).view(ctx.shape)
        del w
        return grad, None, None, grad_bias, None


class SimLinear8bit(nn.Module):
    """Same storage as a bitsandbytes `Linear8bitLt` after loading: an int8 weight and one fp32 scale per output row
    (`Int8Params.SCB`), and its training matmul's allocations (`_Int8MatmulLt`)."""

    def __init__(self, linear: nn.Module, threshold: float):
        super().__init__()
        out_f, in_f = _out_in(linear)
        dev = linear.weight.device
        self.in_features, self.out_features = in_f, out_f
        self.threshold = float(threshold)
        self.weight = nn.Parameter(torch.empty((out_f, in_f), dtype=torch.int8, device=dev), requires_grad=False)
        self.register_buffer("SCB", torch.empty(out_f, dtype=torch.float32, device=dev))
        self.bias = linear.bias

    def forward(self, x):
        if self.bias is not None and self.bias.dtype != x.dtype:
            self.bias.data = self.bias.data.to(x.dtype)
        return _Int8MatmulLt.apply(x, self.weight, self.SCB, self.bias, self.threshold)

    def dequantize(self) -> torch.Tensor:
        """`bitsandbytes.functional.int8_vectorwise_dequant(weight, SCB)` (PEFT's DoRA, every forward)."""
        return int8_vectorwise_dequant(self.weight, self.SCB)


class SimLinearGPTQ(nn.Module):
    """Same storage as a GPTQ `QuantLinear` (gptqmodel's packing, int32 words): `qweight` [in·bits/32, out], `qzeros`
    [groups, out·bits/32], fp16 `scales` [groups, out], int32 `g_idx` [in]; and its training matmul as gptqmodel
    7.7's `TorchQuantLinear` runs it (read, not run here: it needs gptqmodel): the whole weight dequantized to the
    scales' dtype (one output: its dequantizer is compiled, or Triton's), cast to the input's dtype if that differs,
    then `torch.matmul(x, weight)`, which autograd keeps for the input's gradient (the layer's dequantized weight
    saved per adapted forward until backward). `qweight` is a frozen Parameter carrying `quant_shape`, so parameter
    counts and FLOPs see the layer's logical size, as the 4-bit stand-in's does."""

    def __init__(self, linear: nn.Module, bits: int, group_size: int):
        super().__init__()
        out_f, in_f = _out_in(linear)
        dev = linear.weight.device
        groups = 1 if group_size == -1 else math.ceil(in_f / group_size)
        self.in_features, self.out_features, self.bits, self.group_size = in_f, out_f, bits, group_size
        self.infeatures, self.outfeatures = in_f, out_f  # a GPTQ QuantLinear's names, which PEFT reads
        self.qweight = nn.Parameter(torch.empty((math.ceil(in_f * bits / 32), out_f), dtype=torch.int32, device=dev),
                                    requires_grad=False)
        self.qweight.quant_shape = (out_f, in_f)
        self.register_buffer("qzeros", torch.empty((groups, math.ceil(out_f * bits / 32)), dtype=torch.int32, device=dev))
        self.register_buffer("scales", torch.empty((groups, out_f), dtype=torch.float16, device=dev))
        self.register_buffer("g_idx", torch.empty(in_f, dtype=torch.int32, device=dev))
        self.bias = linear.bias

    def forward(self, x):
        out_shape = x.shape[:-1] + (self.out_features,)
        x = x.reshape(-1, x.shape[-1])
        weight = torch.empty((self.in_features, self.out_features), dtype=self.scales.dtype, device=x.device)
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        out = torch.matmul(x, weight).reshape(out_shape)
        del weight
        if self.bias is not None:
            out.add_(self.bias.to(out.dtype))
        return out


def quantize_meta_gptq(model: nn.Module, bits: int, group_size: int) -> int:
    """Swap every Linear a GPTQ checkpoint quantizes (transformers' GPTQ loader, like the bitsandbytes one, leaves the
    output head and embeddings unquantized) for the GPTQ stand-in."""
    swaps = _quantizable_linears(model)
    for parent, child_name, child in swaps:
        setattr(parent, child_name, SimLinearGPTQ(child, bits, group_size))
    model.quantization_method = "gptq"  # what PEFT's prepare_model_for_kbit_training reads (no fp32 upcast for GPTQ)
    return len(swaps)


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' default implementation, which CUDA runs too: int8 × the row scales (an fp32 product), × 1/127
    (the fp32 result). The stand-in's `dequantize`, and the real CPU run's count of the op (memory.simulate)."""
    return A * stats.view(-1, 1) * 7.874015718698502e-3


def quantize_meta_8bit(model: nn.Module, threshold: float) -> int:
    """Swap every Linear the 4-bit path would quantize for the 8-bit stand-in (what bnb's 8-bit loader converts)."""
    swaps = _quantizable_linears(model)
    for parent, child_name, child in swaps:
        setattr(parent, child_name, SimLinear8bit(child, threshold))
    model.is_loaded_in_8bit = True
    return len(swaps)


def _quantizable_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) of every layer transformers' bitsandbytes quantizer converts (`replace_with_bnb_linear`):
    plain `nn.Linear` and GPT-2's `Conv1D` (transposed), except the output head and the modules a model keeps in fp32
    (T5's `wo`), which stay unquantized in the load dtype -- upcast to fp32 only when that is fp16, as
    `from_pretrained`'s dtype plan does."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or []) + list(
        getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    swaps = []
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if not (type(child) is nn.Linear or isinstance(child, Conv1D)) or child is head:
                continue
            if any(k in full.split(".") for k in keep):
                if child.weight.dtype == torch.float16:
                    child.float()
                continue
            swaps.append((mod, child_name, child))
    return swaps


def _out_in(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear, or of a Conv1D (whose weight is stored transposed)."""
    if isinstance(layer, nn.Linear):
        return tuple(layer.weight.shape)
    return tuple(layer.weight.shape[::-1])


def quantize_meta_4bit(model: nn.Module, compute_dtype: torch.dtype, double_quant: bool, holds_input: bool = False) -> int:
    """Swap every Linear except the output head for the 4-bit stand-in (what bnb's loader quantizes)."""
    swaps = _quantizable_linears(model)
    for parent, child_name, child in swaps:
        setattr(parent, child_name, SimLinear4bit(child, compute_dtype, double_quant=double_quant, holds_input=holds_input))
    model.is_loaded_in_4bit = True
    return len(swaps)


# --------------------------------------------------------------------------- loading
def _auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM


def _attn(cfg: MethodConfig, on_meta: bool) -> str:
    impl = cfg.training.attn_implementation
    if on_meta and impl in ("sdpa", "flash_attention_2"):
        from advisor.memory.simattn import register_sim_sdpa

        return register_sim_sdpa()
    if impl == "flash_attention_2" and not torch.cuda.is_available():
        return "sdpa"
    return impl


def load_base_model(
    resolved,
    cfg: MethodConfig,
    *,
    on_meta: bool,
    random_init: bool = False,
    device: str | torch.device | None = None,
) -> nn.Module:
    """The base model for `cfg` on meta (simulation) or real tensors.

    `resolved` is an `advisor.catalog.models.ResolvedModel`. Real loads read weights from its local path or
    the Hub; `random_init=True` builds random weights from the config instead (probes, tests).
    """
    spec = get_method(cfg.method)
    dtype = DTYPES[cfg.training.torch_dtype]
    config = scaled_config(_copy_config(resolved.config), cfg.training)
    if cfg.training.gradient_checkpointing:
        config.use_cache = False  # transformers turns it off under checkpointing anyway (with a warning per run)
    auto = _auto_class(resolved.kind)
    attn = _attn(cfg, on_meta)
    if attn == "sim_sdpa" and not getattr(_model_class(auto, config), "_supports_attention_backend", False):
        # architectures that pick attention classes themselves (Falcon, BLOOM, T5) cannot use a registered one
        attn = cfg.training.attn_implementation if cfg.training.attn_implementation != "flash_attention_2" else "sdpa"
    if on_meta:
        with torch.device("meta"), _default_dtype(dtype), _plain_linear_layers(config.model_type, cfg):
            model = _from_config(auto, config, attn)
            _untie_if_requested(resolved, model)
        if spec.quantized:
            q = cfg.quantization
            if q.quant_method == "gptq":
                quantize_meta_gptq(model, q.bits, q.group_size)
            elif q.load_in_8bit:
                quantize_meta_8bit(model, q.llm_int8_threshold)
            else:
                quantize_meta_4bit(model, DTYPES[q.bnb_4bit_compute_dtype], q.bnb_4bit_use_double_quant,
                                   bnb_holds_4bit_input(q))
        return model
    source = resolved.path or resolved.id
    if spec.quantized and cfg.quantization.quant_method == "gptq":
        check_gptq_checkpoint(resolved, cfg.quantization)
        dev = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # the checkpoint's own quantization_config loads its QuantLinear layers (transformers + gptqmodel)
        return auto.from_pretrained(source, dtype=dtype, device_map={"": dev}, attn_implementation=attn,
                                    **({"config": config} if cfg.training.rope_scaling else {}))
    if spec.quantized:
        from transformers import BitsAndBytesConfig

        q = cfg.quantization
        if q.load_in_8bit:
            bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=q.llm_int8_threshold)
            quiet_int8_cast_warning()
        else:
            bnb = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=q.bnb_4bit_quant_type,
                bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
                bnb_4bit_compute_dtype=DTYPES[q.bnb_4bit_compute_dtype],
            )
        dev = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with _plain_linear_layers(config.model_type, cfg):
            return auto.from_pretrained(
                source, quantization_config=bnb, dtype=dtype, device_map={"": dev}, attn_implementation=attn,
                **({"config": config} if cfg.training.rope_scaling else {}),
            )
    if random_init:
        with _default_dtype(dtype):
            model = _from_config(auto, config, attn)
            _untie_if_requested(resolved, model)
    else:
        model = auto.from_pretrained(source, dtype=dtype, attn_implementation=attn,
                                     **({"config": config} if cfg.training.rope_scaling else {}))
    return model.to(device) if device is not None else model


# Linear subclasses that compute exactly what nn.Linear computes, which transformers 5's bitsandbytes integration
# (it replaces modules whose type is exactly nn.Linear) would leave 16-bit: built as nn.Linear under a bitsandbytes
# base, so they are quantized as transformers 4 (isinstance) did. Same parameter names, same state dict.
PLAIN_LINEAR_SUBCLASSES = {"falcon": ("transformers.models.falcon.modeling_falcon", "FalconLinear")}


def plain_linear_applies(model_type: str, cfg: MethodConfig) -> bool:
    q = cfg.quantization
    return model_type in PLAIN_LINEAR_SUBCLASSES and q is not None and q.quant_method != "gptq"


@contextlib.contextmanager
def _plain_linear_layers(model_type: str, cfg: MethodConfig):
    if not plain_linear_applies(model_type, cfg):
        yield
        return
    import importlib

    module_name, attr = PLAIN_LINEAR_SUBCLASSES[model_type]
    module = importlib.import_module(module_name)
    original = getattr(module, attr)
    setattr(module, attr, nn.Linear)
    try:
        yield
    finally:
        setattr(module, attr, original)


def check_gptq_checkpoint(resolved, q) -> None:
    """A GPTQ run trains an already-quantized checkpoint: its config.json must say GPTQ (with the bits asked for), and
    gptqmodel must be installed to load its layers. Anything else is a clear error naming the field."""
    from advisor.errors import AdvisorInputError

    qc = getattr(resolved.config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else (qc or {})
    if str(qc.get("quant_method", "")).lower() != "gptq":
        raise AdvisorInputError("config.quantization.quant_method",
                                f"{resolved.id} is not a GPTQ checkpoint (its config.json has no quantization_config "
                                "with quant_method 'gptq'): train a GPTQ-quantized model, or quantize with bitsandbytes",
                                allowed=["bitsandbytes"])
    if int(qc.get("bits", q.bits)) != q.bits:
        raise AdvisorInputError("config.quantization.bits", f"the checkpoint is {qc.get('bits')}-bit, not {q.bits}-bit",
                                allowed=[int(qc.get("bits"))])
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is None:
        raise AdvisorInputError("config.quantization.quant_method",
                                "training a GPTQ checkpoint needs gptqmodel (pip install gptqmodel optimum), which is "
                                "not installed here; estimates do not need it")


def quiet_int8_cast_warning() -> None:
    """bitsandbytes' MatMul8bitLt logs "inputs will be cast from bfloat16 to float16" on every call of every 8-bit
    layer (a bf16 model's every step): once is information, thousands of times per step buries the training log."""
    import logging

    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def scaled_config(config, training: TrainingConfig):
    """`config` with the training's RoPE scaling applied (in place): transformers' `rope_parameters` get the type and
    factor (yarn also the original positions) and max_position_embeddings grows by the factor."""
    rs = training.rope_scaling
    if rs is None:
        return config
    from advisor.errors import AdvisorInputError

    original = getattr(config, "max_position_embeddings", None)
    if original is None or not hasattr(config, "rope_parameters"):
        raise AdvisorInputError("config.training.rope_scaling",
                                f"{type(config).__name__} has no rotary position embeddings to scale")
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update(rope_type=rs.type, factor=float(rs.factor))
    if rs.type == "yarn":
        params["original_max_position_embeddings"] = int(original)
    config.rope_parameters = params
    config.max_position_embeddings = int(original * rs.factor)
    return config


def _model_class(auto, config):
    try:
        return auto._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return None


def _from_config(auto, config, attn: str) -> nn.Module:
    """Build from a config in the default dtype (set by the caller), which overrides the config's own dtype.

    Architectures without SDPA support fall back to eager attention.
    """
    dtype = torch.get_default_dtype()
    try:
        return auto.from_config(config, attn_implementation=attn, dtype=dtype)
    except (ValueError, ImportError) as err:
        if attn == "eager" or "attn" not in str(err).lower() and "attention" not in str(err).lower():
            raise
        return auto.from_config(config, attn_implementation="eager", dtype=dtype)


def _untie_if_requested(resolved, model) -> None:
    """T5 v1.1-style checkpoints keep a separate lm_head that transformers 5's config class would tie."""
    requested = getattr(resolved, "_untied_output_requested", None)
    if requested is not None and requested():
        from advisor.catalog.models import _untie_output_embeddings

        _untie_output_embeddings(model)


def _copy_config(config):
    """A private copy of the config. `use_cache` keeps the config's value, as `from_pretrained` does for a real
    run: without gradient checkpointing a causal LM then fills a KV cache during training forwards (the cache
    holds each layer's K/V; where attention saves other tensors than those -- LongLoRA's shifted groups, eager
    attention with grouped KV heads -- that is memory a real step holds), so the simulation does the same."""
    import copy

    return copy.deepcopy(config)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def prepare(
    model: nn.Module, resolved, cfg: MethodConfig, *, on_meta: bool, total_steps: int = 100
) -> Prepared:
    """Apply the method to a loaded base model; enable gradient checkpointing if the plan asks for it."""
    spec = get_method(cfg.method)
    ctx = BuildContext(
        kind=resolved.kind,
        model_type=resolved.config.model_type,
        on_meta=on_meta,
        training=cfg.training,
        total_steps=total_steps,
        quantization=cfg.quantization,
    )
    if resolved.kind not in spec.kinds:
        from advisor.errors import AdvisorInputError

        raise AdvisorInputError("method", f"{spec.id} does not apply to {resolved.kind} models", allowed=list(spec.kinds))
    if cfg.training.gradient_checkpointing:
        kwargs = {"use_reentrant": bool(cfg.training.gradient_checkpointing_reentrant)}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x's name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if not spec.full_weights:  # frozen embeddings: checkpointed blocks need an input that requires grad
            model.enable_input_require_grads()
    prepared = spec.build(model, dict(cfg.peft), ctx)
    from advisor import losses

    losses.install(prepared.model, resolved.kind, cfg.training.cross_entropy)
    if cfg.training.activation_offloading:
        from advisor import offload

        offload.install(prepared.model)
    if cfg.training.torch_compile:
        check_torch_compile(cfg.training, spec.id)
        backend = compile_blocks(prepared.model, "aot_eager_decomp_partition" if on_meta else None)
        if cfg.training.cross_entropy != "fused_linear":  # the fused loss computes its gradients in forward itself
            compile_loss(prepared.model, backend)
    prepared.model.train()
    return prepared


# --------------------------------------------------------------------------- optimizer and step
def make_optimizer(prepared: Prepared, training: TrainingConfig) -> torch.optim.Optimizer:
    if training.optim == "lorafa":  # PEFT's LoRA-FA: AdamW on B with its gradient projected through A
        from peft.optimizers import create_lorafa_optimizer

        return create_lorafa_optimizer(prepared.model, r=int(prepared.peft["r"]),
                                       lora_alpha=prepared.peft["lora_alpha"], lr=training.learning_rate,
                                       weight_decay=training.weight_decay)
    groups = prepared.optimizer_params or [{"params": prepared.trainable_parameters()}]
    if training.optimizer_in_backward:
        check_optimizer_in_backward(training, prepared.method)
        return InBackwardOptimizer(lambda g: _optimizer(g, training), groups)
    return _optimizer(groups, training)


def _optimizer(groups: list[dict], training: TrainingConfig) -> torch.optim.Optimizer:
    lr, wd = training.learning_rate, training.weight_decay
    name = training.optim
    if name.startswith("galore_"):
        from galore_torch import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

        cls = {"galore_adamw": GaLoreAdamW, "galore_adamw_8bit": GaLoreAdamW8bit, "galore_adafactor": GaLoreAdafactor}[name]
        if cls is GaLoreAdafactor:
            return cls(groups, lr=lr, weight_decay=wd, relative_step=False, scale_parameter=False)
        return cls(groups, lr=lr, weight_decay=wd)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd, fused=True)
    if name == "adamw_torch":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=wd, momentum=0.9)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, weight_decay=wd, relative_step=False, scale_parameter=False)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "lion_8bit": bnb.optim.Lion8bit,
           "lion_32bit": bnb.optim.Lion32bit, "paged_lion_8bit": bnb.optim.PagedLion8bit,
           "paged_lion_32bit": bnb.optim.PagedLion32bit}[name]
    return cls(groups, lr=lr, weight_decay=wd)


def check_torch_compile(training: TrainingConfig, method: str) -> None:
    if training.torch_compile and method == "adalora":
        from advisor.errors import AdvisorInputError

        raise AdvisorInputError("config.training.torch_compile",
                                "AdaLoRA reallocates its ranks (data-dependent masks) as it trains: its compiled "
                                "graphs change with them", allowed=["false"])


def compile_blocks(model: nn.Module, backend: str | None = None) -> str:
    """torch.compile each transformer block (torchtune's per-layer compile); returns the backend. Default: inductor
    where the blocks are on CUDA, else aot_eager_decomp_partition, which partitions saved activations exactly as
    inductor does (AOTAutograd's min-cut, inductor's decompositions) without generating code: what the simulation
    runs, and what a CPU run needs no C++ compiler for. Dynamo's caches are reset first: every run compiles its own
    shapes (no recompilation limit reached across the many runs of one process)."""
    from advisor.memory.counter import _blocks

    blocks = _blocks(model)
    if backend is None:
        first = next((p for b in blocks for p in b.parameters()), None)
        backend = "inductor" if first is not None and first.device.type == "cuda" else "aot_eager_decomp_partition"
    torch._dynamo.reset()
    # each block compiles its own graph (its parameters are guarded): past dynamo's default of 8, the rest would run
    # eager, silently
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 2 * len(blocks) + 8)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * len(blocks) + 64)
    for block in blocks:
        block.compile(backend=backend)
    return backend


def compile_loss(model: nn.Module, backend: str) -> None:
    """torch.compile the model's loss (transformers' loss_function, or the chunked loss advisor.losses installed), as
    torchtune compiles its loss and the Trainer's whole-model compile does: the partitioner saves the logits the
    loss gets and their log-sum-exp, not an fp32 log-softmax per logit, and recomputes the softmax in backward."""
    from advisor.losses import _base, chunk_cross_entropy, set_chunk_loss

    # torchtune compiles its chunked loss's per-slice cross-entropy (`compute_cross_entropy`), not the output
    # projection: each slice's graph saves that slice's logits and log-sum-exp, and its backward is its own
    if set_chunk_loss(model, torch.compile(chunk_cross_entropy, backend=backend)):
        return
    base = _base(model)
    if getattr(base, "loss_function", None) is None:
        return
    base.loss_function = torch.compile(base.loss_function, backend=backend)


def check_optimizer_in_backward(training: TrainingConfig, method: str, devices: int = 1) -> None:
    """What the optimizer step in backward cannot be combined with, each refused naming its field."""
    if not training.optimizer_in_backward:
        return
    from advisor.errors import AdvisorInputError

    why = "each parameter is updated as soon as its gradient is complete"
    if training.gradient_accumulation_steps != 1:
        raise AdvisorInputError("config.training.gradient_accumulation_steps",
                                f"must be 1 with optimizer_in_backward: {why} (no gradients are kept to "
                                f"accumulate); got {training.gradient_accumulation_steps}", allowed=["1"])
    if training.max_grad_norm:
        raise AdvisorInputError("config.training.max_grad_norm",
                                f"must be 0 with optimizer_in_backward: {why}, and clipping needs the norm of all "
                                f"gradients at once; got {training.max_grad_norm:g}", allowed=["0"])
    if training.fp16:
        raise AdvisorInputError("config.training.fp16", f"fp16 loss scaling cannot be used with optimizer_in_backward: "
                                f"{why}, and the scaler unscales and skips whole steps; use bf16", allowed=["false"])
    if method == "adalora":
        raise AdvisorInputError("config.training.optimizer_in_backward",
                                "AdaLoRA reads every gradient after backward to reallocate its ranks",
                                allowed=["false"])
    if devices > 1:
        raise AdvisorInputError("config.training.optimizer_in_backward",
                                f"one GPU only: data-parallel replicas must average gradients before any update "
                                f"(hardware.count is {devices})", allowed=["false"])


class InBackwardOptimizer(torch.optim.Optimizer):
    """The optimizer step fused into backward (torchtune's `optimizer_in_bwd`, PyTorch's
    `_apply_optimizer_in_backward`): one optimizer per parameter, stepped by a post-accumulate-grad hook the moment
    that parameter's gradient is complete, which then frees it, so the whole model's gradients never exist at once.

    `step()` and `zero_grad()` are no-ops; `param_groups` are the per-parameter optimizers' own dicts (an LR
    scheduler changes them in place) and `state` their states; the state dict holds each optimizer's."""

    def __init__(self, make, groups: list[dict]):
        self._optimizers: list[torch.optim.Optimizer] = []
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                opt = make([{**options, "params": [p]}])
                self._optimizers.append(opt)
                p.register_post_accumulate_grad_hook(self._stepper(opt))
        self.defaults = dict(self._optimizers[0].defaults) if self._optimizers else {}

    @property
    def param_groups(self) -> list[dict]:
        # read each time: an optimizer's load_state_dict (accelerate's prepare, a resume) replaces its group dicts
        return [g for opt in self._optimizers for g in opt.param_groups]

    @staticmethod
    def _stepper(opt: torch.optim.Optimizer):
        def hook(_param) -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return hook

    @property
    def state(self) -> dict:
        merged: dict = {}
        for opt in self._optimizers:
            merged.update(opt.state)
        return merged

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict:
        return {"optimizer_in_backward": [opt.state_dict() for opt in self._optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict["optimizer_in_backward"]
        if len(states) != len(self._optimizers):
            raise ValueError(f"checkpoint has {len(states)} per-parameter optimizers, this model {len(self._optimizers)}")
        for opt, st in zip(self._optimizers, states):
            opt.load_state_dict(st)


def autocast_context(training: TrainingConfig, device_type: str):
    if training.bf16 and training.torch_dtype != "bfloat16" or training.fp16 and training.torch_dtype != "float16":
        return torch.autocast(device_type, dtype=torch.bfloat16 if training.bf16 else torch.float16)
    return contextlib.nullcontext()


@dataclass
class StepResult:
    loss: float | None


def train_step(
    prepared: Prepared,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    training: TrainingConfig,
    step: int,
    counter=None,
    compute_loss_value: bool = True,
) -> StepResult:
    """forward → backward → optimizer step → method hook → zero_grad, phases tagged for the counter.

    Autocast is used only when the weights are stored in a wider dtype than the compute dtype (mixed precision);
    weights loaded in bf16/fp16 compute in that dtype directly, as transformers' Trainer does.
    """
    phase = counter.phase if counter is not None else (lambda _name: contextlib.nullcontext())
    device_type = next(iter(batch.values())).device.type
    with phase("forward"), autocast_context(training, device_type), training_forward(prepared.model):
        out = prepared.model(**batch, **prepared.forward_kwargs)
        loss = out.loss
        extra = prepared.extra_loss() if prepared.extra_loss else None
        if extra is not None:
            loss = loss + extra
        del out
    with phase("backward"):
        loss.backward()
    with phase("optimizer"):
        if training.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(prepared.trainable_parameters(), training.max_grad_norm)
        optimizer.step()
        if prepared.after_optimizer_step is not None:
            prepared.after_optimizer_step(step)
        optimizer.zero_grad(set_to_none=True)
    value = float(loss.detach()) if compute_loss_value and not _is_fake(loss) and loss.device.type != "meta" else None
    return StepResult(loss=value)


@contextlib.contextmanager
def training_forward(model: nn.Module):
    """The forward of a training step: the installed loss (chunked / fused cross-entropy) and activation
    offloading, where the config asked for them."""
    from advisor.offload import offloading

    with computing_loss(model), offloading(model):
        yield


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"


def make_batch(
    kind: str, batch_size: int, seq_len: int, vocab_size: int, *, device="cpu", generator=None, fake=False,
    target_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """A training batch of the given shape: random ids (real) or empty tensors (fake/meta). Seq2seq models build
    their decoder inputs by shifting the labels, so `labels` is the decoder's length: `target_len` (default
    `seq_len`); a causal LM's labels are its inputs."""
    shape = (batch_size, seq_len)
    target = (batch_size, target_len or seq_len) if kind == "seq2seq" else shape
    if fake:
        ids = torch.empty(shape, dtype=torch.long, device=device)
        labels = torch.empty(target, dtype=torch.long, device=device)
    else:
        ids = torch.randint(4, vocab_size, shape, generator=generator, device=device)
        labels = ids.clone() if target == shape else torch.randint(4, vocab_size, target, generator=generator,
                                                                     device=device)
    return {"input_ids": ids, "labels": labels}
