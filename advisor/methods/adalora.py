"""AdaLoRA through PEFT: SVD-shaped LoRA whose rank budget is reallocated during training.

`update_and_allocate(step)` must run after every optimizer step (before zero_grad); transformers' Trainer does
not call it, so `Prepared.after_optimizer_step` carries it into every training loop we run.
"""

from advisor.methods._targets import resolve_targets
from advisor.methods.base import MethodSpec, Prepared, peft_task_type, register_method, whole_knob
from advisor.methods.lora import check_alpha_dropout


def schedule(peft: dict, total_steps: int) -> tuple[int, int, list[str]]:
    """tinit/tfinal that leave a budgeting phase; PEFT refuses tinit + tfinal >= total_step."""
    tinit, tfinal = int(peft["tinit"]), int(peft["tfinal"])
    notes = []
    if tinit + tfinal >= total_steps:
        tinit, tfinal = max(0, total_steps // 10), max(1, total_steps // 5)
        if tinit + tfinal >= total_steps:
            tinit, tfinal = 0, max(0, total_steps - 2)
        notes.append(
            f"AdaLoRA schedule scaled to {total_steps} steps: tinit={tinit}, tfinal={tfinal} "
            f"(requested {peft['tinit']}/{peft['tfinal']} leaves no budgeting phase)"
        )
    return tinit, tfinal, notes


def validate(peft, ctx):
    """What PEFT's AdaLoraConfig accepts silently but cannot mean: ranks out of order, a schedule or moments out of
    range."""
    from advisor.errors import AdvisorInputError

    init_r = whole_knob(peft, "init_r", 1, 4096)
    # AdaLoRA prunes each layer's rank from init_r down to an average of target_r
    whole_knob(peft, "target_r", 1, init_r, "at most init_r")
    for key in ("tinit", "tfinal"):
        whole_knob(peft, key, 0, 10**9)
    whole_knob(peft, "deltaT", 1, 10**9)
    for key in ("beta1", "beta2"):
        if not isinstance(peft[key], (int, float)) or isinstance(peft[key], bool) or not 0 <= peft[key] < 1:
            raise AdvisorInputError(f"config.peft.{key}", f"an exponential moving average's factor: in [0, 1), got "
                                    f"{peft[key]!r}")
    if not isinstance(peft["orth_reg_weight"], (int, float)) or peft["orth_reg_weight"] < 0:
        raise AdvisorInputError("config.peft.orth_reg_weight", f"must be ≥ 0, got {peft['orth_reg_weight']!r}")
    check_alpha_dropout(peft)


def build(model, peft, ctx):
    from peft import AdaLoraConfig, get_peft_model

    validate(peft, ctx)
    total = max(int(ctx.total_steps), 3)
    tinit, tfinal, notes = schedule(peft, total)
    targets = resolve_targets(model, peft["target_modules"], ctx.model_type, "config.peft.target_modules")
    cfg = AdaLoraConfig(
        task_type="SEQ_2_SEQ_LM" if ctx.kind == "seq2seq" else "CAUSAL_LM",
        init_r=int(peft["init_r"]),
        target_r=int(peft["target_r"]),
        tinit=tinit,
        tfinal=tfinal,
        deltaT=int(peft["deltaT"]),
        beta1=peft["beta1"],
        beta2=peft["beta2"],
        orth_reg_weight=peft["orth_reg_weight"],
        lora_alpha=peft["lora_alpha"],
        lora_dropout=peft["lora_dropout"],
        target_modules=targets,
        total_step=total,
    )
    model = get_peft_model(model, cfg)

    def after_optimizer_step(step: int) -> None:
        model.base_model.update_and_allocate(step)

    return Prepared(model=model, method="adalora", peft=peft, after_optimizer_step=after_optimizer_step, notes=notes)


SPEC = register_method(
    MethodSpec(
        id="adalora",
        name="AdaLoRA",
        summary="LoRA with importance-based rank allocation across layers under a total budget.",
        build=build,
        knobs={
            "init_r": 12,
            "target_r": 8,
            "tinit": 200,
            "tfinal": 1000,
            "deltaT": 10,
            "beta1": 0.85,
            "beta2": 0.85,
            "orth_reg_weight": 0.5,
            "lora_alpha": 32,
            "lora_dropout": 0.05,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
        paper="Zhang et al. 2023, AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning, arXiv:2303.10512",
        validate=validate,
    )
)
