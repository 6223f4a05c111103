"""Chunked and fused-linear cross-entropy (config.training.cross_entropy): the same loss and gradients as the
standard loss, memory simulated like a real run, the fast estimator following the exact simulation, training jobs
that use it, and clear refusals where it cannot run."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import single_gpu_recommendation, two_step_lora_job

from advisor.catalog.models import resolve_model
from advisor.engine import load_base_model, make_batch, prepare
from advisor.errors import AdvisorInputError
from advisor.losses import computing_loss, fused_chunk_tokens
from advisor.memory.simulate import measure_real, simulate_in_process
from advisor.methods import get_method

MODES = ("chunked", "fused_linear")


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory, tokenizer):
    """A small llama whose vocabulary (8192) dwarfs its width (64), as a real model's 128k does its 4096."""
    from advisor.demo import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("ce") / "llama", "llama", tokenizer, vocab_size=8192,
                            hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    return resolve_model(str(path))


def _loss_and_grads(resolved, method, mode, batch, peft=None, bf16=False):
    torch.manual_seed(0)
    cfg = get_method(method).resolve_config({"peft": peft or {}, "training": {
        "cross_entropy": mode, "bf16": bf16, "torch_dtype": "float32"}})
    model = load_base_model(resolved, cfg, on_meta=False, random_init=False)
    prepared = prepare(model, resolved, cfg, on_meta=False)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with autocast, computing_loss(prepared.model):
        out = prepared.model(**batch, **prepared.forward_kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in prepared.model.named_parameters() if p.grad is not None}
    assert grads, "something must be trained"
    return out.loss.detach(), grads


@pytest.mark.parametrize("arch,method,peft", [
    ("llama", "full", None),          # the head is trained (its gradient comes out of the fused loss)
    ("gpt2", "full", None),           # tied head and embeddings: both gradients meet in one parameter
    ("llama", "lora", None),
    ("llama", "prompt_tuning", {"num_virtual_tokens": 4}),  # virtual positions carry ignored labels
])
@pytest.mark.parametrize("mode", MODES)
def test_same_loss_and_gradients_as_the_standard_loss(tiny_dirs, arch, method, peft, mode):
    resolved = resolve_model(str(tiny_dirs[arch]))
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(resolved.kind, 3, 21, resolved.config.vocab_size, generator=gen)
    batch["labels"][0, :6] = -100  # a masked prompt
    ref_loss, ref = _loss_and_grads(resolved, method, "standard", batch, peft)
    loss, grads = _loss_and_grads(resolved, method, mode, batch, peft)
    assert math.isfinite(float(ref_loss))
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_loss_under_bf16_autocast_follows_the_standard_one(tiny_dirs):
    resolved = resolve_model(str(tiny_dirs["llama"]))
    batch = make_batch(resolved.kind, 2, 16, resolved.config.vocab_size, generator=torch.Generator().manual_seed(2))
    ref_loss, ref = _loss_and_grads(resolved, "lora", "standard", batch, bf16=True)
    loss, grads = _loss_and_grads(resolved, "lora", "fused_linear", batch, bf16=True)
    assert float(loss) == pytest.approx(float(ref_loss), rel=2e-2)
    checked = 0
    for name, g in grads.items():
        if not ref[name].any():  # LoRA's A starts with a zero gradient (B is zero)
            assert not g.any(), name
            continue
        cos = torch.nn.functional.cosine_similarity(g.flatten().float(), ref[name].flatten().float(), dim=0)
        assert cos > 0.99, name
        checked += 1
    assert checked > 0


