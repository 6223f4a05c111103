"""Final outputs in the layout users know, and `load_trained` to reload any of them for generation.

    output_dir/
      adapter_config.json + adapter_model.safetensors   PEFT methods (PEFT's save_pretrained: lora, qlora, adalora,
                                                        ia3, prompt/prefix tuning, bitfit with added biases, longlora)
      trainable_extras.safetensors                      LongLoRA's trainable embeddings and norms (PEFT saves only
                                                        the LoRA weights)
      adapter_config.json + adapter_model.safetensors   our own modules (bottleneck adapter, MoLoRA, BitFit on the
                                                        model's biases): the trainable tensors by parameter name, and
                                                        a config with "advisor_method" naming the method and its knobs
      config.json + model.safetensors                   full / GaLore: the whole model (from_pretrained works)
      tokenizer files, plan.json, metrics.jsonl, runs/ (TensorBoard), checkpoint-<step>/
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

OWN_FORMAT = "advisor.trainable_tensors/v1"
EXTRAS_FILE = "trainable_extras.safetensors"


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def save_outputs(model, prepared, spec, cfg, job: dict, output_dir: Path, tokenizer, state_dict=None) -> list[str]:
    """Write the trained weights (see module docstring) and the tokenizer; returns the files written.

    `state_dict` is the gathered full state of a sharded (FSDP / DeepSpeed) model; None otherwise."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    written = []
    if spec.full_weights:
        model.save_pretrained(out, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        written += ["config.json", "model.safetensors"]
    elif is_peft_model(model):
        model.save_pretrained(out, **({"state_dict": state_dict} if state_dict else {}))
        written += ["adapter_config.json", "adapter_model.safetensors"]
        source = state_dict or {n: p for n, p in model.named_parameters()}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        extras = {n: t.detach().contiguous().cpu() for n, t in source.items() if n in trainable and not _peft_owned(n)}
        if extras:
            save_file(extras, str(out / EXTRAS_FILE))
            written.append(EXTRAS_FILE)
    else:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        source = state_dict or {n: p for n, p in model.named_parameters()}
        tensors = {n: t.detach().contiguous().cpu() for n, t in source.items() if n in trainable}
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt", "advisor_method": spec.id})
        adapter_config = {
            "format": OWN_FORMAT,
            "advisor_method": spec.id,
            "base_model_name_or_path": job["model"],
            "peft": cfg.peft,
            "num_tensors": len(tensors),
            "num_trainable_params": sum(t.numel() for t in tensors.values()),
            "note": "not a PEFT adapter: reload with advisor.train.load_trained(output_dir)",
        }
        (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, default=str))
        written += ["adapter_config.json", "adapter_model.safetensors"]
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        written.append("tokenizer")
    return written


def _peft_owned(name: str) -> bool:
    """Parameters PEFT's own save_pretrained writes (adapter weights, prompt encoders, BEFT biases)."""
    return any(k in name for k in ("lora_", "prompt_encoder", "ia3_", "beft", "modules_to_save"))


def _inference_config(cfg, device_type: str):
    training = cfg.training.model_copy(update={"gradient_checkpointing": False})
    if device_type == "cpu" and training.torch_dtype == "float16":
        training = training.model_copy(update={"torch_dtype": "float32", "fp16": False})
    if training.attn_implementation == "flash_attention_2" and device_type != "cuda":
        training = training.model_copy(update={"attn_implementation": "sdpa"})
    return cfg.model_copy(update={"training": training})


def read_plan(output_dir: str | Path) -> dict:
    from advisor.errors import AdvisorInputError

    path = Path(output_dir) / "plan.json"
    if not path.is_file():
        raise AdvisorInputError("output_dir", f"{output_dir} has no plan.json: not an advisor training output")
    return json.loads(path.read_text())


def load_trained(output_dir: str | Path, device: str | None = None, *, base_quantized: bool | None = None):
    """(model, tokenizer) of a finished training output, in eval mode, ready for `generate`.

    LongLoRA models come back with full attention (S²-Attn is for training only). `base_quantized=False` loads a
    QLoRA base unquantized (for merging with --dequantize).
    """
    from transformers import AutoTokenizer

    from advisor.catalog.models import resolve_model
    from advisor.engine import _auto_class, load_base_model
    from advisor.methods import get_method

    out = Path(output_dir)
    plan = read_plan(out)
    job = plan["job"]
    spec = get_method(job["method"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev_type = torch.device(device).type
    cfg = _inference_config(spec.resolve_config(plan.get("config") or job["config"]), dev_type)
    resolved = resolve_model(job["model"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    if spec.full_weights:
        from advisor.engine import DTYPES

        model = _auto_class(resolved.kind).from_pretrained(out, dtype=DTYPES[cfg.training.torch_dtype]).to(device)
        return model.eval(), tokenizer
    quantized = spec.quantized if base_quantized is None else base_quantized
    if spec.quantized and not quantized:
        from advisor.methods import get_method as _gm

        lora_cfg = _gm("lora").resolve_config({"training": cfg.training.model_dump()})
        base = load_base_model(resolved, lora_cfg, on_meta=False, device=device)
    else:
        base = load_base_model(resolved, cfg, on_meta=False, device=device)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    if adapter_config.get("format") == OWN_FORMAT:
        from safetensors.torch import load_file

        from advisor.methods import BuildContext

        ctx = BuildContext(kind=resolved.kind, model_type=resolved.model_type, on_meta=False, training=cfg.training,
                           quantization=cfg.quantization)
        prepared = spec.build(base, dict(adapter_config.get("peft") or cfg.peft), ctx)
        model = prepared.model
        _load_strict_subset(model, load_file(str(out / "adapter_model.safetensors")), out)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(out))
        if (out / EXTRAS_FILE).is_file():
            from safetensors.torch import load_file

            _load_strict_subset(model, load_file(str(out / EXTRAS_FILE)), out)
    if not (spec.quantized and quantized):  # bitsandbytes 4-bit models are placed at load time
        model.to(device)
    return model.eval(), tokenizer


def _load_strict_subset(model, tensors: dict, where: Path) -> None:
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{where}: saved tensors do not match the rebuilt model (e.g. {result.unexpected_keys[:3]})")
