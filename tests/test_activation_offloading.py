"""Activation offloading (config.training.activation_offloading, advisor/offload.py): the same training, the saved
activations out of the device's count in the simulation as in a real run, the fast estimator following the exact
simulation, the time it costs, a training job that uses it, and the exports."""

from __future__ import annotations

import pytest
import torch
from conftest import single_gpu_recommendation, two_step_lora_job

from advisor.catalog.models import resolve_model
from advisor.engine import load_base_model, make_batch, prepare, training_forward
from advisor.memory.simulate import measure_real, simulate_in_process
from advisor.methods import get_method


def _config(method: str, offload: bool, gc: bool):
    return get_method(method).resolve_config({"training": {
        "activation_offloading": offload, "gradient_checkpointing": gc, "bf16": False, "torch_dtype": "float32"}})


def _loss_and_grads(resolved, method, offload, gc, batch):
    torch.manual_seed(0)
    cfg = _config(method, offload, gc)
    prepared = prepare(load_base_model(resolved, cfg, on_meta=False, random_init=False), resolved, cfg,
                       on_meta=False)
    with training_forward(prepared.model):
        loss = prepared.model(**batch, **prepared.forward_kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in prepared.model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("gc", [False, True])
def test_offloading_changes_memory_not_training(tiny_dirs, method, gc):
    resolved = resolve_model(str(tiny_dirs["llama"]))
    batch = make_batch(resolved.kind, 2, 24, resolved.config.vocab_size, generator=torch.Generator().manual_seed(3))
    ref_loss, ref = _loss_and_grads(resolved, method, False, gc, batch)
    loss, grads = _loss_and_grads(resolved, method, True, gc, batch)
    assert torch.equal(loss, ref_loss) and grads.keys() == ref.keys() and grads
    for name, g in grads.items():
        assert torch.equal(g, ref[name]), name


@pytest.fixture(scope="module")
def deeper(tmp_path_factory, tokenizer):
    """A llama deep and wide enough that its saved activations outweigh the logits (3 blocks, 128 wide)."""
    from advisor.demo import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("offload") / "llama", "llama", tokenizer, vocab_size=2048,
                            hidden_size=128, intermediate_size=256, num_hidden_layers=3)
    return resolve_model(str(path))


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("gc", [False, True])
def test_simulation_counts_what_a_real_run_keeps_on_the_device(deeper, method, gc):
    """The host copies are left out of the count (advisor.memory.counter.host_allocations) in the fake-tensor
    simulation and in a real run alike, to the byte; what stays on the device drops."""
    sim = simulate_in_process(deeper, _config(method, True, gc), 2, 96)
    real = measure_real(deeper, _config(method, True, gc), 2, 96)
    assert sim["peak_bytes"] == real["peak_bytes"] and sim["breakdown_bytes"] == real["breakdown_bytes"]
    plain = simulate_in_process(deeper, _config(method, False, gc), 2, 96)
    assert sim["peak_bytes"] < plain["peak_bytes"]
    # at the peak (backward), the forward's saved activations are on the host: a few hundred KiB stay (the head's
    # input and what is under 1 KiB) of the MiBs the plain run holds
    kept, held = sim["breakdown_bytes"]["activations"], plain["breakdown_bytes"]["activations"]
    assert kept < 0.3 * held, (kept, held)


def test_fast_estimate_follows_the_exact_simulation_and_pays_the_copies():
    from advisor.estimator.exact import exact_estimate
    from advisor.estimator.fast import fast_estimate
    from advisor.schemas import EstimateRequest

    def req(offload):
        return EstimateRequest.model_validate({
            "model": "Qwen/Qwen2.5-0.5B", "hardware": {"gpu": "h100"}, "method": "lora",
            "config": {"training": {"per_device_train_batch_size": 2, "max_seq_length": 1024,
                                    "gradient_checkpointing": True, "activation_offloading": offload}},
            "dataset": {"num_examples": 1000}})

    fast, exact = fast_estimate(req(True)), exact_estimate(req(True), allocator="fitted")
    assert fast["peak_bytes"] == pytest.approx(exact["peak_bytes"], rel=0.02)
    plain = fast_estimate(req(False))
    assert fast["peak_bytes"] < plain["peak_bytes"]
    # 24 checkpointed blocks' inputs (2 × 1024 × 896 bf16 = 3.5 MiB each) go to the host and back every micro-batch
    assert "of activations to the host and back" in fast["provenance"]["time"]
    assert fast["tokens_per_s"] < plain["tokens_per_s"]


