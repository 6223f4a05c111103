"""Prompt tuning through PEFT: trainable soft-prompt embeddings prepended to the input."""

from advisor.errors import AdvisorInputError
from advisor.methods.base import MethodSpec, Prepared, peft_task_type, register_method


def validate(peft, ctx):
    n = peft["num_virtual_tokens"]
    if not isinstance(n, int) or not 1 <= n <= 1024:
        raise AdvisorInputError("config.peft.num_virtual_tokens", f"must be an integer in 1..1024, got {n!r}")


def build(model, peft, ctx):
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    validate(peft, ctx)
    # the virtual tokens are concatenated with the input embeddings, whose width is not always hidden_size (PEFT's
    # default for token_dim): OPT-350m embeds in 512 and projects to 1024
    embeddings = model.get_input_embeddings()
    cfg = PromptTuningConfig(
        task_type=peft_task_type(ctx), num_virtual_tokens=peft["num_virtual_tokens"], prompt_tuning_init=PromptTuningInit.RANDOM,
        **({"token_dim": embeddings.embedding_dim} if hasattr(embeddings, "embedding_dim") else {}),
    )
    return Prepared(model=get_peft_model(model, cfg), method="prompt_tuning", peft=peft)


SPEC = register_method(
    MethodSpec(
        id="prompt_tuning",
        name="Prompt tuning",
        summary="Learn a few virtual token embeddings in front of every input; tiny adapters, best on large models.",
        build=build,
        knobs={"num_virtual_tokens": 20},
        mergeable=False,
        paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning, arXiv:2104.08691",
        validate=validate,
    )
)
