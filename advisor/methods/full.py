"""Full fine-tuning: every weight trains (AdamW keeps two moments per weight)."""

from advisor.methods.base import MethodSpec, Prepared, register_method


def build(model, peft, ctx):
    for p in model.parameters():
        p.requires_grad_(True)
    return Prepared(model=model, method="full", peft=peft)


SPEC = register_method(
    MethodSpec(
        id="full",
        name="Full fine-tuning",
        summary="Update all weights; the quality ceiling, and the most memory (weights, gradients, optimizer states).",
        build=build,
        knobs={},
        full_weights=True,
        paper="",
    )
)
