"""QLoRA: the base in 4-bit NF4 (bitsandbytes), LoRA adapters trained in higher precision.

`config.quantization.load_in_8bit` loads the base in 8-bit LLM.int8() instead (LLaMA-Factory's "QLoRA 8-bit",
Axolotl's `adapter: lora` + `load_in_8bit`). The base model arrives already quantized: for a real run
`load_base_model` passes a BitsAndBytesConfig to `from_pretrained`; for a simulation it swaps in `SimLinear4bit` /
`SimLinear8bit`, stand-ins with the same bytes and the same matmul allocations.
"""

from advisor.methods.base import MethodSpec, Prepared, freeze, register_method
from advisor.methods.lora import LORA_KNOBS, adapter_autocast, freeze_lora_a, lora_config, validate_lora


def build(model, peft, ctx):
    from peft import get_peft_model, prepare_model_for_kbit_training

    validate_lora(peft, ctx)
    if peft.get("upcast_non_quantized"):
        # PEFT's recipe: norms, embeddings and the head in fp32 (+4 bytes/param for those layers)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        freeze(model)  # keep them in the load dtype (bf16), as most QLoRA trainers now do
    model = get_peft_model(model, lora_config(model, peft, ctx), autocast_adapter_dtype=adapter_autocast(peft))
    freeze_lora_a(model, ctx)
    return Prepared(model=model, method="qlora", peft=peft)


SPEC = register_method(
    MethodSpec(
        id="qlora",
        name="QLoRA",
        summary="LoRA on a 4-bit NF4-quantized frozen base; the least memory for LoRA-level quality.",
        build=build,
        knobs={**LORA_KNOBS, "target_modules": "all-linear", "upcast_non_quantized": False},
        requires=("bitsandbytes 4-bit quantization",),
        quantized=True,
        mergeable=True,
        paper="Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs, arXiv:2305.14314",
        validate=validate_lora,
    )
)
