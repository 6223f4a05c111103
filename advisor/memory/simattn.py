"""Attention for simulation: SDPA without a materialised mask.

On real tensors with an all-ones attention mask transformers proves there is no padding and calls SDPA with
`attn_mask=None, is_causal=True`. Under fake tensors that proof is data-dependent, so it would build a 4-D
mask (and copy K/V for GQA) that a real run never allocates. This registered implementation skips the mask
and otherwise *is* transformers' SDPA path, so a fake step allocates exactly what a real one does.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SIM_SDPA = "sim_sdpa"


def sim_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    if attention_mask is not None and key.shape[-2] != query.shape[-2]:
        # keys longer than queries (prefix tuning's virtual tokens, past key values): a real run has a mask here
        # on every device (without one, SDPA's causal alignment would drop the prefix), so keep it; the kernel
        # then sees the same inputs (mask, GQA K/V expanded by repeat_kv) as on real tensors
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def sim_sdpa_mask(*args, **kwargs):
    """transformers' `sdpa_mask`, deciding "no mask needed" as it does on real tensors: a causal batch without
    padding (no 2-D mask given) whose queries and keys have the same length runs SDPA with `is_causal=True`.
    On fake tensors `sdpa_mask` cannot prove that (its offsets are tensors under tracing) and would build a 4-D
    mask a real run never allocates -- and attention implementations that require `mask is None` (LongLoRA's
    S2-Attn) would fall back to full attention."""
    # the simulated batch is never padded nor packed (advisor.engine.make_batch); on fake tensors transformers'
    # packed-sequence detection cannot read the position ids and switches `allow_is_causal_skip` off, so it is
    # not consulted here
    q_length, kv_length = kwargs.get("q_length"), kwargs.get("kv_length")
    if (kwargs.get("attention_mask") is None and q_length is not None and q_length == kv_length
            and kwargs.get("local_size") is None):
        return None
    return sdpa_mask(*args, **kwargs)


def use_sim_masks(model) -> None:
    """In a simulation, give every SDPA-based attention implementation the model uses (LongLoRA's "s2attn")
    the real-tensor mask decision of `sim_sdpa_mask`. Registration is global and looked up per call; methods
    register their own mask function again when they build a real model."""
    impls = {getattr(m.config, "_attn_implementation", None) for m in model.modules() if hasattr(m, "config")}
    for impl in impls:
        if impl and AttentionMaskInterface._global_mapping.get(impl) is sdpa_mask and impl != "sdpa":
            AttentionMaskInterface.register(impl, sim_sdpa_mask)


def register_sim_sdpa() -> str:
    if SIM_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(SIM_SDPA, sim_sdpa_forward)
    if SIM_SDPA not in AttentionMaskInterface._global_mapping:
        # the masks SDPA gets: None for a plain causal batch without padding (what make_batch gives), a 4-D
        # boolean mask when keys outnumber queries (prefix tuning) -- as transformers builds them for "sdpa"
        AttentionMaskInterface.register(SIM_SDPA, sim_sdpa_mask)
    return SIM_SDPA


# --------------------------------------------------------------------------- device semantics
class CudaSemantics(torch.overrides.TorchFunctionMode):
    """What a CUDA device saves where the CPU kernels the simulation runs on save something else.

    Measured on an H100 against the same steps on CPU (bench/results/cuda_vs_cpu_saved.json, 2026-11-22):

    * **dropout** — CUDA runs the fused `native_dropout` and keeps a 1-byte boolean mask for backward; the CPU
      path multiplies by a noise tensor of the input's dtype and keeps that (4 bytes per element for PEFT's fp32
      adapter inputs, 2 for bf16). Here every training-mode `F.dropout` becomes `native_dropout`.
    * **attention dropout** — CUDA's flash / memory-efficient SDPA kernels apply dropout inside the kernel and
      save output and log-sum-exp as without it (plus two RNG scalars); on CPU, `dropout_p > 0` falls back to the
      math path, which materialises the attention probabilities. Here SDPA runs with `dropout_p=0`, which takes
      the CPU flash kernel: the same saved tensors as CUDA's.

    Real CPU runs under this mode allocate what the simulation counts (tests/test_memory.py); GPT-2 (attention
    dropout 0.1) measured 397 MB on the H100 where the CPU path needs 714 MB.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            return _native_dropout(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            if len(args) > 4:
                args = (*args[:4], 0.0, *args[5:])
            elif kwargs.get("dropout_p"):
                kwargs = {**kwargs, "dropout_p": 0.0}
        return func(*args, **kwargs)


def _native_dropout(input, p: float = 0.5, training: bool = True, inplace: bool = False):
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if p == 1.0 or inplace:  # CUDA's fused kernel is not used for these either
        return F.dropout(input, p, training, inplace)
    return torch.native_dropout(input, p, True)[0]


@contextlib.contextmanager
def semantics(target: str, model: torch.nn.Module | None = None):
    """The context a simulation (or a CPU run standing in for one) of a `target` device runs under.

    For "cuda", `model`'s checkpointed blocks also recompute under `CudaSemantics` (through checkpoint's
    `context_fn`): the autograd engine runs the recomputation outside any function mode, and a recomputed block
    must save what its first forward saved."""
    if target == "cpu":
        yield
        return
    if target != "cuda":
        raise ValueError(f"unknown simulation target {target!r}; allowed: cpu, cuda")
    patched = []
    modules = list(model.modules()) if model is not None else []
    # compiled blocks (config.training.torch_compile) recompute their compiled graphs, whose decompositions replace
    # the eager kernels these semantics describe (and checkpoint under torch.compile takes dispatch modes only)
    compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in modules)
    for module in modules if not compiled else ():
        fn = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(fn, functools.partial):
            if fn.keywords.get("use_reentrant"):  # no context_fn there: the block itself enters the semantics
                module._gradient_checkpointing_func = functools.partial(_checkpoint_under_semantics, fn)
            else:
                module._gradient_checkpointing_func = functools.partial(fn, context_fn=_recompute_contexts)
            patched.append((module, fn))
    try:
        with CudaSemantics():
            yield
    finally:
        for module, fn in patched:
            module._gradient_checkpointing_func = fn


def _recompute_contexts():
    return contextlib.nullcontext(), CudaSemantics()


def _checkpoint_under_semantics(checkpoint, function, *args, **kwargs):
    """Reentrant checkpointing (config.training.gradient_checkpointing_reentrant) recomputes `function` inside
    autograd's backward, outside any mode: run it under `CudaSemantics` there, and as it is in the first forward."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    def run(*a, **k):
        if any(isinstance(m, CudaSemantics) for m in _get_current_dispatch_mode_stack()):
            return function(*a, **k)
        with CudaSemantics():
            return function(*a, **k)

    return checkpoint(run, *args, **kwargs)
