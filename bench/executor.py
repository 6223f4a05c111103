"""Throughput of the embedded trainer (`advisor.train.run_training`) against a plain transformers `Trainer` + PEFT
script, on the same small model, method, data and precision, in the same run.

- Model: a Llama-architecture model with random weights built by `advisor.demo` with bigger dims (hidden 384,
  6 layers, ~11M parameters) and the demo tokenizer (vocab 512). No download.
- Data: completion-format examples of very different lengths (prompt + 1..24 answer sentences: ~20 to ~400
  tokens), response-only labels, 10% validation split — both sides get exactly the same tokenized examples
  (`advisor.train.data.load_dataset`), so the only differences are batching and the training loop.
- Method: LoRA r=16, alpha=32, dropout 0.05 on q_proj/v_proj; AdamW lr 5e-4, cosine, warmup 3%, grad clip 1.0;
  float32 on CPU (bf16 on CUDA) on both sides; one epoch; seed 42.
- Baseline: `Trainer` with `DataCollatorForSeq2Seq(padding="longest")` (each batch padded to its longest example,
  labels padded with -100), `per_device_train_batch_size=6`, nothing else changed from the defaults that matter
  (no group_by_length, no packing: the ordinary script people write).
- Executor: `run_training` with `packing=True`, rows of up to 512 tokens, micro-batch 2 (about the same real
  tokens per optimizer step as 6 examples), position ids restarting per example (no cross-example attention).
- tokens/s = real (non-padding) tokens trained / training-loop seconds. The baseline's seconds are Trainer's
  `train_runtime`; the executor's are the sum of its step times (`metrics.train_seconds`); the executor's wall
  time for the whole call (load, estimate, eval before/after, save) is reported too.
- Loss: the validation loss after training, computed by the same function for both (token-weighted next-token
  cross-entropy on the validation split).

On CPU both sides run with the same number of torch threads (`--threads`, default 1: on a shared 2-core host, two
OpenMP threads competing with other processes ran 3-4x slower than one).

Run: `HF_HUB_OFFLINE=1 .venv/bin/python -m bench.executor [--examples 240] [--threads 1] [--out bench/results/executor.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.accuracy import environment, loadavg, write_json

DEFAULT_OUT = "bench/results/executor.json"
MODEL_DIMS = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=6, max_position_embeddings=1024)
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
TRAINING = {"learning_rate": 5e-4, "num_train_epochs": 1, "warmup_ratio": 0.03, "lr_scheduler_type": "cosine",
            "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": 42, "max_seq_length": 512,
            "logging_steps": 1000, "save_steps": 100000, "eval_steps": 100000, "optim": "adamw_torch"}
BASELINE_BATCH = 6
PACKED_MICRO = 2


def write_data(path: Path, n: int, seed: int = 0) -> Path:
    from advisor.demo import _TOPICS

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, a = _TOPICS[rng.randrange(len(_TOPICS))]
        k = rng.choice([1, 1, 2, 3, 4, 6, 9, 14, 20, 24])  # long-tailed lengths, as real instruction data
        answer = " ".join(_TOPICS[rng.randrange(len(_TOPICS))][1] for _ in range(k - 1))
        rows.append({"prompt": q + "\n", "completion": (a + " " + answer).strip()})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_loss(model, val, pad_id, device) -> float:
    import torch

    from advisor.train.data import collate, to_device
    from advisor.train.runner import _eval_loss_sum

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val), 8):
            batch = to_device(collate(val[i:i + 8], pad_id, "causal_lm"), device)
            loss, n = _eval_loss_sum(model, batch, "causal_lm")
            total += float(loss)
            count += n
    return total / count


def run_baseline(model_dir: Path, data, tokenizer, workdir: Path, device: str, bf16: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    torch.manual_seed(TRAINING["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                                             lora_dropout=LORA["lora_dropout"], target_modules=LORA["target_modules"]))
    train = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
             for e in data.train_examples]
    args = TrainingArguments(
        output_dir=str(workdir / "baseline"), per_device_train_batch_size=BASELINE_BATCH, num_train_epochs=1,
        learning_rate=TRAINING["learning_rate"], lr_scheduler_type="cosine", warmup_steps=TRAINING["warmup_ratio"],  # a ratio in transformers 5
        max_grad_norm=1.0, weight_decay=0.0, seed=TRAINING["seed"], logging_steps=1000, save_strategy="no",
        eval_strategy="no", report_to=[], bf16=bf16, use_cpu=device == "cpu", dataloader_num_workers=0,
        remove_unused_columns=False, optim="adamw_torch", disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    out = trainer.train()
    tokens = sum(len(e.input_ids) for e in data.train_examples)
    seconds = out.metrics["train_runtime"]
    return {"tokens": tokens, "train_seconds": seconds, "tokens_per_s": tokens / seconds,
            "steps": out.global_step, "final_train_loss": out.training_loss,
            "eval_loss": eval_loss(trainer.model, data.val, tokenizer.pad_token_id, model.device)}


def run_executor(model_dir: Path, data_path: Path, workdir: Path, device: str, bf16: bool) -> dict:
    from advisor.train import normalize_job, run_training

    job = normalize_job({"model": str(model_dir), "method": "lora",
                         "config": {"peft": LORA, "training": {**TRAINING, "packing": True, "bf16": bf16,
                                                               "per_device_train_batch_size": PACKED_MICRO,
                                                               "gradient_accumulation_steps": 1}},
                         "dataset": {"path": str(data_path), "format": "completion", "validation_split": 0.1}})
    steps = []
    t0 = time.perf_counter()
    result = run_training(job, output_dir=workdir / "executor", device=device, resume=None,
                          on_event=lambda e: steps.append(e) if e["type"] == "step" else None)
    wall = time.perf_counter() - t0
    m = result["metrics"]
    # every step's seconds, the first two (run under the live-bytes counter off CUDA, slower) included: the
    # baseline's train_runtime includes its first steps too
    tokens = m["train_tokens"]
    return {"tokens": tokens, "train_seconds": m["train_seconds"], "tokens_per_s": tokens / m["train_seconds"],
            "tokens_per_s_reported": m["tokens_per_s"],
            "steps": result["step"], "final_train_loss": m["loss"], "eval_loss": m["eval_loss"],
            "wall_seconds_whole_call": round(wall, 2), "eval_loss_before": m["eval_loss_before"]}


class _Data:
    def __init__(self, data):
        self.train_examples, self.val = data.train, data.val


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=240)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both sides (1 avoids OpenMP oversubscription on a shared host)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)

    from advisor.demo import train_tokenizer, write_tiny_model
    from advisor.train.data import load_dataset

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["ADVISOR_DATA_ROOT"] = str(work / "var")
        tok = train_tokenizer()
        model_dir = write_tiny_model(work / "model", "llama", tok, **MODEL_DIMS)
        n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir)
                       .parameters())
        data_path = write_data(work / "train.jsonl", args.examples)
        data = load_dataset(data_path, "completion", tok, kind="causal_lm", max_seq_length=TRAINING["max_seq_length"],
                            validation_split=0.1, seed=TRAINING["seed"])
        lengths = [len(e.input_ids) for e in data.train]
        load0 = loadavg()
        baseline = run_baseline(model_dir, _Data(data), tok, work, device, bf16)
        executor = run_executor(model_dir, data_path, work, device, bf16)
        load1 = loadavg()
    ratio = executor["tokens_per_s"] / baseline["tokens_per_s"]
    loss_diff = abs(executor["eval_loss"] - baseline["eval_loss"]) / baseline["eval_loss"]
    result = {
        "benchmark": "executor throughput vs transformers Trainer + PEFT (LoRA)",
        "model": {"arch": "llama", **MODEL_DIMS, "vocab": len(tok), "params": n_params},
        "data": {"train_examples": len(data.train), "val_examples": len(data.val), "min_tokens": min(lengths),
                 "max_tokens": max(lengths), "mean_tokens": round(sum(lengths) / len(lengths), 1),
                 "train_tokens": sum(lengths)},
        "device": device, "precision": "bf16" if bf16 else "fp32",
        "torch_threads": torch.get_num_threads() if device == "cpu" else None,
        "lora": LORA, "training": TRAINING, "baseline_batch": BASELINE_BATCH, "executor_micro_batch_packed": PACKED_MICRO,
        "baseline": baseline, "executor": executor,
        "speedup_tokens_per_s": round(ratio, 3), "eval_loss_rel_diff": round(loss_diff, 4),
        "goals": {"speedup_ge_1.3": ratio >= 1.3, "eval_loss_within_2pct": loss_diff <= 0.02},
        "loadavg_before_after": [load0, load1],
        "environment": environment(),
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python -m bench.executor " + " ".join(argv or sys.argv[1:]),
    }
    write_json(Path(args.out), result)
    print(f"model {n_params / 1e6:.1f}M params, {len(data.train)} train examples ({min(lengths)}-{max(lengths)} tokens, "
          f"mean {sum(lengths) / len(lengths):.0f}), {device} {result['precision']}")
    print(f"{'':10} {'tokens/s':>10} {'seconds':>9} {'steps':>6} {'eval loss':>10} {'train loss':>11}")
    for name, r in (("Trainer", baseline), ("executor", executor)):
        print(f"{name:10} {r['tokens_per_s']:10.1f} {r['train_seconds']:9.2f} {r['steps']:6d} {r['eval_loss']:10.4f} "
              f"{r['final_train_loss']:11.4f}")
    print(f"speed-up {ratio:.2f}x (goal >= 1.3x); eval loss difference {loss_diff * 100:.2f}% (goal <= 2%)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
