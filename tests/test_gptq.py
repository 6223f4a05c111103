"""LoRA on a GPTQ checkpoint (`qlora` with `config.quantization.quant_method: "gptq"`): the simulation's stand-in
holds a GPTQ layer's packed storage and runs gptqmodel's training matmul (the weight dequantized and kept by the
matmul for the input's gradient); estimates, strategies, jobs and exports follow. gptqmodel itself is not installed
here, so a real GPTQ run is refused with what it needs."""

from __future__ import annotations

import math

import pytest

from advisor.catalog.models import resolve_model
from advisor.errors import AdvisorInputError
from advisor.memory.simulate import simulate_in_process
from advisor.methods import get_method

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128}


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer):
    from advisor.demo import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("gptq") / "llama", "llama", tokenizer, vocab_size=2048,
                            hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    return resolve_model(str(path))


def _cfg(quantization: dict | None, gc: bool = False, **training):
    return get_method("qlora").resolve_config({"quantization": quantization or {},
                                               "training": {"gradient_checkpointing": gc, **training}})


def _linears(c) -> dict[str, tuple[int, int]]:
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    h, i = c.hidden_size, c.intermediate_size
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def test_storage_is_gptq_packing_and_counts_the_logical_weights(llama):
    """int32 words of `bits` codes, an fp16 scale and a packed zero per group of 128 inputs, an int32 group index
    per input; parameter counts are the layers' logical sizes, as for NF4."""
    c = llama.config
    gptq, nf4 = simulate_in_process(llama, _cfg(GPTQ), 1, 32), simulate_in_process(llama, _cfg(None), 1, 32)
    per_layer = 0
    for fan_in, fan_out in _linears(c).values():
        groups = math.ceil(fan_in / 128)
        per_layer += (4 * math.ceil(fan_in * 4 / 32) * fan_out + 4 * groups * math.ceil(fan_out * 4 / 32)
                      + 2 * groups * fan_out + 4 * fan_in)
    # bf16 embeddings, head and norms, and the rotary embedding's two fp32 buffers of head_dim / 2 (inv_freq and its
    # original)
    unquantized = 2 * (2 * c.vocab_size * c.hidden_size + (2 * c.num_hidden_layers + 1) * c.hidden_size) + 2 * 4 * (
        c.hidden_size // c.num_attention_heads // 2)
    assert gptq["breakdown_bytes"]["weights"] == c.num_hidden_layers * per_layer + unquantized
    assert (gptq["total_params"], gptq["trainable_params"]) == (nf4["total_params"], nf4["trainable_params"])


def test_the_dequantized_weight_is_kept_for_backward(llama):
    """Without checkpointing every quantized layer whose input needs a gradient keeps its dequantized bf16 weight until
    backward (the matmul's saved operand): all of them but the first block's q/k/v, whose input comes from frozen
    embeddings. NF4 (bitsandbytes' MatMul4Bit) dequantizes again in backward instead."""
    c = llama.config
    gptq, nf4 = simulate_in_process(llama, _cfg(GPTQ), 2, 64), simulate_in_process(llama, _cfg(None), 2, 64)
    shapes = _linears(c)
    kept = c.num_hidden_layers * sum(i * o for i, o in shapes.values()) - sum(
        i * o for n, (i, o) in shapes.items() if n in ("q_proj", "k_proj", "v_proj"))
    assert gptq["breakdown_bytes"]["activations"] - nf4["breakdown_bytes"]["activations"] == 2 * kept


def test_fast_estimate_follows_the_simulation_and_keeps_weights_replicated(llama):
    from advisor.estimator.service import run_estimate
    from advisor.schemas import EstimateRequest

    body = {"model": llama.path, "hardware": {"gpu": "a100-80gb"}, "method": "qlora",
            "config": {"quantization": GPTQ, "training": {"per_device_train_batch_size": 2, "max_seq_length": 64}}}
    fast = run_estimate(EstimateRequest(**body))
    exact = run_estimate(EstimateRequest(**body, exact=True))
    tensors = [sum(v for k, v in e["breakdown_gib"].items() if k != "overhead") for e in (fast, exact)]
    assert abs(tensors[0] / tensors[1] - 1) < 0.02
    assert any("GPTQ base (4-bit, group size 128)" in n for n in fast["notes"])
    multi = {**body, "hardware": {"gpu": "a100-80gb", "count": 4}}
    est = run_estimate(EstimateRequest(**multi))
    assert set(est["per_strategy_gib"]) == {"ddp", "zero2", "zero2_offload"}
    with pytest.raises(AdvisorInputError) as err:
        run_estimate(EstimateRequest(**multi), strategy="fsdp_full_shard")
    assert err.value.field == "strategy" and "GPTQ" in str(err.value)


@pytest.mark.parametrize("quantization, message", [
    ({"bits": 8}, "quant_method 'gptq'"),
    ({"quant_method": "gptq", "load_in_8bit": True}, "sets its width with bits"),
    ({"quant_method": "gptq", "group_size": 0}, "group_size"),
    ({"quant_method": "gptq", "bits": 5}, "bits"),
    ({"quant_method": "awq"}, "quant_method"),
    ({"bitsandbytes_version": "latest"}, "not a version"),
    ({"quant_method": "gptq", "bitsandbytes_version": "0.41.1"}, "not to a GPTQ checkpoint"),
])
def test_bad_quantization_settings_are_refused(quantization, message):
    with pytest.raises(AdvisorInputError) as err:
        _cfg(quantization)
    assert err.value.field.startswith("config.quantization") and message in str(err.value)


def test_a_job_on_a_checkpoint_that_is_not_gptq_is_refused_before_it_starts(tiny_dirs, tmp_path):
    from advisor.demo import write_datasets
    from advisor.train import normalize_job

    data = write_datasets(tmp_path / "data", n=8)
    with pytest.raises(AdvisorInputError) as err:
        normalize_job({"model": str(tiny_dirs["llama"]), "method": "qlora", "max_steps": 1,
                       "dataset": {"path": str(data["alpaca"]), "format": "auto"},
                       "config": {"quantization": GPTQ}})
    assert err.value.field == "config.quantization.quant_method" and "not a GPTQ checkpoint" in str(err.value)


def test_exports_say_gptq_and_not_bitsandbytes(tiny_dirs, tmp_path):
    import yaml
    from conftest import single_gpu_recommendation

    from advisor.demo import write_datasets
    from advisor.export import export

    data = str(write_datasets(tmp_path / "data", n=8)["alpaca"])
    rec = single_gpu_recommendation(tiny_dirs["llama"], "qlora", {})
    rec["config"]["quantization"] = GPTQ
    ax = yaml.safe_load(export("axolotl", recommendation=rec, dataset=data)["content"])
    assert ax["gptq"] is True and ax["adapter"] == "lora" and "load_in_4bit" not in ax
    lf = export("llamafactory", recommendation=rec, dataset=data)
    assert "quantization_bit" not in yaml.safe_load(lf["content"]) and "GPTQ checkpoint" in " ".join(lf["notes"])
    script = export("script", recommendation=rec, dataset=data)["content"]
    assert "QUANTIZATION = {'quant_method': 'gptq', 'bits': 4, 'group_size': 128}" in script
    bnb = export("script", recommendation=single_gpu_recommendation(tiny_dirs["llama"], "qlora", {}),
                 dataset=data)["content"]
    assert "'quant_method'" not in bnb and "'bnb_4bit_quant_type': 'nf4'" in bnb
