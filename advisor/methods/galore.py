"""GaLore: full-parameter training whose optimizer keeps low-rank projected moments.

The optimizer is galore-torch's `GaLoreAdamW` (the one transformers' `optim="galore_adamw"` uses); the
2-D weights of attention and MLP blocks get the projected groups, everything else plain AdamW.
"""

import re

from advisor.errors import AdvisorInputError
from advisor.methods.base import MethodSpec, Prepared, register_method, whole_knob

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


def galore_param_groups(model, peft):
    pattern = re.compile("|".join(f"(?:{p})" for p in peft["target_modules"]), re.IGNORECASE)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    low_rank, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and id(p) not in head_ids and pattern.search(name) and "embed" not in name:
            low_rank.append(p)
        else:
            rest.append(p)
    if not low_rank:
        raise AdvisorInputError("config.peft.target_modules", "no 2-D weight matches the GaLore target patterns")
    return [
        {"params": rest},
        {
            "params": low_rank,
            "rank": int(peft["rank"]),
            "update_proj_gap": int(peft["update_proj_gap"]),
            "scale": float(peft["scale"]),
            "proj_type": peft["proj_type"],
        },
    ]


def validate(peft, ctx):
    if peft["proj_type"] not in PROJ_TYPES:
        raise AdvisorInputError("config.peft.proj_type", f"unknown projection {peft['proj_type']!r}", allowed=PROJ_TYPES)
    whole_knob(peft, "rank", 1, 65536)
    whole_knob(peft, "update_proj_gap", 1, 10**9, "steps between projection refreshes (galore-torch: step % gap)")
    scale = peft["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise AdvisorInputError("config.peft.scale", f"the projected update's scale: a number > 0, got {scale!r}")


def build(model, peft, ctx):
    validate(peft, ctx)
    for p in model.parameters():
        p.requires_grad_(True)
    return Prepared(model=model, method="galore", peft=peft, optimizer_params=galore_param_groups(model, peft))


SPEC = register_method(
    MethodSpec(
        id="galore",
        name="GaLore",
        summary="Train all weights with gradients projected to a low-rank subspace; full-FT quality, far less optimizer memory.",
        build=build,
        knobs={"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "target_modules": ["attn", "attention", "mlp", "DenseReluDense"]},
        full_weights=True,
        requires=("galore-torch optimizer",),
        paper="Zhao et al. 2024, GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection, arXiv:2403.03507",
        validate=validate,
    )
)
