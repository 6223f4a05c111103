"""Offline demo assets: tiny models with random weights, a locally trained tokenizer, sample datasets.

`advisor demo-assets DIR` writes everything needed to try every feature with no network:

    DIR/tiny-llama/   causal LM (Llama architecture) + tokenizer, loadable with from_pretrained
    DIR/tiny-gpt2/    causal LM with biases (BitFit on existing biases)
    DIR/tiny-t5/      seq2seq LM (T5 architecture)
    DIR/data/{alpaca,chat,completion,text}.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]

_TOPICS = [
    ("What is LoRA?", "LoRA trains two small low-rank matrices beside each frozen weight."),
    ("Why use QLoRA?", "QLoRA stores the frozen base in 4-bit NF4, so a large model fits on a small GPU."),
    ("When should I not fine-tune?", "Try prompting first; use retrieval when the facts change often."),
    ("What does gradient checkpointing do?", "It recomputes activations in the backward pass to save memory."),
    ("How many examples do I need?", "A few hundred good examples can teach a format; thousands teach a domain."),
    ("What is a learning rate?", "The step size of each update; adapters use larger ones than full fine-tuning."),
    ("What is an epoch?", "One pass over the whole training set."),
    ("Summarise: the model was trained for three epochs.", "Three epochs of training."),
    ("Translate to French: good morning", "bonjour"),
    ("Add 12 and 30.", "12 + 30 = 42."),
]


def sample_records(n: int = 64, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [_TOPICS[rng.randrange(len(_TOPICS))] for _ in range(n)]


def corpus(n: int = 400) -> list[str]:
    texts = [f"{q} {a}" for q, a in sample_records(n, seed=1)]
    texts += ["### Instruction:\n### Input:\n### Response:\n", "user assistant system"]
    return texts


def train_tokenizer(texts: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in well under a second, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts or corpus(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    hf.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return hf


def tiny_config(arch: str, vocab_size: int, **overrides):
    """Small configs of real architectures (random weights); `overrides` change any field."""
    from transformers import GPT2Config, LlamaConfig, T5Config

    if arch == "llama":
        base = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
        return LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=3, **{**base, **overrides})
    if arch == "gpt2":
        base = dict(n_embd=128, n_layer=2, n_head=4, n_positions=1024)
        return GPT2Config(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=3, **{**base, **overrides})
    if arch == "t5":
        base = dict(d_model=128, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=32)
        return T5Config(vocab_size=vocab_size, decoder_start_token_id=3, pad_token_id=3, eos_token_id=2,
                        **{**base, **overrides})
    raise ValueError(f"unknown tiny architecture {arch!r}; allowed: llama, gpt2, t5")


def write_tiny_model(directory: Path, arch: str = "llama", tokenizer=None, seed: int = 0, dtype: str | None = None,
                     **overrides) -> Path:
    """A model of `arch` with random weights and `tokenizer` saved under `directory`; `dtype` ("bfloat16") builds and
    saves it in that dtype (half the bytes to write and read for the larger calibration shapes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    tokenizer = tokenizer or train_tokenizer()
    # a `vocab_size` override gives the model more token ids than the tokenizer has (a real vocabulary's embedding
    # and logits sizes; the probes' batches draw random ids from the model's vocabulary)
    cfg = tiny_config(arch, overrides.pop("vocab_size", len(tokenizer)), **overrides)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=getattr(torch, dtype)) if dtype else auto.from_config(cfg)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_datasets(directory: Path, n: int = 64) -> dict[str, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recs = sample_records(n)
    rows = {
        "alpaca": [{"instruction": q, "input": "", "output": a} for q, a in recs],
        "chat": [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in recs],
        "completion": [{"prompt": q, "completion": " " + a} for q, a in recs],
        "text": [{"text": f"{q} {a}"} for q, a in recs],
    }
    paths = {}
    for name, items in rows.items():
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
        paths[name] = path
    return paths


DEMO_ROWS = 1200  # above the seeds' 1,000-example line, so the rules recommend fine-tuning the demo model


def write_demo_assets(directory: str | Path, rows: int = DEMO_ROWS) -> dict[str, str]:
    directory = Path(directory)
    tok = train_tokenizer()
    out = {arch: str(write_tiny_model(directory / f"tiny-{arch}", arch, tok)) for arch in ("llama", "gpt2", "t5")}
    out.update({f"data/{k}": str(v) for k, v in write_datasets(directory / "data", n=rows).items()})
    return out
