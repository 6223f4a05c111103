"""LoRA over an 8-bit base (bitsandbytes' LLM.int8(): `qlora` with `config.quantization.load_in_8bit`), and the
quantized stand-ins on the families whose layers are not plain Linears.

The fake-tensor stand-in (`SimLinear8bit`) mirrors MatMul8bitLt, the path CUDA trains with; a CPU run is measured on
that same path with the int8 ops counted as CUDA allocates them (`advisor.memory.simulate._INT8_AS_ON_CUDA`), and
the two agree to the byte. Also: the strategies an 8-bit base can run under, the fast estimator against the exact
simulation, a job that trains on an 8-bit base, and the exports."""

from __future__ import annotations

import math

import pytest
from conftest import single_gpu_recommendation

from advisor.catalog.models import resolve_model
from advisor.errors import AdvisorInputError
from advisor.memory.simulate import measure_real, simulate_in_process
from advisor.methods import get_method


@pytest.fixture(scope="module")
def deeper(tmp_path_factory, tokenizer):
    from advisor.demo import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("int8") / "llama", "llama", tokenizer, vocab_size=2048,
                            hidden_size=128, intermediate_size=256, num_hidden_layers=3)
    return resolve_model(str(path))


def _cfg(quantization: dict, gc: bool = False, peft: dict | None = None):
    return get_method("qlora").resolve_config({"quantization": quantization, "peft": peft or {},
                                               "training": {"gradient_checkpointing": gc}})


def _same(resolved, cfg, batch=2, seq=64):
    sim = simulate_in_process(resolved, cfg, batch, seq)
    real = measure_real(resolved, cfg, batch, seq)
    assert (sim["peak_bytes"], sim["breakdown_bytes"]) == (real["peak_bytes"], real["breakdown_bytes"])
    assert (sim["trainable_params"], sim["total_params"]) == (real["trainable_params"], real["total_params"])
    return sim


@pytest.mark.parametrize("gc", [False, True])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_8bit_simulation_equals_a_real_bitsandbytes_run(deeper, gc, threshold):
    sim = _same(deeper, _cfg({"load_in_8bit": True, "llm_int8_threshold": threshold}, gc), seq=96)
    four = simulate_in_process(deeper, _cfg({}, gc), 2, 96)
    # int8 weights are twice the 4-bit ones (plus one fp32 scale per row instead of per 64 weights)
    assert sim["breakdown_bytes"]["weights"] > four["breakdown_bytes"]["weights"]


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
@pytest.mark.parametrize("quantization", [{}, {"load_in_8bit": True}])
def test_stand_ins_replace_what_the_quantizer_replaces(tiny_dirs, arch, quantization):
    """GPT-2's Conv1D layers are quantized too (transposed), T5's `wo` stays unquantized in the load dtype: the
    simulated weights are the real ones, 4-bit and 8-bit."""
    _same(resolve_model(str(tiny_dirs[arch])), _cfg(quantization))


def test_config_choices_name_the_field():
    cfg = _cfg({"load_in_8bit": True})
    assert cfg.quantization.load_in_8bit and not cfg.quantization.load_in_4bit
    four = _cfg({}).quantization
    assert four.load_in_4bit and not four.load_in_8bit
    for quantization, field in (({"load_in_8bit": True, "load_in_4bit": True}, "config.quantization"),
                                ({"load_in_4bit": False}, "config.quantization.load_in_4bit"),
                                ({"load_in_8bit": True, "llm_int8_threshold": -1}, "config.quantization.llm_int8_threshold")):
        with pytest.raises(AdvisorInputError) as err:
            _cfg(quantization)
        assert err.value.field == field


def test_fast_estimate_follows_the_simulation_and_keeps_the_weights_whole_on_every_gpu():
    from advisor.estimator.exact import exact_estimate
    from advisor.estimator.fast import REPLICATED_WEIGHTS, fast_estimate
    from advisor.schemas import EstimateRequest

    def req(count, quantization):
        return EstimateRequest.model_validate({
            "model": "Qwen/Qwen2.5-0.5B", "hardware": {"gpu": "rtx-4090", "count": count}, "method": "qlora",
            "config": {"quantization": quantization,
                       "training": {"per_device_train_batch_size": 2, "max_seq_length": 256}}})

    one = req(1, {"load_in_8bit": True})
    fast, exact = fast_estimate(one), exact_estimate(one, allocator="fitted")
    assert fast["peak_bytes"] == pytest.approx(exact["peak_bytes"], rel=0.005)
    assert fast["breakdown_gib"]["weights"] > fast_estimate(req(1, {}))["breakdown_gib"]["weights"]
    assert any("8-bit" in n for n in fast["notes"])
    four = fast_estimate(req(4, {"load_in_8bit": True}))
    assert four["strategy"] in REPLICATED_WEIGHTS and set(four["per_strategy_gib"]) == set(REPLICATED_WEIGHTS)
    with pytest.raises(AdvisorInputError) as err:
        fast_estimate(req(4, {"load_in_8bit": True}), strategy="fsdp_full_shard")
    assert err.value.field == "strategy" and set(err.value.allowed) == set(REPLICATED_WEIGHTS)


def test_a_job_trains_on_an_8bit_base(tiny_dirs, tmp_path):
    from advisor.demo import write_datasets
    from advisor.train import normalize_job, run_training

    data = write_datasets(tmp_path / "data", n=12)

    def job(peft):
        return normalize_job({"model": str(tiny_dirs["llama"]), "method": "qlora", "max_steps": 2,
                              "dataset": {"path": str(data["alpaca"]), "format": "auto"},
                              "config": {"quantization": {"load_in_8bit": True}, "peft": peft,
                                         "training": {"per_device_train_batch_size": 4, "max_seq_length": 64,
                                                      "gradient_accumulation_steps": 1, "learning_rate": 1e-3}}})

    out = run_training(job({}), output_dir=tmp_path / "out", device="cpu")
    assert out["status"] == "succeeded", out
    assert math.isfinite(out["metrics"]["loss"]) and (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert out["predicted"]["config"]["quantization"]["load_in_8bit"] is True
    # PEFT's DoRA drops an int8 layer's row scales on CPU (bitsandbytes then fails in the first forward): refused
    with pytest.raises(AdvisorInputError) as err:
        run_training(job({"use_dora": True}), output_dir=tmp_path / "dora", device="cpu")
    assert err.value.field == "config.peft.use_dora"


def test_exports_load_the_base_in_8bit(tiny_dirs, tmp_path):
    import yaml

    from advisor.demo import write_datasets
    from advisor.export import axolotl as axolotl_fmt
    from advisor.export import export

    data = str(write_datasets(tmp_path / "data", n=8)["alpaca"])
    rec = single_gpu_recommendation(tiny_dirs["llama"], "qlora", {})
    rec["config"]["quantization"] = {**rec["config"]["quantization"], "load_in_8bit": True, "load_in_4bit": False}
    ax = yaml.safe_load(export("axolotl", recommendation=rec, dataset=data)["content"])
    assert ax["load_in_8bit"] is True and ax["adapter"] == "lora" and "load_in_4bit" not in ax
    assert "bnb_config_kwargs" not in ax and set(ax) <= axolotl_fmt.KNOWN_KEYS
    lf = yaml.safe_load(export("llamafactory", recommendation=rec, dataset=data)["content"])
    assert lf["quantization_bit"] == 8 and "quantization_type" not in lf
    script = export("script", recommendation=rec, dataset=data)["content"]
    assert "'load_in_8bit': True" in script
    compile(script, "train.py", "exec")
