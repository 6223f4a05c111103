"""CPU offload of the parameters (ZeRO-3 offload_param + offload_optimizer, FSDP FULL_SHARD + offload_params): the
estimate holds only what is gathered on the device, the strategy is chosen when nothing else fits, and the launcher
and exports configure the same thing."""

from __future__ import annotations

import pytest
import torch

GIB = 2**30


def _request(method: str, *, count: int = 2, vram_gib: float | None = None, gpu: str | None = "h100"):
    from advisor.schemas import EstimateRequest

    hardware = {"vram_gib": vram_gib, "count": count} if vram_gib else {"gpu": gpu, "count": count}
    return EstimateRequest.model_validate({
        "model": "Qwen/Qwen2.5-0.5B", "hardware": hardware, "method": method,
        "config": {"training": {"per_device_train_batch_size": 2, "max_seq_length": 256,
                                "gradient_checkpointing": True}},
        "dataset": {"num_examples": 1000},
    })


def _root_and_block_bytes(config) -> tuple[int, int]:
    """From the real architecture built on the meta device: bf16 bytes of the parameters outside the decoder blocks
    (embeddings, final norm, output head; a tied head counted once) and of one decoder block."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    blocks = model.model.layers
    block = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    in_blocks = {id(p) for p in blocks.parameters()}
    seen, root = set(), 0
    for p in model.parameters():
        if id(p) in in_blocks or id(p) in seen:
            continue
        seen.add(id(p))
        root += p.numel() * p.element_size()
    return root, block


@pytest.mark.parametrize("method", ["full", "lora"])
def test_offloaded_parameters_leave_the_root_and_two_blocks_on_the_device(method):
    from advisor.estimator.fast import memory_model
    from advisor.estimator.plan import build_plan

    plan = build_plan(_request(method))
    mm = memory_model(plan)
    root, block = _root_and_block_bytes(plan.model.config)
    _, off, _ = mm.peak(2, "zero3_offload_params", 2)
    _, z3, _ = mm.peak(2, "zero3", 2)
    gathered = off["weights"] + off["trainable"]
    assert gathered == pytest.approx(root + 2 * block, rel=0.01)
    assert off["optimizer"] == 0
    if method == "full":  # every gradient goes to the host but the unit being reduced (the root is the largest)
        assert 0 < off["gradients"] <= root
    else:
        assert off["gradients"] < 0.01 * root and off["trainable"] < 0.05 * gathered
    # activations, logits and the step's temporaries are the replica's own: offload moves parameters only
    for key in ("activations", "logits"):
        assert off.get(key, 0.0) == pytest.approx(z3.get(key, 0.0))
    peaks = {s: mm.peak(2, s, 2)[0] for s in ("zero3", "zero3_offload", "zero3_offload_params")}
    assert peaks["zero3_offload_params"] < peaks["zero3_offload"] <= peaks["zero3"]


def test_parameter_offload_is_chosen_only_when_nothing_else_fits_and_costs_time():
    from advisor.estimator.fast import estimate_plan, fast_estimate, memory_model, resolve_strategy
    from advisor.estimator.plan import build_plan

    assert resolve_strategy("fsdp_offload", 2) == "zero3_offload_params"
    probe = fast_estimate(_request("full"))
    per = probe["per_strategy_gib"]
    assert per["zero3_offload_params"] < min(v for k, v in per.items() if k != "zero3_offload_params")
    # a card between the parameter-offload peak and every other strategy's: parameter offload is picked and fits
    vram = (per["zero3_offload_params"] + per["zero3_offload"]) / 2
    plan = build_plan(_request("full", vram_gib=vram))
    est = estimate_plan(plan, mm=memory_model(plan))
    assert est["strategy"] == "zero3_offload_params" and est["fits"] and est["max_micro_batch"] >= 2
    assert est["per_strategy_gib"]["zero3_offload"] > vram
    # on a catalog GPU (a price and FLOP/s to scale): parameter offload is slower than optimizer-only offload by its
    # PCIe traffic, and says so
    h100 = build_plan(_request("full"))
    mm = memory_model(h100)
    params = estimate_plan(h100, strategy="zero3_offload_params", mm=mm)
    optimizer_only = estimate_plan(h100, strategy="zero3_offload", mm=mm)
    assert "parameter offload traffic" in params["provenance"]["time"]
    assert "parameter offload" not in optimizer_only["provenance"]["time"]
    assert optimizer_only["tokens_per_s"] > params["tokens_per_s"] > 0


def test_launcher_offloads_what_the_strategy_says(tmp_path):
    from advisor.train.launch import accelerate_config, write_launch_files

    ds_opt, backend = accelerate_config("zero3_offload", 2, deepspeed=True)
    assert backend == "deepspeed"
    assert ds_opt["deepspeed_config"]["offload_optimizer_device"] == "cpu"
    assert ds_opt["deepspeed_config"]["offload_param_device"] == "none"  # the estimate keeps the weights sharded
    ds_all, _ = accelerate_config("zero3_offload_params", 2, deepspeed=True)
    assert ds_all["deepspeed_config"]["offload_param_device"] == "cpu"
    assert ds_all["deepspeed_config"]["offload_optimizer_device"] == "cpu"
    fsdp, backend = accelerate_config("fsdp_offload", 2, deepspeed=False)
    assert backend == "fsdp" and fsdp["fsdp_config"]["fsdp_offload_params"] is True
    assert fsdp["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD"
    plain, _ = accelerate_config("zero3", 2, deepspeed=False)
    assert plain["fsdp_config"]["fsdp_offload_params"] is False

    job = {"config": {"training": {"bf16": True, "gradient_accumulation_steps": 1}}}
    files = write_launch_files(job, tmp_path / "a", strategy="zero2_offload", num_processes=2, deepspeed=False)
    assert files.backend == "fsdp" and "DeepSpeed" in files.note and "offload_params" in files.note
    files = write_launch_files(job, tmp_path / "b", strategy="zero3_offload_params", num_processes=2,
                               deepspeed=False)
    assert files.note is None


def test_deepspeed_json_for_tools_offloads_parameters_only_for_that_strategy():
    from advisor.export.multigpu import deepspeed_json

    zero = deepspeed_json("zero3_offload_params")["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in deepspeed_json("zero3_offload")["zero_optimization"]


def test_zero3_gathers_two_blocks_and_keeps_the_root_gathered():
    """Without offload, ZeRO-3 / FSDP full-shard hold their shard of everything plus what is gathered: two blocks
    (the one running, the one prefetched) and the root unit, which FSDP leaves unsharded from the first forward to
    the end of backward: of it, the (1 - 1/N) not already in the device's shard."""
    from advisor.estimator.fast import STRATEGIES, _shard, memory_model
    from advisor.estimator.plan import build_plan

    plan = build_plan(_request("lora", count=4))
    static = memory_model(plan).static
    root, block = _root_and_block_bytes(plan.model.config)
    replica = {"weights": float(static.weights_bytes), "trainable": float(static.trainable_bytes),
               "activations": 1e6, "temporaries": 0.0}
    out = _shard(replica, STRATEGIES["zero3"], 4, static, "backward")
    assert out["weights"] == pytest.approx(static.weights_bytes / 4)
    assert out["temporaries"] == pytest.approx(2 * block + root * 3 / 4, rel=0.01)
    assert out["activations"] == replica["activations"]
