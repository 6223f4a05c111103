"""Bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751; Pfeiffer et al. 2020, arXiv 2005.00247).

A bottleneck adapter is a small residual MLP ``x + up(act(down(x)))`` inserted after a transformer sub-layer.
``up`` is zero-initialised, so at init every adapter is the identity and the wrapped model computes exactly
what the base model computes.

Placements:

* ``"pfeiffer"``: one adapter per block, on the output of the feed-forward sub-layer.
* ``"houlsby"``: additionally one adapter on the output of the self-attention output projection.

Both are inserted *before* the block's residual addition (the adapter sees the sub-layer output), as in
Houlsby et al. Blocks are found generically by class name (``*DecoderLayer``, ``*EncoderLayer``, ``*Block``),
then the feed-forward / attention-output submodules by name inside each block:

================  ====================  ======================
family            feed-forward          attention output
================  ====================  ======================
Llama-like        ``mlp``               ``self_attn.o_proj``
GPT-2             ``mlp``               ``attn.c_proj``
T5 (enc + dec)    ``DenseReluDense``    ``SelfAttention.o``
================  ====================  ======================

T5 cross-attention is left alone. Wrapping nests the original submodule under ``.inner``, so base state-dict
keys gain an ``inner.`` segment; save adapters with ``{k: v for k, v in sd.items() if ".adapter." in k}``.
Nothing is frozen here: the caller freezes the base model.
"""

from __future__ import annotations

import torch
from torch import nn

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
_BLOCK_SUFFIXES = ("DecoderLayer", "EncoderLayer", "Block")
_FFN_NAMES = ("mlp", "DenseReluDense", "feed_forward")
_ATTN_OUT_NAMES = ("self_attn.o_proj", "attn.c_proj", "SelfAttention.o")


class BottleneckAdapter(nn.Module):
    """Residual bottleneck ``x + up(dropout(act(down(x))))`` with ``up`` zero-initialised (identity at init)."""

    def __init__(
        self,
        hidden_size: int,
        reduction_factor: int = 16,
        non_linearity: str = "gelu",
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if non_linearity not in _ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {sorted(_ACTIVATIONS)}, got {non_linearity!r}")
        bottleneck = max(1, hidden_size // reduction_factor)
        self.down = nn.Linear(hidden_size, bottleneck, device=device, dtype=dtype)
        self.act = _ACTIVATIONS[non_linearity]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, hidden_size, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.dropout(self.act(self.down(x))))


class AdapterWrapped(nn.Module):
    """Runs ``inner`` and applies ``adapter`` to its output (to the first element if it returns a tuple)."""

    def __init__(self, inner: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.inner = inner
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


def _hidden_size(config) -> int:
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError("cannot infer the hidden size: config has none of hidden_size / n_embd / d_model")


def _find(block: nn.Module, candidates: tuple[str, ...]) -> str | None:
    """Relative name of the first submodule of ``block`` whose dotted name ends with one of ``candidates``."""
    for name, _ in block.named_modules():
        if any(name == c or name.endswith("." + c) for c in candidates):
            return name
    return None


def _param_like(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def add_bottleneck_adapters(
    model: nn.Module,
    reduction_factor: int = 16,
    placement: str = "pfeiffer",
    non_linearity: str = "gelu",
    dropout: float = 0.0,
) -> list[str]:
    """Insert bottleneck adapters into every transformer block of ``model``; return the adapters' module names.

    Adapters are created on the device and in the dtype of the submodule they wrap (meta-device safe).
    Raises ``ValueError`` if no transformer block with a recognised feed-forward submodule is found.
    """
    if placement not in ("pfeiffer", "houlsby"):
        raise ValueError(f"placement must be 'pfeiffer' or 'houlsby', got {placement!r}")
    hidden = _hidden_size(model.config)
    targets = _FFN_NAMES, *((_ATTN_OUT_NAMES,) if placement == "houlsby" else ())

    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith(_BLOCK_SUFFIXES) and not any(
            name.startswith(b + ".") for b, _ in blocks
        ):
            blocks.append((name, module))

    added: list[str] = []
    for block_name, block in blocks:
        for candidates in targets:
            rel = _find(block, candidates)
            if rel is None:
                continue
            parent_name, _, child = rel.rpartition(".")
            parent = block.get_submodule(parent_name)
            inner = getattr(parent, child)
            ref = _param_like(inner)
            adapter = BottleneckAdapter(hidden, reduction_factor, non_linearity, dropout, ref.device, ref.dtype)
            setattr(parent, child, AdapterWrapped(inner, adapter))
            added.append(f"{block_name}.{rel}.adapter")
    if not added:
        names = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            "add_bottleneck_adapters: no transformer block found (looked for classes ending with "
            f"{_BLOCK_SUFFIXES} containing one of {_FFN_NAMES}); module classes present: {names}"
        )
    return added
