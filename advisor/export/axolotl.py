"""Axolotl YAML (`axolotl train config.yml`).

Key names are Axolotl's own, checked against its pydantic schemas (axolotl-ai-cloud/axolotl,
src/axolotl/utils/schemas/{config,peft,training,datasets,fsdp,deprecated}.py, and docs/{optimizers,multi-gpu,
dataset-formats}.qmd, snapshot of 2026-07-24). Unknown keys are not refused by Axolotl's schema, so a typo would
be silently ignored; `KNOWN_KEYS` below lists every key this exporter may write, and the tests hold it to that.

What Axolotl can express (and what not), per method:

    method          Axolotl                                   how
    full            yes                                       no `adapter`
    lora            yes                                       adapter: lora
    qlora           yes                                       adapter: qlora + load_in_4bit (+ bnb_config_kwargs);
                                                              8-bit base: adapter: lora + load_in_8bit
    galore          yes                                       optimizer: galore_adamw*, optim_target_modules, optim_args
    bitfit          models with biases (bias_source existing) unfrozen_parameters: [".+bias$"] (full FT, rest frozen)
    freeze          yes                                       unfrozen_parameters: the trained blocks' (and extra
                                                              modules') parameter names as regexes (full FT, rest frozen)
    longlora        no: `s2_attention` was removed ("shifted-sparse attention is no longer supported",
                    schemas/deprecated.py)
    adalora         no: built-in adapters are lora, qlora, llama-adapter (schemas/peft.py validate_adapter)
    ia3             no: idem
    prompt_tuning   no: idem
    prefix_tuning   no: idem (llama-adapter is LLaMA-Adapter's gated prompts, not PEFT prefix tuning)
    adapter         no: idem (no Houlsby/Pfeiffer bottleneck adapters)
    molora          no: idem (the only plugin adapter shipped is MoRA, a different method)

Encoder-decoder models (T5) are refused: Axolotl loads AutoModelForCausalLM.
"""

from __future__ import annotations

from pathlib import Path

from advisor.config import LLM_INT8_THRESHOLD
from advisor.export.base import ExportContext, ExportFormat, Rendered, register_format
from advisor.export.multigpu import put_multi_gpu, uses_deepspeed
from advisor.export.yamldoc import YamlDoc

METHODS = ("full", "lora", "qlora", "galore", "bitfit", "freeze")
REFUSALS = {
    "longlora": "Axolotl removed shifted-sparse attention (`s2_attention` is deprecated: \"no longer supported\")",
    "adalora": "Axolotl's built-in adapters are lora, qlora and llama-adapter; AdaLoRA's rank reallocation is not one",
    "ia3": "Axolotl's built-in adapters are lora, qlora and llama-adapter; it has no IA3",
    "prompt_tuning": "Axolotl's built-in adapters are lora, qlora and llama-adapter; it has no prompt tuning",
    "prefix_tuning": "Axolotl's built-in adapters are lora, qlora and llama-adapter "
                     "(LLaMA-Adapter is not PEFT prefix tuning)",
    "adapter": "Axolotl has no bottleneck (Houlsby/Pfeiffer) adapters",
    "peft": "Axolotl's built-in adapters are lora, qlora and llama-adapter; other PEFT types are not among them",
    "molora": "Axolotl has no mixture-of-LoRA-experts adapter",
    "llama_pro": "Axolotl has no block expansion (LLaMA-Pro); LLaMA-Factory's use_llama_pro and the script do",
}


def freeze_patterns(ctx) -> list[str]:
    """Axolotl's `unfrozen_parameters` (regular expressions over parameter names) for freeze tuning: the trained
    blocks (or their chosen submodules) and the extra modules that `advisor.methods.freeze.selection` picks, with
    the model's own parameter names."""
    import re

    from advisor.catalog.models import resolve_model
    from advisor.methods.freeze import selection

    p = ctx.peft
    stack, _, trained, extras = selection(resolve_model(ctx.model_ref).build_meta(), p)
    inner = "" if p["trainable_modules"] == "all" else \
        r"(.*\.)?(" + "|".join(re.escape(m) for m in p["trainable_modules"]) + r")\."
    ids = "|".join(str(i) for i in trained)
    return [rf"^{re.escape(stack)}\.({ids})\.{inner}.*"] + [rf"^{re.escape(n)}\..*" for n in sorted(extras)]