def test_a_job_trains_with_offloading(tiny_dirs, tmp_path):
    from advisor.demo import write_datasets
    from advisor.train import run_training

    data = write_datasets(tmp_path / "data", n=12)

    def job(offload):
        return two_step_lora_job(tiny_dirs["llama"], data["alpaca"],
                                 {"gradient_checkpointing": True, "activation_offloading": offload})

    offloaded = run_training(job(True), output_dir=tmp_path / "offloaded", device="cpu")
    plain = run_training(job(False), output_dir=tmp_path / "plain", device="cpu")
    assert offloaded["status"] == plain["status"] == "succeeded"
    assert offloaded["metrics"]["loss"] == pytest.approx(plain["metrics"]["loss"], rel=1e-6)
    assert offloaded["metrics"]["eval_loss"] == pytest.approx(plain["metrics"]["eval_loss"], rel=1e-6)
    assert offloaded["predicted"]["config"]["training"]["activation_offloading"] is True


@pytest.mark.parametrize("gc", [True, False])
def test_exports_carry_offloading(tiny_dirs, tmp_path, gc):
    import yaml

    from advisor.demo import write_datasets
    from advisor.export import axolotl as axolotl_fmt
    from advisor.export import export
    from advisor.export import llamafactory as lf_fmt

    data = str(write_datasets(tmp_path / "data", n=8)["alpaca"])
    rec = single_gpu_recommendation(tiny_dirs["llama"], "lora", {"activation_offloading": True,
                                                                 "gradient_checkpointing": gc})
    ax = yaml.safe_load(export("axolotl", recommendation=rec, dataset=data)["content"])
    assert ax["activation_offloading"] is True and set(ax) <= axolotl_fmt.KNOWN_KEYS
    lf = export("llamafactory", recommendation=rec, dataset=data)
    doc = yaml.safe_load(lf["content"])
    if gc:  # LLaMA-Factory's offload is of the checkpointed blocks' inputs
        assert doc["use_unsloth_gc"] is True and "use_unsloth_gc" in lf_fmt.OWN_KEYS
    else:
        assert "use_unsloth_gc" not in doc and any("use_unsloth_gc" in n for n in lf["notes"])
    script = export("script", recommendation=rec, dataset=data)["content"]
    assert "'activation_offloading': True" in script and '["offload"] = True' in script
    plain = single_gpu_recommendation(tiny_dirs["llama"], "lora", {"gradient_checkpointing": gc})
    assert "activation_offloading" not in yaml.safe_load(export("axolotl", recommendation=plain,
                                                                dataset=data)["content"])


def test_the_recommendation_points_to_offloading_when_checkpointed_activations_dominate(tokenizer, tmp_path,
                                                                                         monkeypatch):
    """A deep, narrow model with a small vocabulary on long examples, on a card where it needs checkpointing: the
    activations are the largest tensors at the peak, and the recommendation says offloading them is an option; the
    estimate with the option on is lower."""
    from advisor.demo import write_tiny_model
    from advisor.estimator.fast import fast_estimate
    from advisor.recommend import recommend
    from advisor.schemas import EstimateRequest
    from advisor.settings import get_settings

    monkeypatch.setenv("ADVISOR_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    try:
        path = write_tiny_model(tmp_path / "deep", "llama", tokenizer, vocab_size=512, hidden_size=64,
                                intermediate_size=128, num_hidden_layers=8)
        scenario = {"model": str(path), "task": "instruction_following", "hardware": {"vram_gib": 1.05},
                    "dataset": {"num_examples": 5000, "avg_tokens": 2048, "max_tokens": 4096}}
        rec = recommend(scenario)
        training = rec["config"]["training"]
        parts = rec["estimate"]["breakdown_gib"]
        said = [r for r in rec["reasons"] if r["rule"] == "estimator.activations"]
        assert training["gradient_checkpointing"] and not training["activation_offloading"]
        assert parts["activations"] >= 0.3 * (sum(parts.values()) - parts["overhead"]) and len(said) == 1, parts
        assert "--activation-offloading" in said[0]["says"] and said[0]["source"] == "estimator"
        request = {"model": str(path), "hardware": {"vram_gib": 1.05}, "method": rec["method"],
                   "config": {**rec["config"], "training": {**training, "activation_offloading": True}}}
        offloaded = fast_estimate(EstimateRequest.model_validate(request))
        assert offloaded["breakdown_gib"]["activations"] < parts["activations"]
    finally:
        get_settings.cache_clear()