def test_outside_training_the_head_still_makes_logits(tiny_dirs):
    resolved = resolve_model(str(tiny_dirs["llama"]))
    cfg = get_method("lora").resolve_config({"training": {"cross_entropy": "fused_linear", "bf16": False}})
    prepared = prepare(load_base_model(resolved, cfg, on_meta=False), resolved, cfg, on_meta=False)
    batch = make_batch(resolved.kind, 1, 8, resolved.config.vocab_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = prepared.model(input_ids=batch["input_ids"])
    assert out.logits.shape == (1, 8, resolved.config.vocab_size)
    names = {n for n, _ in prepared.model.named_parameters()}
    assert any(n.endswith("lm_head.weight") for n in names)  # state dict keys unchanged


def test_fused_chunks_follow_liger():
    assert fused_chunk_tokens(4096, 128256, 4096) == 128  # ceil(4096 / 32) = 128
    assert fused_chunk_tokens(1000, 32000, 4096) == 128   # ceil(1000 / 8) = 125 → 128
    assert fused_chunk_tokens(7, 10, 64) == 8


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_simulated_like_a_real_run_and_smaller_than_standard(wide_vocab, mode, checkpointing):
    def cfg(ce):
        return get_method("lora").resolve_config(
            {"training": {"cross_entropy": ce, "gradient_checkpointing": checkpointing, "bf16": False}})

    sim = simulate_in_process(wide_vocab, cfg(mode), 2, 96)
    real = measure_real(wide_vocab, cfg(mode), 2, 96)
    assert sim["peak_bytes"] == real["peak_bytes"]
    assert sim["breakdown_bytes"] == real["breakdown_bytes"]
    standard = simulate_in_process(wide_vocab, cfg("standard"), 2, 96)
    # 192 tokens × 8192 logits × 4 B = 6 MiB per fp32 copy: the standard loss holds several, chunked ≈ 1.5, fused
    # one chunk's worth
    assert sim["peak_bytes"] < standard["peak_bytes"]
    if mode == "fused_linear":
        chunked = simulate_in_process(wide_vocab, cfg("chunked"), 2, 96)
        assert sim["peak_bytes"] < chunked["peak_bytes"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_simulation_runs_three_fused_chunks_with_the_memory_of_all(wide_vocab, monkeypatch, checkpointing):
    """Fake tensors run the fused loss's first two chunks and its last (`losses.SIMULATE_EVERY_CHUNK`): the same
    phases, peaks and allocator replay (reserved bytes, segments) as every chunk, for the CPU and the CUDA target.
    8192 entries on 64 wide make chunks of 2 tokens: 2 × 96 tokens are 96 chunks; 151 tokens are 76, the last of 1."""
    import advisor.losses as losses

    cfg = get_method("lora").resolve_config({"training": {"cross_entropy": "fused_linear", "bf16": False,
                                                          "gradient_checkpointing": checkpointing}})
    chunks_run = []
    real_starts = losses._chunk_starts
    monkeypatch.setattr(losses, "_chunk_starts", lambda h, c: chunks_run.append(len(real_starts(h, c))) or
                        real_starts(h, c))

    def run(every, target, batch, seq, **extra):
        monkeypatch.setattr(losses, "SIMULATE_EVERY_CHUNK", every)
        chunks_run.clear()
        out = simulate_in_process(wide_vocab, cfg, batch, seq, target=target, **extra)
        for step in [out, *out["steps"]]:
            step.pop("seconds", None)
        if out.get("allocator"):
            out["allocator"].pop("events")  # fewer allocations replayed, the same blocks
        return out, set(chunks_run)

    for target, batch, seq, extra in (("cpu", 2, 96, {}), ("cuda", 1, 151, {"allocator_workspaces": [0, 1 << 20]})):
        every, chunks = run(True, target, batch, seq, **extra)
        assert chunks == {96 if seq == 96 else 76}
        three, chunks = run(False, target, batch, seq, **extra)
        assert chunks == {3}
        assert three == every and (target == "cpu" or three["allocator"]["reserved_peak_bytes"] > 0)


@pytest.mark.parametrize("mode", MODES)
def test_fast_estimate_follows_the_exact_simulation(mode):
    """A real vocabulary (Qwen2.5-0.5B: 151,936 entries on 896 wide) at a length whose fused chunk is rounded up to
    a power of two: the closed form fitted on slices stays within 2% of simulating the whole model."""
    from advisor.estimator.exact import exact_estimate
    from advisor.estimator.fast import fast_estimate
    from advisor.schemas import EstimateRequest

    def request(ce):
        return EstimateRequest.model_validate({
            "model": "Qwen/Qwen2.5-0.5B", "method": "lora", "hardware": {"gpu": "none"},
            "config": {"training": {"per_device_train_batch_size": 3, "max_seq_length": 700,
                                    "gradient_checkpointing": True, "cross_entropy": ce}}})

    fast = fast_estimate(request(mode))
    exact = exact_estimate(request(mode))
    assert fast["peak_bytes"] == pytest.approx(exact["peak_bytes"], rel=0.02)
    standard = fast_estimate(request("standard"))
    assert fast["peak_bytes"] < 0.8 * standard["peak_bytes"]  # the logits dominate this model's step


def test_refused_where_it_cannot_run(tiny_dirs):
    t5 = resolve_model(str(tiny_dirs["t5"]))
    cfg = get_method("lora").resolve_config({"training": {"cross_entropy": "fused_linear"}})
    with pytest.raises(AdvisorInputError) as err:
        prepare(load_base_model(t5, cfg, on_meta=True), t5, cfg, on_meta=True)
    assert err.value.field == "config.training.cross_entropy" and "standard" in str(err.value)

    gemma = resolve_model("google/gemma-2-9b")  # soft-caps its logits (30.0) between the head and the loss
    with pytest.raises(AdvisorInputError) as err:
        prepare(load_base_model(gemma, cfg, on_meta=True), gemma, cfg, on_meta=True)
    assert err.value.field == "config.training.cross_entropy" and "final_logit_softcapping" in str(err.value)

    with pytest.raises(AdvisorInputError) as err:
        get_method("lora").resolve_config({"training": {"cross_entropy": "liger"}})
    assert err.value.field == "config.training.cross_entropy" and "fused_linear" in str(err.value)


def test_a_job_trains_with_the_fused_loss(tiny_dirs, tmp_path):
    from advisor.demo import write_datasets
    from advisor.train import run_training

    data = write_datasets(tmp_path / "data", n=12)

    def job(mode):
        return two_step_lora_job(tiny_dirs["llama"], data["alpaca"], {"cross_entropy": mode})

    fused = run_training(job("fused_linear"), output_dir=tmp_path / "fused", device="cpu")
    plain = run_training(job("standard"), output_dir=tmp_path / "plain", device="cpu")
    assert fused["status"] == plain["status"] == "succeeded"
    assert fused["metrics"]["loss"] == pytest.approx(plain["metrics"]["loss"], rel=1e-4)
    assert fused["metrics"]["eval_loss"] == pytest.approx(plain["metrics"]["eval_loss"], rel=1e-4)
    assert fused["predicted"]["config"]["training"]["cross_entropy"] == "fused_linear"


def test_the_recommendation_points_to_the_fused_loss_when_logits_dominate(wide_vocab, tmp_path, monkeypatch):
    from advisor.recommend import recommend
    from advisor.settings import get_settings

    monkeypatch.setenv("ADVISOR_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    try:
        scenario = {"model": wide_vocab.path, "task": "instruction_following", "hardware": {"gpu": "4090"},
                    "dataset": {"num_examples": 5000, "avg_tokens": 256, "max_tokens": 512}}
        rec = recommend(scenario)
        said = [r for r in rec["reasons"] if r["rule"] == "estimator.logits"]
        parts = rec["estimate"]["breakdown_gib"]
        assert parts["logits"] >= 0.2 * (sum(parts.values()) - parts["overhead"]) and len(said) == 1, parts
        assert "fused_linear" in said[0]["says"] and said[0]["source"] == "estimator"
    finally:
        get_settings.cache_clear()


def test_exports_carry_the_loss(tiny_dirs, tmp_path):
    """Axolotl: Liger's plugin with only its fused linear loss, or chunked_cross_entropy; LLaMA-Factory:
    enable_liger_kernel (it has no chunked loss: a note says so); the standalone script turns Liger's loss on where it
    can run and otherwise says it trains with the standard loss."""
    import yaml

    from advisor.demo import write_datasets
    from advisor.export import axolotl as axolotl_fmt
    from advisor.export import export
    from advisor.export import llamafactory as lf_fmt

    data = write_datasets(tmp_path / "data", n=8)

    def rec(mode):
        return single_gpu_recommendation(tiny_dirs["llama"], "lora", {"cross_entropy": mode, "max_seq_length": 64})

    ax = yaml.safe_load(export("axolotl", recommendation=rec("fused_linear"), dataset=str(data["alpaca"]))["content"])
    assert ax["plugins"] == ["axolotl.integrations.liger.LigerPlugin"] and ax["liger_fused_linear_cross_entropy"]
    assert set(ax) <= axolotl_fmt.KNOWN_KEYS
    chunked = export("axolotl", recommendation=rec("chunked"), dataset=str(data["alpaca"]))
    assert yaml.safe_load(chunked["content"])["chunked_cross_entropy"] is True and chunked["notes"]
    plain = yaml.safe_load(export("axolotl", recommendation=rec("standard"), dataset=str(data["alpaca"]))["content"])
    assert not {"plugins", "liger_fused_linear_cross_entropy", "chunked_cross_entropy"} & set(plain)

    lf = export("llamafactory", recommendation=rec("fused_linear"), dataset=str(data["alpaca"]))
    assert yaml.safe_load(lf["content"])["enable_liger_kernel"] is True and "enable_liger_kernel" in lf_fmt.OWN_KEYS
    lf_chunked = export("llamafactory", recommendation=rec("chunked"), dataset=str(data["alpaca"]))
    assert "enable_liger_kernel" not in yaml.safe_load(lf_chunked["content"])
    assert any("standard loss" in n for n in lf_chunked["notes"])

    script = export("script", recommendation=rec("fused_linear"), dataset=str(data["alpaca"]))["content"]
    assert "'cross_entropy': 'fused_linear'" in script and "liger_kernel_config" in script


def _random_resolved(config: dict):
    return resolve_model(config)


@pytest.mark.parametrize("case", ["lora_on_head", "gemma2_softcap"])
def test_chunked_loss_runs_the_head_module_and_soft_caps(case):
    """The chunked loss runs each slice through the head module itself, so a LoRA adapter on lm_head (torchtune's
    apply_lora_to_output, litgpt's head LoRA) trains with it; Gemma-2's soft-capping is applied per slice (the model's
    own is switched off while the loss is computed). Same loss and gradients as the standard loss; the fused loss
    still refuses both."""
    if case == "lora_on_head":
        resolved = _random_resolved({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "intermediate_size": 128, "vocab_size": 300})
        peft = {"target_modules": ["q_proj", "v_proj", "lm_head"], "lora_dropout": 0.0}  # no per-slice masks
    else:
        resolved = _random_resolved({"model_type": "gemma2", "hidden_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                     "intermediate_size": 128, "vocab_size": 300, "final_logit_softcapping": 5.0})
        peft = {"target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    gen = torch.Generator().manual_seed(2)
    batch = make_batch(resolved.kind, 2, 16, 300, generator=gen)

    def run(mode):
        torch.manual_seed(0)
        cfg = get_method("lora").resolve_config({"peft": peft, "training": {
            "cross_entropy": mode, "bf16": False, "torch_dtype": "float32"}})
        prepared = prepare(load_base_model(resolved, cfg, on_meta=False, random_init=True), resolved, cfg,
                           on_meta=False)
        with computing_loss(prepared.model):
            out = prepared.model(**batch)
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in prepared.model.named_parameters() if p.grad is not None}
        return out.loss.detach(), grads, prepared

    ref_loss, ref, _ = run("standard")
    loss, grads, prepared = run("chunked")
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert grads.keys() == ref.keys() and (case != "lora_on_head" or any("lm_head" in n for n in grads))
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6, msg=name)
    if case == "gemma2_softcap":
        assert prepared.model.get_base_model().config.final_logit_softcapping == 5.0  # restored after the loss
    with pytest.raises(AdvisorInputError) as err:
        run("fused_linear")
    assert err.value.field == "config.training.cross_entropy"
