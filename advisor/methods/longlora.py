"""LongLoRA: LoRA on attention plus trainable embeddings and norms, trained with shifted sparse attention.

S²-Attn (`modules/s2attn.py`) is registered as a transformers attention implementation; it is used only in
training, and the model falls back to full attention for evaluation and generation.
"""

from advisor.errors import AdvisorInputError
from advisor.methods._targets import ATTENTION_MODULES
from advisor.methods.base import MethodSpec, Prepared, register_method
from advisor.methods.lora import lora_config, validate_lora


def validate(peft, ctx):
    validate_lora(peft, ctx)
    ratio = peft["group_size_ratio"]
    if not 0 < float(ratio) <= 1:
        raise AdvisorInputError("config.peft.group_size_ratio", f"must be in (0, 1], got {ratio!r}")


def build(model, peft, ctx):
    from peft import get_peft_model

    from advisor.methods.modules.s2attn import enable_s2attn

    validate(peft, ctx)
    targets = peft["target_modules"] or ATTENTION_MODULES.get(ctx.model_type)
    if not targets:
        raise AdvisorInputError("config.peft.target_modules", f"no attention module names known for {ctx.model_type!r}; name them")
    enable_s2attn(model, group_size_ratio=float(peft["group_size_ratio"]))
    model = get_peft_model(model, lora_config(model, {**peft, "target_modules": targets}, ctx))
    keys = tuple(peft["trainable_params"])
    for name, p in model.named_parameters():
        if any(k in name for k in keys) and "lora_" not in name:
            p.requires_grad_(True)
    return Prepared(model=model, method="longlora", peft={**peft, "target_modules": targets})


SPEC = register_method(
    MethodSpec(
        id="longlora",
        name="LongLoRA",
        summary="Extend context cheaply: shifted sparse attention in training, LoRA plus trainable embeddings/norms.",
        build=build,
        knobs={
            "r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.05,
            "target_modules": None,
            "bias": "none",
            "group_size_ratio": 0.25,
            "trainable_params": ["embed", "norm"],
        },
        kinds=("causal_lm",),
        requires=("a decoder-only (causal) model with rotary/relative positions",),
        paper="Chen et al. 2023, LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models, arXiv:2309.12307",
        validate=validate,
    )
)
