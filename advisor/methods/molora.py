"""MoLoRA: a token-routed mixture of LoRA experts on chosen linear layers (`modules/molora.py`)."""

from advisor.errors import AdvisorInputError
from advisor.methods._targets import resolve_targets
from advisor.methods.base import MethodSpec, Prepared, freeze, register_method, whole_knob


def validate(peft, ctx):
    from advisor.methods.lora import check_alpha_dropout

    e, k = whole_knob(peft, "num_experts", 1, 1024), peft["top_k"]
    whole_knob(peft, "r", 1, 4096, "each expert's rank")
    check_alpha_dropout(peft)
    if not isinstance(k, int) or not 1 <= k <= e:
        raise AdvisorInputError("config.peft.top_k", f"must be an integer in 1..num_experts ({e}), got {k!r}")


def build(model, peft, ctx):
    from advisor.methods.modules.molora import apply_molora, molora_aux_loss

    validate(peft, ctx)
    targets = resolve_targets(model, peft["target_modules"], ctx.model_type, "config.peft.target_modules")
    freeze(model)
    apply_molora(
        model,
        target_modules=tuple(targets),
        num_experts=peft["num_experts"],
        top_k=peft["top_k"],
        r=peft["r"],
        alpha=peft["lora_alpha"],
        dropout=peft["lora_dropout"],
    )
    weight = float(peft["aux_loss_weight"])

    def extra_loss():
        return weight * molora_aux_loss(model) if weight else None

    return Prepared(model=model, method="molora", peft={**peft, "target_modules": targets}, extra_loss=extra_loss)


SPEC = register_method(
    MethodSpec(
        id="molora",
        name="MoLoRA (mixture of LoRA experts)",
        summary="Several LoRA experts per layer with a learned per-token router; for many domains or tasks at once.",
        build=build,
        knobs={
            "num_experts": 4,
            "top_k": 2,
            "r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.05,
            "target_modules": ["q_proj", "v_proj"],
            "aux_loss_weight": 0.01,
        },
        mergeable=False,
        paper="Zadouri et al. 2023, arXiv:2309.05444; Li et al. 2024 (MixLoRA), arXiv:2404.15159",
        validate=validate,
    )
)
