"""bitsandbytes' optimizers in the estimates: 8-bit and 32-bit state sizes against real CPU runs (the counter is exact
there), the first step's state creation (simulated with fused AdamW, swapped for the real state), and paged state
(CUDA unified memory) kept out of fits, the allocator's reserve and max_micro_batch."""

from __future__ import annotations

import pytest

from advisor.catalog.models import resolve_model
from advisor.estimator.exact import exact_estimate
from advisor.estimator.fast import fast_estimate
from advisor.memory.simulate import measure_real
from advisor.methods import get_method
from advisor.schemas import EstimateRequest

GIB = 2**30


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory, tokenizer):
    from advisor.demo import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("optim") / "llama", "llama", tokenizer, hidden_size=256,
                            intermediate_size=512, num_hidden_layers=3)
    return resolve_model(str(path))


def _request(model, optim, gpu="none", batch=1, seq=8, method="full", **training):
    return EstimateRequest.model_validate({
        "model": model, "method": method, "hardware": {"gpu": gpu},
        "config": {"training": {"optim": optim, "per_device_train_batch_size": batch, "max_seq_length": seq,
                                **training}}})


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bitsandbytes_optimizers_estimated_like_a_real_run(small_llama, optim, dtype):
    """Full fine-tuning at 1 × 8 tokens, where the state is most of the step. Before the swap the fast model kept
    fused AdamW's state creation in the first step (fp32: 8 bytes per parameter instead of 2) and said +50%."""
    training = {"bf16": dtype == "bfloat16", "torch_dtype": dtype}
    cfg = get_method("full").resolve_config({"training": {"optim": optim, **training}})
    real = measure_real(small_llama, cfg, 1, 8)
    req = _request(small_llama.path, optim, **training)
    fast, exact = fast_estimate(req), exact_estimate(req)
    assert fast["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=5e-4)
    assert exact["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=5e-4)
    assert fast["breakdown_gib"]["optimizer"] == pytest.approx(real["breakdown_bytes"]["optimizer"] / GIB, abs=1e-4)


def test_exact_runs_8bit_optimizers_on_a_gpu_target_and_agrees_with_fast():
    """bitsandbytes' 8-bit step reads its state's values, which fake tensors do not have (the exact estimate used to
    fail with DataDependentOutputException): simulated with fused AdamW, state swapped for the 8-bit bytes."""
    req = _request("Qwen/Qwen2.5-0.5B", "adamw_8bit", gpu="4090", seq=128)
    exact, fast = exact_estimate(req), fast_estimate(req)
    assert exact["peak_bytes"] == fast["peak_bytes"]
    assert any("fused AdamW" in n for n in exact["notes"])
    # 8-bit moments: about a byte per moment and parameter, half of bf16 AdamW's
    adamw = fast_estimate(_request("Qwen/Qwen2.5-0.5B", "adamw_torch_fused", gpu="4090", seq=128))
    assert fast["breakdown_gib"]["optimizer"] < 0.55 * adamw["breakdown_gib"]["optimizer"]


def test_paged_state_stays_out_of_fits_and_of_the_allocators_reserve():
    """Qwen2.5-1.5B full fine-tuning with paged 32-bit AdamW (fp32 moments: 11.5 GiB) on a 16 GB T4: the whole step
    does not fit, what must be resident does; the paged part spills over PCIe every step, which costs time."""
    paged = fast_estimate(_request("Qwen/Qwen2.5-1.5B", "paged_adamw_32bit", gpu="t4", batch=2, seq=512,
                                   gradient_checkpointing=True, bf16=False, fp16=True))
    assert paged["paged_optimizer_gib"] > 10
    usable = paged["hardware"]["usable_memory_gib"]
    resident = paged["peak_vram_gib"] - paged["paged_optimizer_gib"]
    assert paged["peak_vram_gib"] > usable >= resident and paged["fits"] is True
    assert paged["headroom_gib"] == pytest.approx(usable - resident, abs=2e-3)
    assert paged["peak_reserved_gib"] < resident
    note = next(n for n in paged["notes"] if "unified memory" in n)
    assert "do not fit" in note and "PCIe" in note
    # the same step with the state resident in the allocator (8-bit, not paged) is not slowed by paging
    plain = fast_estimate(_request("Qwen/Qwen2.5-1.5B", "adamw_8bit", gpu="t4", batch=2, seq=512,
                                   gradient_checkpointing=True, bf16=False, fp16=True))
    assert "paged_optimizer_gib" not in plain
    assert paged["tokens_per_s"] < plain["tokens_per_s"]


def test_paged_state_that_fits_costs_no_time_and_small_parameters_are_not_paged():
    """LoRA r 16 on Llama-2-7B: every adapter matrix has 16 × 4096 = 65,536 < 1e5 elements, so bitsandbytes keeps
    all of its state as ordinary tensors; full fine-tuning of a 0.5B model on an H100 pages state that fits."""
    lora = fast_estimate(_request("meta-llama/Llama-2-7b-hf", "paged_adamw_8bit", gpu="h100", method="lora",
                                  seq=512))
    assert "paged_optimizer_gib" not in lora
    full = fast_estimate(_request("Qwen/Qwen2.5-0.5B", "paged_adamw_8bit", gpu="h100", seq=512))
    ref = fast_estimate(_request("Qwen/Qwen2.5-0.5B", "adamw_8bit", gpu="h100", seq=512))
    assert full["paged_optimizer_gib"] > 0 and full["tokens_per_s"] == ref["tokens_per_s"]
    assert full["max_micro_batch"] >= ref["max_micro_batch"]
    # off CUDA bitsandbytes pages nothing
    cpu = fast_estimate(_request("Qwen/Qwen2.5-0.5B", "paged_adamw_8bit", gpu="none", seq=512))
    assert "paged_optimizer_gib" not in cpu
