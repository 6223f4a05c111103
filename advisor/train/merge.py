"""Merge a trained adapter into its base model (`advisor merge OUTPUT_DIR [--out DIR] [--dequantize]`).

LoRA-family adapters (lora, adalora, longlora, ia3, bitfit with added biases) merge through PEFT's
`merge_and_unload`; BitFit on the model's own biases is written into the base directly. QLoRA's base is 4-bit:
merging into quantized weights would round the update away, so it is refused unless `dequantize=True`, which
reloads the base unquantized (bf16/fp32) and merges there. Methods whose weights cannot fold into the base
(prompt/prefix tuning, bottleneck adapters, MoLoRA's routed experts) are refused with the method named; full and
GaLore outputs already are full models.
"""

from __future__ import annotations

from pathlib import Path

from advisor.errors import AdvisorInputError


def merge(output_dir: str | Path, out: str | Path | None = None, *, dequantize: bool = False,
          device: str = "cpu") -> Path:
    """Write the merged model (config.json + model.safetensors + tokenizer) and return its directory."""
    from advisor.methods import get_method
    from advisor.train.artifacts import read_plan

    output_dir = Path(output_dir)
    plan = read_plan(output_dir)
    spec = get_method(plan["job"]["method"])
    if spec.full_weights:
        raise AdvisorInputError("output_dir", f"{spec.id} trained every weight: {output_dir} already holds the full "
                                "model (config.json + model.safetensors); there is nothing to merge")
    if not spec.mergeable:
        raise AdvisorInputError(
            "output_dir", f"{spec.id} cannot be merged into the base weights (its trained parameters are not a weight "
            "update: virtual tokens, inserted modules or routed experts); load it with advisor.train.load_trained",
            allowed=[m for m in _mergeable()])
    if spec.id == "peft":
        from advisor.methods.peft_any import is_prompt_learning, peft_type_of

        peft = (plan["job"].get("config") or {}).get("peft") or {}
        if is_prompt_learning(peft):
            raise AdvisorInputError(
                "output_dir", f"{peft_type_of(peft)} trains virtual tokens or prompts, not a weight update: it cannot "
                "be merged into the base weights; load it with advisor.train.load_trained",
                allowed=[m for m in _mergeable()])
    if spec.quantized and not dequantize:
        raise AdvisorInputError(
            "dequantize", f"{spec.id}'s base is 4-bit: merging into quantized weights loses the update; pass "
            "--dequantize to reload the base in 16/32-bit and merge there")
    from advisor.train.artifacts import is_peft_model, load_trained

    model, tokenizer = load_trained(output_dir, device=device, base_quantized=False if spec.quantized else None)
    if is_peft_model(model):
        try:
            model = model.merge_and_unload()
        except (AttributeError, NotImplementedError, ValueError) as err:  # a PEFT type without a merge
            raise AdvisorInputError("output_dir", f"PEFT cannot merge this {spec.id} adapter into the base weights: "
                                    f"{err}; load it with advisor.train.load_trained") from None
    target = Path(out) if out else output_dir / "merged"
    target.mkdir(parents=True, exist_ok=True)
    _clean_config(model)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def _clean_config(model) -> None:
    """A merged model is a plain model: no quantization config, no S²-Attn implementation left in its config."""
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            pass
    if getattr(cfg, "_attn_implementation", None) == "s2attn":
        model.set_attn_implementation("sdpa")
    for attr in ("s2attn_group_size_ratio", "s2attn_mask_wraparound"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)


def _mergeable() -> list[str]:
    from advisor.methods import all_methods

    return [m.id for m in all_methods() if m.mergeable and not m.full_weights]
