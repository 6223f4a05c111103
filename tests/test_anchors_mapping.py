"""The fixed rules that map a published measurement (a CSV row) to an estimate request (`bench/anchors.py`): the
spellings sources use for methods, ranks, targets, precisions, optimizers and GPUs. No estimation runs here."""

from __future__ import annotations

import pytest

from bench.anchors import map_gpu, map_method, map_optimizer, map_row
from advisor.schemas import EstimateRequest

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize("text, method, peft", [
    ("lora r8 (q,v)", "lora", {"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    ("LoRA r=16", "lora", {"r": 16}),
    ("LoRA (rank 64, alpha 16)", "lora", {"r": 64}),
    ("lora-r8", "lora", {"r": 8}),
    ("lora r16 (q_proj, k_proj, v_proj, o_proj)", "lora", {"r": 16, "target_modules": QKVO}),
    ("LoRA r16 qkvo", "lora", {"r": 16, "target_modules": QKVO}),
    ("LoRA r=8 q,v", "lora", {"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    ("LoRA r16 all linear layers", "lora", {"r": 16, "target_modules": "all-linear"}),
    ("lora r16 all", "lora", {"r": 16, "target_modules": "all-linear"}),
    ("rsLoRA r16", "lora", {"r": 16, "use_rslora": True}),
    ("DoRA r32", "lora", {"r": 32, "use_dora": True}),
    ("QLoRA", "qlora", {}),
    ("4-bit QLoRA r=64", "qlora", {"r": 64}),
    ("LoRA 4-bit (nf4)", "qlora", {}),
    ("QDoRA r8", "qlora", {"r": 8, "use_dora": True}),
    ("Full fine-tuning", "full", {}),
    ("full-parameter", "full", {}),
    ("Prefix Tuning", "prefix_tuning", {}),
    ("prompt tuning (20 virtual tokens)", "prompt_tuning", {"num_virtual_tokens": 20}),
    ("LongLoRA", "longlora", {}),
    ("BitFit", "bitfit", {}),
    ("GaLore rank 128", "galore", {"rank": 128}),
    ("IA3", "ia3", {}),
    ("LoHa r32", "peft", {"peft_type": "LOHA", "r": 32}),
    ("freeze", "freeze", {"trainable_layers": 2}),
    ("freeze (last 4 layers)", "freeze", {"trainable_layers": 4}),
    ("full + LISA (2 layers)", "freeze", {"trainable_layers": -2, "extra_modules": ["embed_tokens", "norm", "lm_head"]}),
    ("llama-pro (4 blocks)", "llama_pro", {"num_new_blocks": 4}),
    ("LLaMA-Pro", "llama_pro", {}),
])
def test_method_spellings(text, method, peft):
    got, got_peft, reason = map_method(text)
    assert reason is None and got == method
    assert got_peft == peft


@pytest.mark.parametrize("text", ["qlora (unsloth)", "lora r8 (unsloth)", "some new method"])
def test_methods_not_modelled_are_skipped_with_a_reason(text):
    method, _, reason = map_method(text)
    assert method is None and reason


@pytest.mark.parametrize("text, expected", [
    ("AdamW", "adamw_torch"), ("adamw_torch_fused", "adamw_torch_fused"), ("AdamW (fused)", "adamw_torch_fused"),
    ("adamw_bnb_8bit", "adamw_8bit"), ("8-bit AdamW", "adamw_8bit"), ("PagedAdamW8bit", "paged_adamw_8bit"),
    ("paged_adamw_32bit (optimizer_in_bwd)", "paged_adamw_32bit"), ("AdamW (optimizer_in_bwd)", "adamw_torch"),
    ("Adafactor", "adafactor"), ("SGD", "sgd"), ("Lion", "lion_32bit"), ("paged_lion_8bit", "paged_lion_8bit"),
    ("Sophia", None), ("lora-fa", "lorafa"),
])
def test_optimizer_spellings(text, expected):
    assert map_optimizer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("A100-80GB", ("a100-80gb", 1, None)),
    ("NVIDIA A100-SXM4-80GB", ("a100-80gb", 1, None)),
    ("RTX4090-24GB", ("rtx-4090", 1, None)),
    ("A40", ("a40", 1, None)),
    ("2xA100-80GB", ("a100-80gb", 2, "ddp")),
    ("4x A100-80GB-DDP", ("a100-80gb", 4, "ddp")),
    ("4xA100-80GB-ZeRO2", ("a100-80gb", 4, "zero2")),
    ("8xH100-80GB-ZeRO3", ("h100-sxm", 8, "zero3")),
    ("2xRTX3090-24GB-FSDP-offload", ("rtx-3090", 2, "zero3_offload_params")),
    ("1xA100-80GB", ("a100-80gb", 1, None)),
])
def test_gpu_spellings(text, expected):
    assert map_gpu(text) == expected


def test_an_unknown_card_with_its_memory_stated_maps_to_a_card_of_that_memory():
    from advisor.catalog.gpus import resolve_gpu

    card, count, _ = map_gpu("Quadro RTX 8000 48GB")
    assert count == 1 and 44 <= resolve_gpu(card).memory_gib <= 48
    assert map_gpu("TPU v4")[0] is None


def _row(**over) -> dict:
    row = {"source": "a blog post", "model": "Llama-2-7b-hf", "params_b": "6.74", "method": "lora r8",
           "precision": "bf16", "batch": "2", "seq_len": "1024", "grad_ckpt": "on", "optimizer": "AdamW",
           "gpu": "A100-80GB", "peak_gb": "20", "kind": "measured"}
    return {**row, **over}


@pytest.mark.parametrize("precision, method, quantization", [
    ("int4+bf16", "lora r8", {}),                               # a 4-bit base under LoRA is QLoRA
    ("nf4+bf16", "lora r8", {}),
    ("fp4", "qlora r8", {"bnb_4bit_quant_type": "fp4"}),
    ("int8+bf16", "lora r8", {"load_in_8bit": True}),
    ("bf16", "lora r8 8-bit base", {"load_in_8bit": True}),
    ("gptq-int4+fp16", "lora r8", {"quant_method": "gptq", "bits": 4, "group_size": 128}),
])
def test_quantized_bases_from_the_precision_or_the_method(precision, method, quantization):
    payload, reason = map_row(_row(precision=precision, method=method))
    assert reason is None and payload["method"] == "qlora"
    assert payload["config"].get("quantization", {}) == quantization
    EstimateRequest.model_validate(payload)  # a valid request


def test_a_row_maps_to_a_valid_request_for_newly_catalogued_models():
    for model in ("Mistral-7B-Instruct-v0.2", "Qwen2-7B-Instruct", "Qwen3-8B", "CodeLlama-13b-hf", "opt-6.7b",
                  "pythia-1.4b", "gpt-j-6b", "flan-t5-xxl", "gemma-2-2b-it", "phi-4", "llama-7b"):
        payload, reason = map_row(_row(model=model))
        assert reason is None, (model, reason)
        EstimateRequest.model_validate(payload)


def test_a_galore_8bit_optimizer_is_not_an_8bit_base():
    payload, reason = map_row(_row(method="full + galore r1024 8-bit per-layer", optimizer="galore_adamw_8bit_layerwise"))
    assert reason is None and payload["method"] == "galore" and "quantization" not in payload["config"]
    assert payload["config"]["training"]["optim"] == "galore_adamw_8bit"


@pytest.mark.parametrize("source, method, expected", [
    ("a run on bitsandbytes 0.41.1", "qlora r8", "0.41.1"),              # the version the source names
    ("Lightning-AI/litgpt config_hub/finetune/README.md", "qlora r8", "0.42.0"),  # litgpt's pinned one
    ("Lightning-AI/litgpt config_hub/finetune/README.md", "lora r8", None),  # no 4-bit base
    ("a blog post", "qlora r8", None),                                   # unstated: today's behaviour
])
def test_the_bitsandbytes_a_source_ran(source, method, expected):
    payload, reason = map_row(_row(source=source, method=method))
    assert reason is None
    assert (payload["config"].get("quantization") or {}).get("bitsandbytes_version") == expected
    EstimateRequest.model_validate(payload)


@pytest.mark.parametrize("source, grad_ckpt, reentrant", [
    ("grad ckpt on (reentrant), FSDP", "on", True),
    ("gradient_checkpointing true (use_reentrant true)", "on", True),
    ("train.py --reentrant_checkpointing True", "on", True),
    ("grad ckpt on (non-reentrant)", "on", None),
    ("use_reentrant true", "off", None),                                 # nothing to checkpoint
])
def test_reentrant_checkpointing_as_the_source_says(source, grad_ckpt, reentrant):
    payload, _ = map_row(_row(source=source, grad_ckpt=grad_ckpt))
    assert payload["config"]["training"].get("gradient_checkpointing_reentrant") == reentrant