# every key this exporter may write (top level), each present in Axolotl's schemas
KNOWN_KEYS = frozenset({
    "base_model", "load_in_4bit", "load_in_8bit", "gptq", "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "lora_target_linear", "peft_use_rslora", "peft_use_dora", "lora_modules_to_save", "bnb_config_kwargs", "unfrozen_parameters",
    "chat_template", "datasets", "dataset_prepared_path", "val_set_size", "output_dir", "sequence_len",
    "sample_packing", "train_on_inputs", "micro_batch_size", "gradient_accumulation_steps", "num_epochs",
    "learning_rate", "optimizer", "optim_target_modules", "optim_args", "lr_scheduler", "warmup_ratio",
    "weight_decay", "max_grad_norm", "bf16", "fp16", "gradient_checkpointing", "gradient_checkpointing_kwargs",
    "attn_implementation", "seed",
    "logging_steps", "save_steps", "eval_steps", "use_tensorboard", "deepspeed", "rope_scaling",
    "plugins", "liger_fused_linear_cross_entropy", "chunked_cross_entropy", "activation_offloading", "torch_compile",
})


def _ds_type(path: str) -> str:
    suffix = Path(path).suffix.lower()
    return {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}.get(suffix, "json")


def dataset_entry(ctx: ExportContext) -> dict:
    entry: dict = {"path": ctx.dataset_path, "ds_type": _ds_type(ctx.dataset_path)}
    fmt = ctx.dataset_format
    if fmt == "alpaca":
        entry["type"] = "alpaca"
    elif fmt == "chat":
        entry.update(type="chat_template", field_messages="messages", roles_to_train=["assistant"])
    elif fmt == "completion":  # a user-defined prompt: the prompt verbatim, loss on the completion only
        entry["type"] = {"field_instruction": "prompt", "field_output": "completion",
                         "format": "{instruction}", "no_input_format": "{instruction}"}
    else:
        entry.update(type="completion", field="text")
    return entry


