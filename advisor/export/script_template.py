#!/usr/bin/env python
# ==== HEADER ====
"""Standalone fine-tuning script (template). `advisor export --format script` fills in the marked regions."""
# ==== END HEADER ====

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
import random
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

# ==== CONFIG ====
MODEL = "path/or/hub-id"
DATA = "data/train.jsonl"
DATA_FORMAT = "alpaca"  # alpaca | chat | completion | text | auto
OUTPUT_DIR = "outputs/run"
VAL_SPLIT = 0.1
METHOD = "lora"
PEFT = {}
QUANTIZATION = None
TRAINING = {}
# ==== END CONFIG ====

IGNORE = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
TF5 = int(transformers.__version__.split(".")[0]) >= 5


# --------------------------------------------------------------------------------------------------- data
def read_rows(path: str) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "chat"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "completion"
    if "text" in row:
        return "text"
    raise SystemExit(f"cannot tell the data format from the fields {sorted(row)}; pass --data-format")


def chat_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns (the only trained tokens)."""
    if tok.chat_template:
        def render(msgs, gen=False):
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        text = render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = render(messages[:i], True) if i else ""
            upto = render(messages[: i + 1])
            if text.startswith(upto) and upto.startswith(before):
                spans.append((len(before), len(upto)))
        if spans:
            return text, spans
    text, spans = "", []  # no chat template: a plain "role: content" transcript
    for m in messages:
        head = f"{m.get('role', 'user')}: "
        start = len(text) + len(head)
        text += head + str(m.get("content", "")) + "\n"
        if m.get("role") == "assistant":
            spans.append((start, len(text)))
    return text, spans


def prompt_and_response(row: dict, fmt: str) -> tuple[str, str]:
    if fmt == "alpaca":
        template = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=row.get("instruction", ""), input=row.get("input", "")), str(row["output"])
    if fmt == "completion":
        return str(row["prompt"]), str(row["completion"])
    if fmt == "chat":  # seq2seq: everything before the last assistant turn is the input
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m.get("role") == "assistant")
        return "\n".join(f"{m['role']}: {m['content']}" for m in msgs[:last]), str(msgs[last]["content"])
    raise SystemExit(f"format {fmt!r} needs a causal language model")


def encode(row: dict, fmt: str, tok, max_len: int, seq2seq: bool, target_len: int | None = None) -> dict | None:
    """input_ids / labels with the prompt masked out (IGNORE), so the loss is on responses only (seq2seq: targets
    truncated to target_len, default max_len)."""
    eos = tok.eos_token or ""
    if seq2seq:
        prompt, response = prompt_and_response(row, fmt)
        ids = tok(prompt, truncation=True, max_length=max_len)["input_ids"]
        labels = tok(text_target=response, truncation=True, max_length=target_len or max_len)["input_ids"]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
    if fmt == "text":
        ids = tok(str(row["text"]) + eos, truncation=True, max_length=max_len)["input_ids"]
        labels = list(ids)
    elif fmt == "chat":
        text, spans = chat_spans(tok, row["messages"])
        enc = tok(text, add_special_tokens=False, truncation=True, max_length=max_len, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [t if any(s <= a < e for s, e in spans) else IGNORE for t, (a, _b) in zip(ids, enc["offset_mapping"])]
    else:
        prompt, response = prompt_and_response(row, fmt)
        p_ids = tok(prompt)["input_ids"]
        r_ids = tok(response + eos, add_special_tokens=False)["input_ids"]
        ids = (p_ids + r_ids)[:max_len]
        labels = ([IGNORE] * len(p_ids) + r_ids)[:max_len]
    if all(x == IGNORE for x in labels):
        return None  # the response was truncated away: nothing to learn from this row
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def pack(examples: list[dict], block: int) -> list[dict]:
    """Concatenate examples into blocks of `block` tokens (labels keep their masks)."""
    ids, labels, out = [], [], []
    for ex in examples:
        ids += ex["input_ids"]
        labels += ex["labels"]
        while len(ids) >= block:
            out.append({"input_ids": ids[:block], "attention_mask": [1] * block, "labels": labels[:block]})
            ids, labels = ids[block:], labels[block:]
    if ids:
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return [b for b in out if any(x != IGNORE for x in b["labels"])]


# --------------------------------------------------------------------------------------------------- model
def device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def load_model(name: str, seq2seq: bool):
    dtype = getattr(torch, TRAINING["torch_dtype"])
    attn = TRAINING["attn_implementation"]
    if attn == "flash_attention_2" and not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
        attn = "sdpa"
    kwargs = {"dtype" if TF5 else "torch_dtype": dtype, "attn_implementation": attn}
    if QUANTIZATION and QUANTIZATION.get("quant_method") == "gptq":
        # a GPTQ checkpoint: its config.json's quantization_config loads it (needs gptqmodel and optimum)
        kwargs["device_map"] = {"": device()}
    elif QUANTIZATION:
        from transformers import BitsAndBytesConfig

        q = dict(QUANTIZATION)
        q["bnb_4bit_compute_dtype"] = getattr(torch, q["bnb_4bit_compute_dtype"])
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            q["bnb_4bit_quant_storage"] = dtype  # FSDP shards the 4-bit weights as this dtype
        kwargs["quantization_config"] = BitsAndBytesConfig(**q)
        kwargs["device_map"] = {"": device()}
    rope = TRAINING.get("rope_scaling")
    if rope:  # position interpolation past the model's max_position_embeddings
        config = AutoConfig.from_pretrained(name)
        original = config.max_position_embeddings
        key = "rope_parameters" if TF5 else "rope_scaling"  # transformers 4 names it rope_scaling, with "type"
        params = dict(getattr(config, key, None) or {})
        params.update({"rope_type" if TF5 else "type": rope["type"], "factor": float(rope["factor"])})
        if rope["type"] == "yarn":
            params["original_max_position_embeddings"] = original
        setattr(config, key, params)
        config.max_position_embeddings = int(original * rope["factor"])
        kwargs["config"] = config
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    return auto.from_pretrained(name, **kwargs)


def peft_task_type(seq2seq: bool) -> str:
    return "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"


# ==== METHOD ====
CALLBACKS: list = []


def apply_method(model, seq2seq: bool, total_steps: int):
    """Make the model trainable with the method (template: overwritten by the export)."""
    return model


def trainer_extras() -> dict:
    """Extra TrainingArguments the method needs."""
    return {}


def save(trainer, model, output_dir: str) -> None:
    """Write what the method trained (template: the Trainer's own save)."""
    trainer.save_model(output_dir)
# ==== END METHOD ====


# --------------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=MODEL, help="Hub id or local directory (default: %(default)s)")
    ap.add_argument("--data", default=DATA, help="JSONL/JSON file (default: %(default)s)")
    ap.add_argument("--data-format", default=DATA_FORMAT, choices=["auto", "alpaca", "chat", "completion", "text"])
    ap.add_argument("--output", default=OUTPUT_DIR, help="where the adapter/model is saved (default: %(default)s)")
    ap.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (default: whole epochs)")
    ap.add_argument("--epochs", type=float, default=TRAINING["num_train_epochs"])
    ap.add_argument("--seq-len", type=int, default=TRAINING["max_seq_length"], help="tokens per example")
    ap.add_argument("--target-len", type=int, default=TRAINING.get("max_target_length"),
                    help="encoder-decoder models: target tokens per example (default: --seq-len)")
    ap.add_argument("--val-split", type=float, default=VAL_SPLIT)
    return ap.parse_args()


def training_arguments(args, has_eval: bool, gradient_checkpointing: bool) -> TrainingArguments:
    t = TRAINING
    fields = {f for f in inspect.signature(TrainingArguments).parameters}
    bf16, fp16 = t["bf16"], t["fp16"]
    if fp16 and not torch.cuda.is_available():
        print("note: fp16 mixed precision needs a GPU; training in float32 on CPU")
        fp16 = False
    kw = dict(
        output_dir=args.output, per_device_train_batch_size=t["per_device_train_batch_size"],
        per_device_eval_batch_size=t["per_device_train_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"], num_train_epochs=args.epochs,
        max_steps=args.max_steps, learning_rate=t["learning_rate"], lr_scheduler_type=t["lr_scheduler_type"],
        weight_decay=t["weight_decay"], max_grad_norm=t["max_grad_norm"], optim="adamw_torch" if t["optim"] == "lorafa" else t["optim"], bf16=bf16, fp16=fp16,
        logging_steps=t["logging_steps"], save_steps=t["save_steps"], eval_steps=t["eval_steps"], seed=t["seed"],
        save_strategy="steps", use_cpu=not torch.cuda.is_available(),
        report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else "none",
    )
    # transformers 5 renamed gradient checkpointing to activation checkpointing
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kw[ckpt] = gradient_checkpointing
    if gradient_checkpointing:
        kw[f"{ckpt}_kwargs"] = {"use_reentrant": bool(t.get("gradient_checkpointing_reentrant", False))}
    if t.get("activation_offloading"):
        enable = getattr(transformers.PreTrainedModel, "activation_checkpointing_enable", None)
        if gradient_checkpointing and enable is not None and "offload" in inspect.signature(enable).parameters:
            kw[f"{ckpt}_kwargs"]["offload"] = True  # the checkpointed blocks' inputs wait in pinned host memory
        else:
            print("note: activation_offloading needs gradient checkpointing and transformers' offload option "
                  "(activation_checkpointing_kwargs offload); training keeps the activations on the device "
                  "(more memory than estimated)")
    # transformers >= 5.2 folds warmup_ratio into warmup_steps (a float < 1 is a ratio)
    kw["warmup_ratio" if "warmup_ratio" in fields else "warmup_steps"] = t["warmup_ratio"]
    kw["eval_strategy" if "eval_strategy" in fields else "evaluation_strategy"] = "steps" if has_eval else "no"
    if t.get("torch_compile"):
        kw["torch_compile"] = True  # the Trainer compiles the model (inductor on a GPU)
    loss = t.get("cross_entropy", "standard")
    if loss == "fused_linear":
        if torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") and "use_liger_kernel" in fields:
            kw["use_liger_kernel"] = True  # Liger's fused linear cross-entropy; its other kernels stay off
            kw["liger_kernel_config"] = {"fused_linear_cross_entropy": True, "cross_entropy": False, "rope": False,
                                         "rms_norm": False, "swiglu": False}
        else:
            print("note: cross_entropy fused_linear needs Liger Kernel on a GPU (pip install liger-kernel); training "
                  "with the standard loss, which holds every position's fp32 logits (more memory than estimated)")
    elif loss == "chunked":
        print("note: cross_entropy chunked (torchtune's loss) has no Trainer switch; training with the standard loss, "
              "which holds every position's fp32 logits (more memory than estimated)")
    kw.update(trainer_extras())
    if t.get("optimizer_in_backward") and not str(kw.get("optim", "")).endswith("_layerwise"):
        print("note: optimizer_in_backward has no Trainer switch for this optimizer; every gradient is kept until "
              "the optimizer step (more memory than estimated)")
    return TrainingArguments(**{k: v for k, v in kw.items() if k in fields})


def main() -> None:
    args = parse_args()
    transformers.set_seed(TRAINING["seed"])
    seq2seq = bool(getattr(AutoConfig.from_pretrained(args.model), "is_encoder_decoder", False))
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token

    rows = read_rows(args.data)
    fmt = detect_format(rows[0]) if args.data_format == "auto" else args.data_format
    examples = [ex for ex in (encode(r, fmt, tok, args.seq_len, seq2seq, args.target_len) for r in rows)
                if ex is not None]
    if not examples:
        raise SystemExit(f"no trainable examples in {args.data}")
    random.Random(TRAINING["seed"]).shuffle(examples)
    n_val = int(len(examples) * args.val_split)
    val, train = examples[:n_val], examples[n_val:]
    if (TRAINING["packing"] or METHOD == "longlora") and not seq2seq:
        train = pack(train, args.seq_len)  # LongLoRA: fixed-length, unpadded blocks so S²-Attn groups apply

    world = int(os.environ.get("WORLD_SIZE", 1))
    per_step = TRAINING["per_device_train_batch_size"] * TRAINING["gradient_accumulation_steps"] * world
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(len(train) / per_step) * math.ceil(args.epochs)

    # FSDP's own activation checkpointing (accelerate config) replaces the Trainer's
    fsdp_ckpt = os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true"
    gradient_checkpointing = bool(TRAINING["gradient_checkpointing"]) and not fsdp_ckpt
    model = load_model(args.model, seq2seq)
    model.config.use_cache = False
    if gradient_checkpointing and METHOD not in ("full", "galore", "freeze", "llama_pro"):
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need an input with grad
    model = apply_method(model, seq2seq, total_steps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"{METHOD}: {trainable:,} of {total:,} parameters train ({100 * trainable / max(total, 1):.3f}%); "
          f"{len(train)} train / {len(val)} eval examples; {total_steps} steps")

    optimizers = (None, None)  # the Trainer's own, from TrainingArguments.optim
    if TRAINING["optim"] == "lorafa":  # PEFT's LoRA-FA: A frozen, B's gradient projected through A (no Trainer name)
        from peft.optimizers import create_lorafa_optimizer

        optimizers = (create_lorafa_optimizer(model, r=PEFT["r"], lora_alpha=PEFT["lora_alpha"],
                                              lr=TRAINING["learning_rate"], weight_decay=TRAINING["weight_decay"]), None)
    trainer = Trainer(
        model=model,
        optimizers=optimizers,
        args=training_arguments(args, bool(val), gradient_checkpointing),
        train_dataset=train,
        eval_dataset=val or None,
        data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE, padding=True),
        processing_class=tok,
        callbacks=[cb(model) for cb in CALLBACKS],
    )
    result = trainer.train()
    save(trainer, model, args.output)
    tok.save_pretrained(args.output)
    summary = {"method": METHOD, "model": args.model, "steps": result.global_step,
               "train_loss": result.training_loss, "trainable_params": trainable}
    if torch.cuda.is_available():
        summary["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    Path(args.output, "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
