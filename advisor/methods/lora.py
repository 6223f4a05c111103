"""LoRA through PEFT: frozen base, trainable low-rank A·B beside the target linear layers."""

from advisor.methods._targets import resolve_modules_to_save, resolve_targets
from advisor.methods.base import MethodSpec, Prepared, linear_module_names, peft_task_type, register_method

LORA_KNOBS = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],
    "bias": "none",
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    # PEFT keeps the adapter weights (and so their gradients and AdamW states) in fp32 over a 16-bit base unless this
    # is false; torchtune creates its LoRA weights in the model's dtype, which false matches
    "autocast_adapter_dtype": True,
}


def adapter_autocast(peft: dict) -> bool:
    """`get_peft_model`'s autocast_adapter_dtype for this config (PEFT's default: true)."""
    return bool(peft.get("autocast_adapter_dtype", True))


def lora_config(model, peft, ctx, **extra):
    from peft import LoraConfig

    targets = resolve_targets(model, peft["target_modules"], ctx.model_type, "config.peft.target_modules")
    standin = _sim_quant_class(model)
    if standin is not None and targets == "all-linear":
        targets = linear_module_names(model)  # PEFT's expansion knows only real bnb layers
    cfg = LoraConfig(
        task_type=peft_task_type(ctx),
        r=int(peft["r"]),
        lora_alpha=peft["lora_alpha"],
        lora_dropout=peft["lora_dropout"],
        target_modules=targets,
        bias=peft.get("bias", "none"),
        use_rslora=peft.get("use_rslora", False),
        use_dora=peft.get("use_dora", False),
        modules_to_save=resolve_modules_to_save(model, peft.get("modules_to_save"), "config.peft.modules_to_save"),
        **extra,
    )
    if standin is not None:  # simulate with PEFT's own 4-bit / 8-bit / GPTQ LoRA layer around the stand-in
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
        from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt
        from peft.tuners.lora.gptq import GPTQLoraLinear

        cfg._register_custom_module({standin: {"SimLinear4bit": LoraLinear4bit, "SimLinear8bit": LoraLinear8bitLt,
                                               "SimLinearGPTQ": GPTQLoraLinear}[standin.__name__]})
    return cfg


def _sim_quant_class(model):
    for mod in model.modules():
        if type(mod).__name__ in ("SimLinear4bit", "SimLinear8bit", "SimLinearGPTQ"):
            return type(mod)
    return None


def check_alpha_dropout(peft) -> None:
    """lora_alpha > 0 (the update is scaled by alpha / r: 0 trains nothing, a negative value flips it) and
    lora_dropout in [0, 1); PEFT takes both unchecked."""
    from advisor.errors import AdvisorInputError

    alpha = peft["lora_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise AdvisorInputError("config.peft.lora_alpha", f"must be a number > 0 (the update is scaled by "
                                f"lora_alpha / r), got {alpha!r}")
    dropout = peft["lora_dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdvisorInputError("config.peft.lora_dropout", f"must be in [0, 1), got {dropout!r}")


def validate_lora(peft, ctx):
    from advisor.errors import AdvisorInputError

    if not isinstance(peft["r"], int) or not 1 <= peft["r"] <= 4096:
        raise AdvisorInputError("config.peft.r", f"rank must be an integer in 1..4096, got {peft['r']!r}")
    check_alpha_dropout(peft)
    if not isinstance(peft.get("autocast_adapter_dtype", True), bool):
        raise AdvisorInputError("config.peft.autocast_adapter_dtype",
                                f"must be true or false, got {peft['autocast_adapter_dtype']!r}")
    if not isinstance(peft.get("use_dora", False), bool):
        raise AdvisorInputError("config.peft.use_dora", f"must be true or false, got {peft['use_dora']!r}")
    if peft.get("bias", "none") not in ("none", "all", "lora_only"):
        raise AdvisorInputError("config.peft.bias", "unknown bias mode", allowed=["none", "all", "lora_only"])


def freeze_lora_a(model, ctx) -> None:
    """LoRA-FA (optimizer `lorafa`; Zhang et al. 2023, arXiv:2308.03303; PEFT's create_lorafa_optimizer): A stays at
    its random initialization and only B trains, so A has no gradient or state, and A's input (the layer's input)
    is not saved for a weight gradient; B saves A·x (rank-wide) instead. Frozen here, before any forward, as
    create_lorafa_optimizer does."""
    if ctx.training.optim == "lorafa":
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)


def build(model, peft, ctx):
    from peft import get_peft_model

    validate_lora(peft, ctx)
    model = get_peft_model(model, lora_config(model, peft, ctx), autocast_adapter_dtype=adapter_autocast(peft))
    freeze_lora_a(model, ctx)
    return Prepared(model=model, method="lora", peft=peft)


SPEC = register_method(
    MethodSpec(
        id="lora",
        name="LoRA",
        summary="Frozen base weights with trainable low-rank updates on chosen linear layers.",
        build=build,
        knobs=LORA_KNOBS,
        paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv:2106.09685",
        validate=validate_lora,
    )
)
