"""Prefix tuning through PEFT: trainable key/value prefixes in every attention layer."""

from advisor.errors import AdvisorInputError
from advisor.methods.base import MethodSpec, Prepared, peft_task_type, register_method
from advisor.methods.prompt_tuning import validate as validate_virtual_tokens


def validate(peft, ctx):
    validate_virtual_tokens(peft, ctx)
    if not isinstance(peft["prefix_projection"], bool):  # bool("no") is True: an MLP would be built
        raise AdvisorInputError("config.peft.prefix_projection", f"must be true or false, got "
                                f"{peft['prefix_projection']!r}", allowed=["true", "false"])


def build(model, peft, ctx):
    from peft import PrefixTuningConfig, get_peft_model

    validate(peft, ctx)
    if ctx.training.gradient_checkpointing:
        raise AdvisorInputError(
            "config.training.gradient_checkpointing",
            "prefix_tuning does not work with gradient checkpointing (PEFT refuses it); set it to false",
        )
    cfg = PrefixTuningConfig(
        task_type=peft_task_type(ctx),
        num_virtual_tokens=peft["num_virtual_tokens"],
        prefix_projection=peft["prefix_projection"],
    )
    return Prepared(model=get_peft_model(model, cfg), method="prefix_tuning", peft=peft)


SPEC = register_method(
    MethodSpec(
        id="prefix_tuning",
        name="Prefix tuning",
        summary="Learn key/value prefixes for every layer's attention; good for generation tasks.",
        build=build,
        knobs={"num_virtual_tokens": 20, "prefix_projection": False},
        mergeable=False,
        paper="Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation, arXiv:2101.00190",
        validate=validate,
    )
)
