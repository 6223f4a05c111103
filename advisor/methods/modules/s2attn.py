"""Shifted sparse attention (S²-Attn) from LongLoRA (Chen et al. 2023, arXiv 2309.12307).

During fine-tuning the sequence of length ``N`` is split into groups of ``G = int(N * group_size_ratio)`` tokens and
causal attention is computed only inside each group. In half of the heads the tokens are first shifted by ``-G/2``
(``torch.roll`` along the sequence), so those heads' groups straddle the other half's group boundaries and
information flows between groups. Outputs of the shifted heads are rolled back by ``+G/2``. At inference the model
uses ordinary full causal attention (the paper's train-short-attention / test-full-attention recipe).

This is the paper's Algorithm 1: the last group of the shifted heads contains the final ``G/2`` tokens followed by the
first ``G/2`` tokens, so, under the within-group causal mask, the first ``G/2`` tokens can see the last ones (the
well-known wrap-around of the reference implementation). ``mask_wraparound=True`` in :func:`enable_s2attn` removes
that leak with an explicit block mask on the shifted heads (at the cost of not using a flash kernel for them).

The shifted path is taken only when **all** of these hold, otherwise the call falls back to transformers'
``sdpa_attention_forward`` unchanged (full causal attention):

* ``module.training`` is true;
* ``attention_mask is None``, i.e. no padding. With the ``"s2attn"`` mask function registered as ``sdpa_mask``,
  transformers returns ``None`` for an all-ones 2D padding mask and a 4D mask when there is real padding (or a
  cache offset, packed sequences, ...); grouping such masks is not supported, so they fall back;
* the attention is causal (``is_causal`` kwarg or ``module.is_causal``), without ``position_bias``;
* query and key have the same length ``N`` (no KV cache prefix);
* ``G >= 2``, ``N % G == 0`` and ``N >= 2 * G`` (at least two groups).

All conditions depend on shapes and flags only, never on tensor values, so the function is meta/fake-tensor safe.
``S2_CALLS["shifted"]`` / ``S2_CALLS["full"]`` count the calls that took each path.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

DEFAULT_GROUP_SIZE_RATIO = 0.25
S2_CALLS: Counter = Counter()


def _grouped_causal(q, k, v, group_size, dropout, scaling, mask=None):
    """Causal attention restricted to consecutive groups of ``group_size`` tokens; (b, h, n, d) -> (b, h, n, dv)."""
    b, h, n, _ = q.shape
    g = n // group_size
    q, k, v = (t.reshape(b, h * g, group_size, t.shape[-1]) for t in (q, k, v))
    if mask is not None:  # (g, G, G) per-group mask -> (h * g, G, G), matching the head-major batch layout
        mask = mask.repeat(h, 1, 1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None
    )
    return out.reshape(b, h, n, out.shape[-1])


def _wraparound_mask(n: int, group_size: int, device) -> torch.Tensor:
    """(n_groups, G, G) causal mask that also separates the wrapped-around tokens of the last shifted group."""
    shift = group_size // 2
    pos = torch.arange(group_size, device=device)
    causal = pos[:, None] >= pos[None, :]
    tail = pos >= group_size - shift  # tokens rolled in from the start of the sequence
    last = causal & (tail[:, None] == tail[None, :])
    mask = causal.expand(n // group_size, group_size, group_size).clone()
    mask[-1] = last
    return mask


def s2_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """S²-Attn with the transformers attention-interface contract.

    ``query``: (batch, heads, seq, head_dim); ``key``/``value``: (batch, kv_heads, seq, head_dim).
    Returns ``(attn_output, None)`` with ``attn_output`` shaped (batch, seq, heads, head_dim), like
    ``sdpa_attention_forward``. See the module docstring for when the shifted path is used.
    """
    n = query.shape[2]
    config = getattr(module, "config", None)
    ratio = getattr(config, "s2attn_group_size_ratio", DEFAULT_GROUP_SIZE_RATIO)
    group_size = int(n * ratio)
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    use_shift = (
        module.training
        and attention_mask is None
        and is_causal
        and kwargs.get("position_bias") is None
        and key.shape[2] == n
        and group_size >= 2
        and n % group_size == 0
        and n >= 2 * group_size
    )
    if not use_shift:
        S2_CALLS["full"] += 1
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    S2_CALLS["shifted"] += 1
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    half, shift = query.shape[1] // 2, group_size // 2
    plain = _grouped_causal(query[:, :half], key[:, :half], value[:, :half], group_size, dropout, scaling)
    q_s, k_s, v_s = (t[:, half:].roll(-shift, dims=2) for t in (query, key, value))
    mask = _wraparound_mask(n, group_size, query.device) if getattr(config, "s2attn_mask_wraparound", False) else None
    shifted = _grouped_causal(q_s, k_s, v_s, group_size, dropout, scaling, mask).roll(shift, dims=2)
    out = torch.cat([plain, shifted], dim=1)
    return out.transpose(1, 2).contiguous(), None


def register_s2attn(name: str = "s2attn") -> str:
    """Register :func:`s2_attention_forward` under ``name`` (idempotent).

    The mask function must be registered too: ``create_causal_mask`` returns ``None`` for any
    ``_attn_implementation`` missing from ``AttentionMaskInterface``, which would silently drop padding masks.
    """
    AttentionInterface.register(name, s2_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _configs(model: nn.Module):
    seen = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen:
            seen[id(config)] = config
    return seen.values()


def enable_s2attn(
    model: nn.Module, group_size_ratio: float = DEFAULT_GROUP_SIZE_RATIO, mask_wraparound: bool = False
) -> nn.Module:
    """Switch a transformers model to S²-Attn: registers it, stores the ratio on the config(s), and sets the
    attention implementation to ``"s2attn"`` via ``model.set_attn_implementation``.

    ``group_size_ratio`` must be in (0, 1]; ratios above 0.5 never leave two groups, so they always fall back
    to full attention."""
    if not 0 < group_size_ratio <= 1:
        raise ValueError(f"group_size_ratio must be in (0, 1], got {group_size_ratio}")
    name = register_s2attn()
    for config in _configs(model):
        config.s2attn_group_size_ratio = group_size_ratio
        config.s2attn_mask_wraparound = mask_wraparound
    model.set_attn_implementation(name)
    return model


def disable_s2attn(model: nn.Module) -> nn.Module:
    """Switch back to plain ``"sdpa"`` attention."""
    model.set_attn_implementation("sdpa")
    return model
