"""BitFit: train only the bias terms.

`bias_source="existing"` unfreezes the model's own biases (GPT-2, T5 layer norms have none but BLOOM, Falcon,
Qwen2's q/k/v do); architectures without biases (Llama, Mistral) need `bias_source="add"`, which uses PEFT's
BEFT to add trainable bias vectors to every linear layer.
"""

from advisor.errors import AdvisorInputError
from advisor.methods.base import MethodSpec, Prepared, freeze, peft_task_type, register_method

BIAS_SOURCES = ("existing", "add")


def bias_parameters(model):
    return [(n, p) for n, p in model.named_parameters() if n.endswith(".bias") or n == "bias"]


def validate(peft, ctx):
    if peft["bias_source"] not in BIAS_SOURCES:
        raise AdvisorInputError("config.peft.bias_source", f"unknown value {peft['bias_source']!r}", allowed=BIAS_SOURCES)


def build(model, peft, ctx):
    from peft import BeftConfig, get_peft_model

    validate(peft, ctx)
    if peft["bias_source"] == "add":
        cfg = BeftConfig(task_type=peft_task_type(ctx), target_modules="all-linear")
        try:
            peft_model = get_peft_model(model, cfg)
        except (TypeError, ValueError) as err:  # BEFT handles torch.nn.Linear only (GPT-2's Conv1D is refused)
            has_own = bool(bias_parameters(model))
            raise AdvisorInputError(
                "config.peft.bias_source",
                f"PEFT cannot add biases to this {ctx.model_type} model's layers ({err})"
                + ("; it has bias terms of its own: use bias_source 'existing'" if has_own else ""),
                allowed=BIAS_SOURCES,
            ) from None
        return Prepared(model=peft_model, method="bitfit", peft=peft)
    biases = bias_parameters(model)
    if not biases:
        raise AdvisorInputError(
            "config.peft.bias_source",
            f"this {ctx.model_type} model has no bias terms to train; set bias_source to 'add' "
            "(adds trainable biases to linear layers) or choose another method",
            allowed=BIAS_SOURCES,
        )
    freeze(model)
    for _, p in biases:
        p.requires_grad_(True)
    return Prepared(model=model, method="bitfit", peft=peft)


SPEC = register_method(
    MethodSpec(
        id="bitfit",
        name="BitFit",
        summary="Train only bias terms (~0.1% of parameters); cheap, weaker on hard tasks.",
        build=build,
        knobs={"bias_source": "existing"},
        requires=("bias terms in the model, or bias_source='add'",),
        paper="Ben Zaken et al. 2021, BitFit: Simple Parameter-efficient Fine-tuning, arXiv:2106.10199",
        validate=validate,
    )
)
