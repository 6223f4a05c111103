"""LLaMA-Factory YAML (`llamafactory-cli train config.yaml`) plus the `dataset_info.json` entry it reads.

Key names are LLaMA-Factory's own (hiyouga/LLaMA-Factory, src/llamafactory/hparams/{model,data,finetuning}_args.py,
snapshot of 2026-08-18) or those of transformers' `Seq2SeqTrainingArguments`, which its `TrainingArguments` extends.
LLaMA-Factory refuses unknown keys ("Some specified arguments are not used by the HfArgumentParser"), so
`OWN_KEYS` lists each of its own keys this exporter may write; the tests check the rest against the installed
transformers' training arguments.

What LLaMA-Factory can express (and what not), per method:

    method          LLaMA-Factory                      how
    full            yes                                finetuning_type: full
    lora            yes                                finetuning_type: lora, lora_rank/alpha/dropout/target
    qlora           yes                                + quantization_bit: 4 (bnb, nf4, double quantization)
    galore          yes                                finetuning_type: full, use_galore: true, galore_*
    freeze          yes                                finetuning_type: freeze, freeze_trainable_layers/
                                                       _modules, freeze_extra_modules (the same knobs)
    longlora        Llama only, transformers           shift_attn: true (S²-Attn, group size fixed at 1/4)
                    >=4.45,<4.48                       + additional_target: embed_tokens,norm
    adalora         no: finetuning_type is one of lora, oft, freeze, full
    ia3             no: idem
    prompt_tuning   no: idem
    prefix_tuning   no: idem
    bitfit          no: `freeze` trains whole layers/modules, not bias terms
    adapter         no: no bottleneck adapters
    molora          no: no mixture-of-LoRA experts

Data: LLaMA-Factory reads datasets by name from `<dataset_dir>/dataset_info.json`; the export writes that entry
(alpaca → formatting alpaca; chat → sharegpt with role/content tags; completion → alpaca columns prompt/response;
text → `stage: pt` with the prompt column). Warmup is written as whole `warmup_steps` when the run's length is known,
because LLaMA-Factory runs on transformers 4.55-5.8 and `warmup_ratio` is gone from transformers >= 5.2.
Encoder-decoder text models (T5) are refused: LLaMA-Factory's SFT data pipeline builds decoder-only sequences.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from advisor.config import LLM_INT8_THRESHOLD
from advisor.errors import AdvisorInputError
from advisor.export.base import ExportContext, ExportFormat, Rendered, register_format
from advisor.export.multigpu import put_multi_gpu, uses_deepspeed
from advisor.export.yamldoc import YamlDoc

METHODS = ("full", "lora", "qlora", "galore", "longlora", "freeze", "llama_pro")
REFUSALS = {
    "adalora": "LLaMA-Factory's finetuning_type is one of lora, oft, freeze, full; it has no AdaLoRA",
    "ia3": "LLaMA-Factory's finetuning_type is one of lora, oft, freeze, full; it has no IA3",
    "prompt_tuning": "LLaMA-Factory's finetuning_type is one of lora, oft, freeze, full; it has no prompt tuning",
    "prefix_tuning": "LLaMA-Factory's finetuning_type is one of lora, oft, freeze, full; it has no prefix tuning",
    "bitfit": "LLaMA-Factory's `freeze` tuning trains whole layers or modules, not bias terms alone",
    "adapter": "LLaMA-Factory has no bottleneck (Houlsby/Pfeiffer) adapters",
    "peft": "LLaMA-Factory's finetuning_type is one of lora, oft, freeze, full; other PEFT types are not among them",
    "molora": "LLaMA-Factory has no mixture-of-LoRA-experts adapter",
}
# LLaMA-Factory's own keys this exporter may write (every other key is a transformers training argument)
OWN_KEYS = frozenset({
    "model_name_or_path", "quantization_bit", "quantization_method", "quantization_type", "double_quantization",
    "upcast_layernorm", "flash_attn", "shift_attn", "disable_gradient_checkpointing", "use_reentrant_gc", "rope_scaling",
    "stage", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_rslora", "use_dora",
    "additional_target", "use_galore", "galore_target", "galore_rank", "galore_update_interval", "galore_scale",
    "galore_proj_type", "galore_layerwise", "freeze_trainable_layers", "freeze_trainable_modules",
    "freeze_extra_modules", "use_llama_pro", "plot_loss", "enable_liger_kernel", "use_unsloth_gc",
    "dataset", "dataset_dir", "template", "cutoff_len", "packing", "train_on_prompt", "val_size",
})
TRAINING_ARG_KEYS = frozenset({
    "do_train", "output_dir", "logging_steps", "save_steps", "report_to", "per_device_train_batch_size",
    "gradient_accumulation_steps", "learning_rate", "num_train_epochs", "lr_scheduler_type", "warmup_steps",
    "warmup_ratio", "weight_decay", "max_grad_norm", "optim", "bf16", "fp16", "seed", "deepspeed", "eval_strategy",
    "eval_steps", "per_device_eval_batch_size", "torch_compile",
})
DATASET_NAME = "advisor_train"
ATTENTION = {"sdpa": "sdpa", "flash_attention_2": "fa2", "eager": "disabled"}
GALORE_OPTIM = {"galore_adamw": "adamw_torch", "galore_adamw_8bit": "adamw_8bit", "galore_adafactor": "adafactor"}
# chat/instruct checkpoints need their family's template (LLaMA-Factory data/template.py names); base models: default
TEMPLATES = (
    (r"llama-?3|llama3", "llama3"), (r"llama-?2.*chat", "llama2"), (r"mi[sx]tral", "mistral"),
    (r"qwen3", "qwen3"), (r"qwen", "qwen"), (r"gemma-?3", "gemma3"), (r"gemma-?2", "gemma2"), (r"gemma", "gemma"),
    (r"phi-?4", "phi4"), (r"phi-?3", "phi"), (r"falcon", "falcon"), (r"\byi\b|/yi-", "yi"),
)
CHAT_MARKERS = re.compile(r"instruct|chat|-it\b|-it-", re.IGNORECASE)


def template_for(model_id: str) -> tuple[str, str]:
    if not CHAT_MARKERS.search(model_id):
        return "default", "base model: LLaMA-Factory's plain default template"
    low = model_id.lower()
    for pattern, name in TEMPLATES:
        if re.search(pattern, low):
            return name, f"chat model: its family's template ({name})"
    return "default", "no family template known for this chat model; check LLaMA-Factory's template list"


def dataset_info(ctx: ExportContext, file_name: str) -> dict:
    entry: dict = {"file_name": file_name}
    fmt = ctx.dataset_format
    if fmt == "alpaca":
        entry.update(formatting="alpaca", columns={"prompt": "instruction", "query": "input", "response": "output"})
    elif fmt == "chat":
        entry.update(formatting="sharegpt", columns={"messages": "messages"},
                     tags={"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant", "system_tag": "system"})
    elif fmt == "completion":
        entry.update(formatting="alpaca", columns={"prompt": "prompt", "response": "completion"})
    else:
        entry.update(columns={"prompt": "text"})
    return {DATASET_NAME: entry}


def render(ctx: ExportContext) -> Rendered:
    """dataset_info.json goes to `ctx.companion_dir` beside the config (CLI --out), else in the data's folder."""
    t = ctx.training
    companion_dir = ctx.companion_dir
    p = ctx.peft
    _check(ctx)
    data = Path(ctx.dataset_path)
    if companion_dir is not None:
        dataset_dir, file_name = companion_dir, str(data if data.is_absolute() else data.resolve())
    else:
        dataset_dir, file_name = str(data.parent) if str(data.parent) else ".", data.name
    info = dataset_info(ctx, file_name)
    name = ctx.filename
    run = [f"llamafactory-cli train {name}"]
    if ctx.multi_gpu:
        run = [f"FORCE_TORCHRUN=1 NPROC_PER_NODE={ctx.gpu_count} llamafactory-cli train {name}"]
        if uses_deepspeed(ctx.strategy):
            run.insert(0, "pip install deepspeed   # the `deepspeed` block below")
    header = ctx.header_lines(f"LLaMA-Factory config: {ctx.method} fine-tuning of {ctx.model_id}", run)
    header += ["", f"LLaMA-Factory reads the dataset by name from {dataset_dir}/dataset_info.json:"]
    header += ["  " + line for line in json.dumps(info, indent=2).splitlines()]
    if ctx.method == "longlora":
        header += ["LongLoRA needs transformers>=4.45,<4.48 in LLaMA-Factory (its S²-Attn patch checks the version)."]
    doc = YamlDoc(header=header)
    notes: list[str] = []

    def knob(key: str, name: str, value) -> None:
        """`key` in the tool's name, with the reason the advisor's `name` has this value."""
        doc.put(key, value, ctx.why(name, value))

    doc.section("model")
    doc.put("model_name_or_path", ctx.model_ref, "Hub id or local directory")
    if ctx.method == "qlora":
        q = ctx.quantization
        if q.quant_method == "gptq":  # a GPTQ checkpoint loads quantized from its own config: no quantization keys
            notes.append(f"the base is a GPTQ checkpoint ({q.bits}-bit, group size {q.group_size}): LLaMA-Factory "
                         "loads it quantized from its config.json (no quantization_bit; needs gptqmodel / optimum)")
        elif q.load_in_8bit:
            doc.put("quantization_bit", 8, "frozen base in 8-bit (LLM.int8())")
            doc.put("quantization_method", "bnb")
            if q.llm_int8_threshold != LLM_INT8_THRESHOLD:
                notes.append(f"llm_int8_threshold {q.llm_int8_threshold} has no LLaMA-Factory key (it loads with "
                             f"{LLM_INT8_THRESHOLD})")
        else:
            doc.put("quantization_bit", 4, "QLoRA: frozen base in 4-bit")
            doc.put("quantization_method", "bnb")
            doc.put("quantization_type", q.bnb_4bit_quant_type)
            doc.put("double_quantization", bool(q.bnb_4bit_use_double_quant))
        if p.get("upcast_non_quantized"):
            doc.put("upcast_layernorm", True, "upcast_non_quantized: norms in fp32")
    doc.put("flash_attn", ATTENTION[t.attn_implementation], f"attn_implementation {t.attn_implementation}")
    if t.optimizer_in_backward and ctx.method != "galore":
        notes.append("LLaMA-Factory steps the optimizer inside backward only for GaLore (galore_layerwise): this run "
                     "keeps every gradient until the optimizer step (more memory than estimated)")
    if t.torch_compile:
        doc.put("torch_compile", True, "torch_compile: the Trainer compiles the model (inductor)")
    if t.activation_offloading and t.gradient_checkpointing:
        doc.put("use_unsloth_gc", True, "activation_offloading: the checkpointed blocks' inputs wait in host memory "
                "(unsloth's offloaded checkpointing, built into LLaMA-Factory)")
    elif t.activation_offloading:
        notes.append("LLaMA-Factory offloads activations only with gradient checkpointing (use_unsloth_gc): without "
                     "it this run keeps every activation on the GPU (more memory than estimated)")
    if t.cross_entropy == "fused_linear":
        doc.put("enable_liger_kernel", True, "cross_entropy fused_linear: Liger's fused linear cross-entropy")
        notes.append("enable_liger_kernel also swaps in Liger's RMSNorm, SwiGLU and RoPE kernels, which keep fewer "
                     "activations than the estimate counts: it errs on the safe side")
    elif t.cross_entropy == "chunked":
        notes.append("LLaMA-Factory has no chunked cross-entropy key: it trains with the standard loss, which needs "
                     "more memory than estimated (use cross_entropy fused_linear: enable_liger_kernel)")
    if ctx.method == "longlora":
        doc.put("shift_attn", True, "LongLoRA's shifted sparse attention (S²-Attn), group size 1/4")
    if t.rope_scaling is not None:
        doc.put("rope_scaling", t.rope_scaling.type, f"× {t.rope_scaling.factor:g}: LLaMA-Factory derives the factor "
                "from cutoff_len / the model's max_position_embeddings")
    if not t.gradient_checkpointing:
        doc.put("disable_gradient_checkpointing", True, ctx.why("gradient_checkpointing", t.gradient_checkpointing))
    else:
        why = ctx.why("gradient_checkpointing", True)
        doc.comment(f"gradient checkpointing: on (LLaMA-Factory's default) -- {why}")
        doc.put("use_reentrant_gc", bool(t.gradient_checkpointing_reentrant),
                "as estimated (gradient_checkpointing_reentrant; LLaMA-Factory's default is reentrant)")

    doc.section("method")
    doc.put("stage", "pt" if ctx.dataset_format == "text" else "sft",
            "plain text: continued pre-training" if ctx.dataset_format == "text" else "supervised fine-tuning")
    doc.put("do_train", True)
    if ctx.method in ("lora", "qlora", "longlora"):
        doc.put("finetuning_type", "lora", "the recommended method" if ctx.chosen else "an alternative")
        doc.put("lora_rank", int(p["r"]), ctx.why("r", p["r"]))
        knob("lora_alpha", "lora_alpha", p["lora_alpha"])
        knob("lora_dropout", "lora_dropout", p["lora_dropout"])
        target = "all" if ctx.targets == "all-linear" else ",".join(ctx.targets)
        doc.put("lora_target", target, ctx.why("target_modules", p.get("target_modules")))
        if p.get("use_rslora"):
            doc.put("use_rslora", True)
        if p.get("use_dora"):
            doc.put("use_dora", True)
        if not p.get("autocast_adapter_dtype", True):
            notes.append("autocast_adapter_dtype false (adapters in the base's 16-bit dtype) has no LLaMA-Factory "
                         "key; it keeps trainable weights in fp32 unless pure_bf16, which this config does not set")
        if p.get("modules_to_save"):
            doc.put("additional_target", ",".join(p["modules_to_save"]), "trained whole beside the adapters")
        if p.get("bias", "none") != "none":
            notes.append(f"LoRA bias={p['bias']!r} has no LLaMA-Factory key; it trains no biases with LoRA")
        if ctx.method == "longlora":
            doc.put("additional_target", "embed_tokens,norm", "LongLoRA also trains embeddings and norms")
    elif ctx.method == "freeze":
        doc.put("finetuning_type", "freeze", "the recommended method" if ctx.chosen else "an alternative")
        n = int(p["trainable_layers"])
        doc.put("freeze_trainable_layers", n, f"the {'last' if n > 0 else 'first'} {abs(n)} blocks train")
        modules = p["trainable_modules"]
        doc.put("freeze_trainable_modules", modules if modules == "all" else ",".join(modules),
                "every parameter of those blocks" if modules == "all" else "only these submodules of those blocks")
        if p["extra_modules"]:
            doc.put("freeze_extra_modules", ",".join(p["extra_modules"]), "trained too, outside the blocks")
    elif ctx.method == "llama_pro":
        n = int(p["num_new_blocks"])
        doc.put("finetuning_type", "freeze", "LLaMA-Pro trains as freeze tuning of the new blocks")
        doc.put("use_llama_pro", True, "the trained blocks are the expanded model's new ones (one every L/N)")
        doc.put("freeze_trainable_layers", n, "the number of new blocks (scripts/llama_pro.py --num_expand)")
        doc.put("freeze_trainable_modules", "all", "every parameter of the new blocks")
        if p["extra_modules"]:
            doc.put("freeze_extra_modules", ",".join(p["extra_modules"]), "trained too, outside the blocks")
        notes.append(f"LLaMA-Pro: LLaMA-Factory trains a model expanded beforehand: run its `python scripts/llama_pro.py "
                     f"--model_name_or_path {ctx.model_ref} --output_dir <expanded> --num_expand {n}` and set "
                     "model_name_or_path to <expanded>")
    else:
        doc.put("finetuning_type", "full", "every weight trains")
        if ctx.method == "galore":
            doc.put("use_galore", True, "GaLore: low-rank projected optimizer state")
            doc.put("galore_target", ",".join(p["target_modules"]), "linear layers whose names contain these")
            doc.put("galore_rank", int(p["rank"]), ctx.why("rank", p["rank"]))
            knob("galore_update_interval", "update_proj_gap", int(p["update_proj_gap"]))
            doc.put("galore_scale", float(p["scale"]), ctx.why("scale", p["scale"]))
            doc.put("galore_proj_type", p["proj_type"])
            if t.optimizer_in_backward:
                doc.put("galore_layerwise", True, "optimizer_in_backward: each weight steps inside backward")
            else:
                doc.put("galore_layerwise", False, "layer-wise GaLore cannot accumulate gradients or run distributed")

    doc.section("dataset")
    doc.put("dataset", DATASET_NAME, f"{ctx.dataset_format} file, see dataset_info.json above")
    doc.put("dataset_dir", dataset_dir)
    template, why_template = template_for(ctx.model_id)
    doc.put("template", template, why_template)
    knob("cutoff_len", "max_seq_length", t.max_seq_length)
    doc.put("packing", bool(t.packing), ctx.why("packing", t.packing))
    if ctx.dataset_format != "text":
        doc.put("train_on_prompt", False, "loss on responses only")
    doc.put("val_size", ctx.val_split, "held-out split to watch eval loss" if ctx.val_split else None)

    doc.section("train")
    knob("per_device_train_batch_size", "per_device_train_batch_size", t.per_device_train_batch_size)
    knob("gradient_accumulation_steps", "gradient_accumulation_steps", t.gradient_accumulation_steps)
    knob("learning_rate", "learning_rate", t.learning_rate)
    doc.put("num_train_epochs", float(t.num_train_epochs), ctx.why("num_train_epochs", t.num_train_epochs))
    knob("lr_scheduler_type", "lr_scheduler_type", t.lr_scheduler_type)
    warmup = ctx.warmup_steps()
    if warmup is not None:
        doc.put("warmup_steps", warmup, ctx.why("warmup_ratio", t.warmup_ratio)
                or f"warmup_ratio {t.warmup_ratio:g} of {ctx.total_steps()} steps")
    else:
        doc.put("warmup_ratio", t.warmup_ratio, "run length unknown; on transformers >= 5.2 use warmup_steps")
    knob("weight_decay", "weight_decay", t.weight_decay)
    knob("max_grad_norm", "max_grad_norm", t.max_grad_norm)
    optim = GALORE_OPTIM.get(t.optim, t.optim) if ctx.method == "galore" else t.optim
    doc.put("optim", optim, "GaLore's base optimizer (LLaMA-Factory builds the GaLore one)" if ctx.method == "galore"
            else ctx.why("optim", t.optim))
    doc.put("bf16", bool(t.bf16), ctx.why("bf16", t.bf16))
    doc.put("fp16", bool(t.fp16), ctx.why("fp16", t.fp16) if t.fp16 else None)
    doc.put("seed", t.seed)
    put_multi_gpu(doc, ctx, "torchrun data parallel")

    doc.section("output")
    doc.put("output_dir", ctx.output_dir)
    doc.put("logging_steps", t.logging_steps)
    doc.put("save_steps", t.save_steps)
    doc.put("plot_loss", True)
    doc.put("report_to", "tensorboard", f"tensorboard --logdir {ctx.output_dir}")
    if ctx.val_split:
        doc.section("eval")
        doc.put("per_device_eval_batch_size", t.per_device_train_batch_size)
        doc.put("eval_strategy", "steps")
        doc.put("eval_steps", t.eval_steps)
    for n in notes:
        doc.comment(f"note: {n}")
    unknown = set(doc.values) - OWN_KEYS - TRAINING_ARG_KEYS
    if unknown:  # a programming error: LLaMA-Factory would refuse the file
        raise AssertionError(f"LLaMA-Factory export wrote unknown keys: {sorted(unknown)}")
    return Rendered(content=doc.render(), files={"dataset_info.json": json.dumps(info, indent=2) + "\n"},
                    command=run[-1], notes=notes)


