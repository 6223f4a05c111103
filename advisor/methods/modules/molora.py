"""Token-routed mixture of LoRA experts (MoLoRA: Zadouri et al. 2023, arXiv 2309.05444; MixLoRA: Li et al. 2024,
arXiv 2404.15159).

Each wrapped linear layer keeps its frozen base weight and gains ``E`` LoRA experts plus a router::

    y = base(x) + (alpha / r) * sum_{e in topk(router(x))} g_e(x) * (dropout(x) A_e) B_e

with ``g`` the softmax over the top-k router logits of each token. All experts are evaluated densely with two
einsums and combined by a gate tensor that is zero outside the top-k (built with ``scatter``); this has no
data-dependent control flow, so it runs on meta/fake tensors. For small ``r`` the dense compute is cheap compared
with the base matmul.

Load balancing: in training mode each layer stores a Switch-Transformer auxiliary loss (Fedus et al. 2021)
``E * sum_e f_e * P_e`` in ``self.aux_loss``, where ``f_e`` is the fraction of top-k assignments routed to expert
``e`` (normalised by ``k``, so perfect balance gives 1.0) and ``P_e`` the mean router probability. All tokens
(padding included) are counted. The trainer adds ``coef * molora_aux_loss(model)`` (e.g. coef 0.01) to the LM loss.
In eval mode ``aux_loss`` is ``None``.

Merging is not supported: the expert mixture depends on each token, so it cannot be folded into a dense weight.
The wrapper freezes only the base layer it wraps; the caller freezes the rest of the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _is_linear(m: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), which is a linear layer with a transposed weight."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def linear_features(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    in_f, out_f = m.weight.shape  # Conv1D stores (in, out)
    return int(in_f), int(out_f)


class MoLoRALinear(nn.Module):
    """Frozen ``nn.Linear`` plus a top-k routed mixture of LoRA experts (see module docstring)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int = 4,
        top_k: int = 2,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.base_layer = base_layer.requires_grad_(False)
        self.num_experts, self.top_k, self.r = num_experts, top_k, r
        self.scaling = alpha / r
        in_f, out_f = linear_features(base_layer)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.router = nn.Linear(in_f, num_experts, bias=False, **factory)
        self.lora_A = nn.Parameter(torch.empty(num_experts, in_f, r, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, r, out_f, **factory))
        self.dropout = nn.Dropout(dropout)
        self.aux_loss: torch.Tensor | None = None
        # Same distribution as LoRA's A (kaiming_uniform_(a=sqrt(5)) on an (r, in) weight): U(-1/sqrt(in), 1/sqrt(in))
        bound = 1 / math.sqrt(in_f)
        nn.init.uniform_(self.lora_A, -bound, bound)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (dense gates (..., E) zero outside top-k, router probabilities (..., E) fp32, top-k indices)."""
        logits = self.router(x)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        top_gates = top_logits.float().softmax(-1).to(logits.dtype)
        gates = torch.zeros_like(logits).scatter(-1, top_idx, top_gates)
        return gates, logits.float().softmax(-1), top_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates, probs, top_idx = self.route(x)
        if self.training:
            probs = probs.reshape(-1, self.num_experts)
            dispatch = torch.zeros_like(probs).scatter(-1, top_idx.reshape(-1, self.top_k), 1.0)
            f = dispatch.mean(0) / self.top_k
            self.aux_loss = self.num_experts * (f * probs.mean(0)).sum()
        else:
            self.aux_loss = None
        h = torch.einsum("...i,eir->...er", self.dropout(x), self.lora_A)  # (..., E, r)
        delta = torch.einsum("...er,ero->...o", h * gates.unsqueeze(-1), self.lora_B)  # gate, then sum experts
        return self.base_layer(x) + self.scaling * delta

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, r={self.r}, scaling={self.scaling}"


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_molora(
    model: nn.Module,
    target_modules: tuple[str, ...] | list[str] = ("q_proj", "v_proj"),
    num_experts: int = 4,
    top_k: int = 2,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
) -> list[str]:
    """Replace every ``nn.Linear`` whose dotted name ends with one of ``target_modules`` by a
    :class:`MoLoRALinear`; return the replaced module names. Raises ``ValueError`` if nothing matches."""
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    target_modules = tuple(target_modules)
    wrapped = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, MoLoRALinear))
    linears = [  # skip layers inside existing MoLoRA wrappers (their base layer and router)
        (name, m) for name, m in model.named_modules() if _is_linear(m) and not name.startswith(wrapped)
    ]
    chosen = [(name, m) for name, m in linears if name and _matches(name, target_modules)]
    if not chosen:
        available = sorted({name.rpartition(".")[2] for name, _ in linears})
        raise ValueError(f"apply_molora: no nn.Linear matches {list(target_modules)}; available: {available}")
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, MoLoRALinear(linear, num_experts, top_k, r, alpha, dropout))
    return [name for name, _ in chosen]


def molora_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the load-balancing losses stored by the last training-mode forward of every MoLoRA layer."""
    layers = [m for m in model.modules() if isinstance(m, MoLoRALinear)]
    losses = [m.aux_loss for m in layers if m.aux_loss is not None]
    if losses:
        return torch.stack(losses).sum()
    device = layers[0].lora_A.device if layers else None
    return torch.zeros((), device=device)


def molora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trainable MoLoRA tensors (router weights and expert A/B), keyed as in ``model.state_dict()``."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MoLoRALinear):
            prefix = f"{name}." if name else ""
            out[f"{prefix}router.weight"] = m.router.weight.detach()
            out[f"{prefix}lora_A"] = m.lora_A.detach()
            out[f"{prefix}lora_B"] = m.lora_B.detach()
    return out
