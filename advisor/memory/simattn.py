"""Attention for simulation: SDPA without a materialised mask.

On real tensors with an all-ones attention mask transformers proves there is no padding and calls SDPA with
`attn_mask=None, is_causal=True`. Under fake tensors that proof is data-dependent, so it would build a 4-D
mask (and copy K/V for GQA) that a real run never allocates. This registered implementation skips the mask
and otherwise *is* transformers' SDPA path, so a fake step allocates exactly what a real one does.
"""

from __future__ import annotations

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