def _check(ctx: ExportContext) -> None:
    if ctx.training.optim == "lorafa":
        raise AdvisorInputError("config.training.optim", "LLaMA-Factory has no LoRA-FA optimizer (PEFT's "
                                "create_lorafa_optimizer); export with --format script, which passes it to the Trainer",
                                allowed=["adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit"])
    if ctx.method == "longlora":
        if ctx.model_type != "llama":
            raise AdvisorInputError(
                "method", f"LLaMA-Factory's LongLoRA (shift_attn) supports Llama models only; {ctx.model_id} is "
                          f"{ctx.model_type!r}. Export with --format script", allowed=list(METHODS[:4]))
        ratio = float(ctx.peft.get("group_size_ratio", 0.25))
        if abs(ratio - 0.25) > 1e-9:
            raise AdvisorInputError("config.peft.group_size_ratio",
                                    f"LLaMA-Factory fixes the S²-Attn group size at 1/4; got {ratio:g}",
                                    allowed=["0.25"])
    if ctx.method == "galore":
        if ctx.training.optim not in GALORE_OPTIM:
            raise AdvisorInputError("config.training.optim", f"LLaMA-Factory's GaLore has no {ctx.training.optim}",
                                    allowed=list(GALORE_OPTIM))
        if uses_deepspeed(ctx.strategy):
            raise AdvisorInputError(
                "method", f"LLaMA-Factory refuses GaLore with DeepSpeed (\"GaLore and APOLLO are incompatible with "
                          f"DeepSpeed yet\"), and this run needs {ctx.strategy} to fit; export with --format script "
                          "and --format accelerate", allowed=list(METHODS))


FORMAT = register_format(ExportFormat(
    id="llamafactory", tool="LLaMA-Factory", filename="llamafactory_config.yaml", methods=METHODS, refusals=REFUSALS,
    render=render, kinds=("causal_lm",),
    kind_refusal="LLaMA-Factory's SFT data pipeline builds decoder-only sequences; encoder-decoder text models such "
                 "as T5 are not supported",
    summary="LLaMA-Factory YAML + dataset_info.json: llamafactory-cli train config.yaml",
))
