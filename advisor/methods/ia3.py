"""IA³ through PEFT: learned vectors rescaling keys, values and the feed-forward input."""

from advisor.methods._targets import ia3_modules
from advisor.methods.base import MethodSpec, Prepared, peft_task_type, register_method


def build(model, peft, ctx):
    from peft import IA3Config, get_peft_model

    targets, ff = ia3_modules(model, peft, ctx.model_type)
    cfg = IA3Config(task_type=peft_task_type(ctx), target_modules=targets, feedforward_modules=ff)
    return Prepared(model=get_peft_model(model, cfg), method="ia3", peft={**peft, "target_modules": targets, "feedforward_modules": ff})


SPEC = register_method(
    MethodSpec(
        id="ia3",
        name="IA³",
        summary="Rescale activations with a few learned vectors; ~0.01% trainable, the fewest parameters of all.",
        build=build,
        knobs={"target_modules": None, "feedforward_modules": None},
        paper="Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning, arXiv:2205.05638",
    )
)
