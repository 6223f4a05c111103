"""Bytes per logit element that each loss path keeps live, counted with `LiveBytes` on fake tensors.

    .venv/bin/python -m bench.logit_paths [--seq 512,2048] [--vocab 151936] [--hidden 256] [--batch 1]

Why: the ms-swift benchmark rows (torch 2.1.1, transformers <4.37, accelerate, Qwen-1 remote code, bf16, LoRA with
gradient checkpointing) are under-predicted by ~32 B per logit element at <= 2048 tokens on top of the ~12 B/logit
the simulation counts for current transformers. This measures, for the output head and loss alone (the part that
scales with tokens x vocabulary), the peak live bytes of every candidate path read from the sources:

- ``current``: transformers >= 4.46 `ForCausalLMLoss` (what the simulation runs): bf16 logits, `logits.float()`
  inside the loss, labels shifted instead of logits, `cross_entropy` (log_softmax + nll_loss in fp32).
- ``llama436``: transformers 4.36 `LlamaForCausalLM.forward`: `logits = logits.float()` kept as the output,
  `shift_logits = logits[..., :-1, :].contiguous()` (a second fp32 copy), `CrossEntropyLoss`.
- ``qwen1_autocast``: Qwen-1 `modeling_qwen.py` `QWenLMHeadModel.forward` (no upcast: bf16 `lm_logits`, bf16
  contiguous shift copy, `CrossEntropyLoss`) run under CUDA autocast bf16, as HF Trainer + accelerate run it
  (`cross_entropy` is on CUDA autocast's fp32 list, so its input is cast to fp32 first). CPU autocast has another
  op list, so the cast is written out explicitly here.
- ``qwen1_accelerate_swift``: the same plus accelerate's `convert_outputs_to_fp32` (native AMP wraps
  `model.forward`; outputs' bf16 tensors are copied to fp32) and ms-swift 1.x `Seq2SeqTrainer.compute_loss`
  (`outputs.logits.argmax(dim=2)` for token accuracy); the outputs are dropped when compute_loss returns, before
  `backward` (transformers 4.36 `Trainer.training_step`).
- ``llama436_accelerate_swift``: `llama436` + accelerate + ms-swift (the Yi-34B row: transformers' Llama code).
- ``*_outputs_held``: the same with the outputs (fp32 logits) kept alive through backward, an upper bound for a
  trainer that keeps them (none of the sources read does).

The head input is a (batch, seq, hidden) bf16 leaf that requires grad (the last block's output), the output head
a frozen bf16 (vocab, hidden) weight, as in LoRA. Reported: (peak − the head input, weight and labels) / (batch ×
seq × vocab), for the forward+loss and the backward separately.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F


def _accelerate_fp32(logits: torch.Tensor) -> torch.Tensor:
    # accelerate.utils.operations.convert_to_fp32: `tensor.float()` for every fp16/bf16 tensor of the outputs
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def forward_current(h, w, labels):
    logits = h @ w.t()  # bf16
    # transformers ForCausalLMLoss: upcast, shift the labels (pad), cross_entropy with ignore_index
    up = logits.float()
    shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    loss = F.cross_entropy(up.view(-1, up.size(-1)), shift_labels.view(-1), ignore_index=-100)
    return loss, logits


def forward_llama436(h, w, labels):
    logits = (h @ w.t()).float()
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    return loss, logits


def forward_qwen1_autocast(h, w, labels):
    lm_logits = h @ w.t()  # bf16
    shift_logits = lm_logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    # CUDA autocast: cross_entropy is an fp32 op -> its input is cast to fp32 before log_softmax/nll_loss
    loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)).float(), shift_labels.view(-1))
    return loss, lm_logits


PATHS = {
    "current": (forward_current, False, False),
    "llama436": (forward_llama436, False, False),
    "qwen1_autocast": (forward_qwen1_autocast, False, False),
    "qwen1_accelerate_swift": (forward_qwen1_autocast, True, False),
    "llama436_accelerate_swift": (forward_llama436, True, False),
    "qwen1_accelerate_swift_outputs_held": (forward_qwen1_autocast, True, True),
    "current_accelerate_outputs_held": (forward_current, True, True),
}


def measure(path: str, batch: int, seq: int, hidden: int, vocab: int) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from advisor.memory.counter import LiveBytes

    fwd, accelerate_swift, hold = PATHS[path]
    with FakeTensorMode(allow_non_fake_inputs=True):
        h = torch.empty(batch, seq, hidden, dtype=torch.bfloat16).requires_grad_(True)
        w = torch.empty(vocab, hidden, dtype=torch.bfloat16)
        labels = torch.empty(batch, seq, dtype=torch.long)
        counter = LiveBytes()
        counter.register([h, w], "weights")
        counter.register([labels], "inputs")
        base = counter.current_bytes
        with counter:
            with counter.phase("forward"):
                loss, logits = fwd(h, w, labels)
                outputs = {"loss": loss, "logits": logits}
                del logits
                if accelerate_swift:
                    outputs = {k: _accelerate_fp32(v) for k, v in outputs.items()}
                    loss = outputs["loss"]
                    outputs["logits"].argmax(dim=2)[..., :-1]  # ms-swift token accuracy (a per-token int64)
                if not hold:
                    del outputs
            with counter.phase("backward"):
                loss.backward()
            held = outputs if hold else None
            del held
        rep = counter.report()
    n = batch * seq * vocab
    phases = {k: v.peak_bytes for k, v in rep.phases.items() if k in ("forward", "backward")}
    return {"path": path, "batch": batch, "seq": seq, "hidden": hidden, "vocab": vocab,
            "forward_b_per_logit": (phases.get("forward", base) - base) / n,
            "backward_b_per_logit": (phases.get("backward", base) - base) / n,
            "peak_b_per_logit": (rep.peak_bytes - base) / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", default="512,2048")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [measure(p, args.batch, int(s), args.hidden, args.vocab) for s in args.seq.split(",") for p in PATHS]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'path':38s} {'seq':>5s} {'fwd B/logit':>11s} {'bwd B/logit':>11s} {'peak B/logit':>12s}")
    for r in rows:
        print(f"{r['path']:38s} {r['seq']:5d} {r['forward_b_per_logit']:11.2f} {r['backward_b_per_logit']:11.2f} "
              f"{r['peak_b_per_logit']:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