def render(ctx: ExportContext) -> Rendered:
    t = ctx.training
    p = ctx.peft
    name = ctx.filename
    run = [f"axolotl train {name}"]
    if ctx.multi_gpu:
        run = [f"axolotl train {name} --launcher accelerate -- --num_processes={ctx.gpu_count}"]
        if uses_deepspeed(ctx.strategy):
            run.insert(0, "pip install deepspeed   # the `deepspeed` block below")
    doc = YamlDoc(header=ctx.header_lines(f"Axolotl config: {ctx.method} fine-tuning of {ctx.model_id}", run))
    notes: list[str] = []

    def knob(key: str, name: str, value) -> None:
        """`key` in the tool's name, with the reason the advisor's `name` has this value."""
        doc.put(key, value, ctx.why(name, value))

    doc.section("model")
    doc.put("base_model", ctx.model_ref, "Hub id or local directory")
    if ctx.method in ("lora", "qlora"):
        q = ctx.quantization if ctx.method == "qlora" else None
        eight = q is not None and q.load_in_8bit
        gptq = q is not None and q.quant_method == "gptq"
        if gptq:  # LoRA over a GPTQ checkpoint: Axolotl's `gptq: true`, the base model already quantized
            doc.put("gptq", True, f"the base is a GPTQ checkpoint ({q.bits}-bit, group size {q.group_size})")
        elif eight:  # Axolotl's qlora adapter is 4-bit; LoRA over an 8-bit base is adapter: lora + load_in_8bit
            doc.put("load_in_8bit", True, "frozen base in 8-bit (LLM.int8())")
        elif q is not None:
            doc.put("load_in_4bit", True, "QLoRA: frozen base in 4-bit")
        doc.put("adapter", "lora" if eight or gptq else ctx.method,
                "the recommended method" if ctx.chosen else "an alternative")
        doc.put("lora_r", int(p["r"]), ctx.why("r", p["r"]))
        knob("lora_alpha", "lora_alpha", p["lora_alpha"])
        knob("lora_dropout", "lora_dropout", p["lora_dropout"])
        if ctx.targets == "all-linear":
            doc.put("lora_target_linear", True,
                    ctx.why("target_modules", p.get("target_modules")) or "every linear layer")
        else:
            doc.put("lora_target_modules", list(ctx.targets), ctx.why("target_modules", p.get("target_modules")))
        if p.get("use_rslora"):
            doc.put("peft_use_rslora", True)
        if p.get("use_dora"):
            doc.put("peft_use_dora", True)
        if p.get("modules_to_save"):
            doc.put("lora_modules_to_save", list(p["modules_to_save"]), "trained whole beside the adapters")
        if p.get("bias", "none") != "none":
            notes.append(f"LoRA bias={p['bias']!r} has no Axolotl key; Axolotl trains no biases with LoRA")
        if not p.get("autocast_adapter_dtype", True):
            notes.append("autocast_adapter_dtype false (adapters in the base's 16-bit dtype) has no Axolotl key; "
                         "PEFT's default keeps them in fp32, which the memory estimate of this config does not count")
        if ctx.method == "qlora" and eight and q.llm_int8_threshold != LLM_INT8_THRESHOLD:
            notes.append(f"llm_int8_threshold {q.llm_int8_threshold} has no Axolotl key (it loads with "
                         f"{LLM_INT8_THRESHOLD})")
        if ctx.method == "qlora" and not eight and not gptq:
            doc.put("bnb_config_kwargs", {"bnb_4bit_quant_type": q.bnb_4bit_quant_type,
                                          "bnb_4bit_use_double_quant": q.bnb_4bit_use_double_quant},
                    "compute dtype follows bf16/fp16 below")
            if p.get("upcast_non_quantized"):
                notes.append("upcast_non_quantized (norms/embeddings in fp32) has no Axolotl key")
    elif ctx.method == "bitfit":
        doc.put("unfrozen_parameters", [".+bias$"], "BitFit: only bias terms train, everything else frozen")
    elif ctx.method == "freeze":
        doc.put("unfrozen_parameters", freeze_patterns(ctx),
                "freeze tuning: these parameters train (full fine-tuning of them), everything else frozen")

    doc.section("data")
    if ctx.dataset_format == "chat":
        doc.put("chat_template", "tokenizer_default", "the model's own chat template")
    doc.put("datasets", [dataset_entry(ctx)], f"{ctx.dataset_format} format")
    doc.put("train_on_inputs", False, "loss on responses only")
    doc.put("dataset_prepared_path", f"{ctx.output_dir}/prepared", "tokenized cache")
    doc.put("val_set_size", ctx.val_split, "held-out split to watch eval loss" if ctx.val_split else None)
    knob("sequence_len", "max_seq_length", t.max_seq_length)
    doc.put("sample_packing", bool(t.packing), ctx.why("packing", t.packing))

    doc.section("training")
    knob("micro_batch_size", "per_device_train_batch_size", t.per_device_train_batch_size)
    knob("gradient_accumulation_steps", "gradient_accumulation_steps", t.gradient_accumulation_steps)
    knob("num_epochs", "num_train_epochs", t.num_train_epochs)
    knob("learning_rate", "learning_rate", t.learning_rate)
    if t.optimizer_in_backward and ctx.method == "galore":
        doc.put("optimizer", f"{t.optim}_layerwise", "optimizer_in_backward: transformers' layer-wise GaLore steps "
                "each weight inside backward")
    else:
        knob("optimizer", "optim", t.optim)
        if t.optimizer_in_backward:
            notes.append("Axolotl steps the optimizer inside backward only for GaLore (galore_*_layerwise): this run "
                         "keeps every gradient until the optimizer step (more memory than estimated)")
    if ctx.method == "galore":
        doc.put("optim_target_modules", list(p["target_modules"]), "GaLore projects these blocks' 2-D weights")
        doc.put("optim_args", {"rank": int(p["rank"]), "update_proj_gap": int(p["update_proj_gap"]),
                               "scale": float(p["scale"]), "proj_type": p["proj_type"]},
                ctx.why("rank", p["rank"]) or "GaLore projection")
    knob("lr_scheduler", "lr_scheduler_type", t.lr_scheduler_type)
    knob("warmup_ratio", "warmup_ratio", t.warmup_ratio)
    knob("weight_decay", "weight_decay", t.weight_decay)
    knob("max_grad_norm", "max_grad_norm", t.max_grad_norm)
    doc.put("bf16", bool(t.bf16), ctx.why("bf16", t.bf16))
    doc.put("fp16", bool(t.fp16), ctx.why("fp16", t.fp16) if t.fp16 else None)
    knob("gradient_checkpointing", "gradient_checkpointing", bool(t.gradient_checkpointing))
    if t.gradient_checkpointing:
        doc.put("gradient_checkpointing_kwargs", {"use_reentrant": bool(t.gradient_checkpointing_reentrant)},
                "as estimated (gradient_checkpointing_reentrant)")
    if t.torch_compile:
        doc.put("torch_compile", True, "torch_compile: fewer saved activations (AOTAutograd's min-cut partitioner)")
    if t.activation_offloading:
        doc.put("activation_offloading", True, "activation_offloading: saved activations wait in host memory until "
                "backward (torchtune's OffloadActivations)")
    doc.put("attn_implementation", t.attn_implementation)
    if t.cross_entropy == "fused_linear":
        doc.put("plugins", ["axolotl.integrations.liger.LigerPlugin"], "Liger Kernel, for its fused linear loss")
        doc.put("liger_fused_linear_cross_entropy", True,
                "cross_entropy fused_linear: no logits outlive a chunk of tokens (the other Liger kernels stay off)")
    elif t.cross_entropy == "chunked":
        doc.put("chunked_cross_entropy", True, "cross_entropy chunked: the loss upcasts the logits one slice at a time")
        notes.append("Axolotl's chunked cross-entropy is not torchtune's 8-slice loss that the estimate models; its "
                     "memory may differ by a fraction of the logits")
    if t.rope_scaling is not None:
        doc.put("rope_scaling", {"type": t.rope_scaling.type, "factor": float(t.rope_scaling.factor)},
                "RoPE scaling: trains past the model's max_position_embeddings")
    doc.put("seed", t.seed)
    put_multi_gpu(doc, ctx, "Axolotl's default multi-GPU mode")

    doc.section("output")
    doc.put("output_dir", ctx.output_dir)
    doc.put("logging_steps", t.logging_steps)
    doc.put("save_steps", t.save_steps)
    if ctx.val_split:
        doc.put("eval_steps", t.eval_steps)
    doc.put("use_tensorboard", True, f"tensorboard --logdir {ctx.output_dir}/runs")
    for n in notes:
        doc.comment(f"note: {n}")
    unknown = set(doc.values) - KNOWN_KEYS
    if unknown:  # a programming error: every key must be one Axolotl's schema has
        raise AssertionError(f"Axolotl export wrote keys outside KNOWN_KEYS: {sorted(unknown)}")
    return Rendered(content=doc.render(), command=run[-1], notes=notes)


