"""Attention for simulation: SDPA without a materialised mask.

On real tensors with an all-ones attention mask transformers proves there is no padding and calls SDPA with
`attn_mask=None, is_causal=True`. Under fake tensors that proof is data-dependent, so it would build a 4-D
mask (and copy K/V for GQA) that a real run never allocates. This registered implementation skips the mask
and otherwise *is* transformers' SDPA path, so a fake step allocates exactly what a real one does.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SIM_SDPA = "sim_sdpa"


def sim_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def register_sim_sdpa() -> str:
    if SIM_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(SIM_SDPA, sim_sdpa_forward)
    return SIM_SDPA