def _check_bitfit(ctx: ExportContext) -> None:
    from advisor.errors import AdvisorInputError

    if ctx.method == "bitfit" and ctx.peft.get("bias_source") != "existing":
        raise AdvisorInputError(
            "config.peft.bias_source",
            "Axolotl can train a model's existing biases (unfrozen_parameters) but cannot add new ones "
            "(bias_source 'add'); export with --format script", allowed=["existing"])


def _render_checked(ctx: ExportContext) -> Rendered:
    from advisor.errors import AdvisorInputError

    _check_bitfit(ctx)
    if ctx.training.optim == "lorafa":
        raise AdvisorInputError("config.training.optim", "Axolotl has no LoRA-FA optimizer (PEFT's "
                                "create_lorafa_optimizer); export with --format script, which passes it to the Trainer",
                                allowed=["adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit"])
    return render(ctx)


FORMAT = register_format(ExportFormat(
    id="axolotl", tool="Axolotl", filename="axolotl_config.yml", methods=METHODS, refusals=REFUSALS,
    render=_render_checked, kinds=("causal_lm",),
    kind_refusal="Axolotl trains decoder-only (causal) language models; encoder-decoder models such as T5 "
                 "are not supported",
    summary="Axolotl YAML: axolotl train config.yml",
))
