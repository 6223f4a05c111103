"""Method "peft": any adapter type PEFT implements, from its adapter_config.json keys. The simulation runs PEFT's
own layers and equals a real run to the byte; the fast estimate follows the simulation and says whose calibrated
rate times it; a job trains and saves the adapter and merges it where PEFT can; the script export builds it with
PEFT's get_peft_config; bad configs are refused naming the field and what is allowed."""

from __future__ import annotations

import pytest

from advisor.catalog.models import resolve_model
from advisor.errors import AdvisorInputError
from advisor.memory.simulate import measure_real, simulate_in_process
from advisor.methods import get_method


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer):
    from advisor.demo import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("peft_any") / "llama", "llama", tokenizer, vocab_size=2048,
                            hidden_size=128, intermediate_size=256, num_hidden_layers=3)
    return resolve_model(str(path))


def _cfg(peft: dict, gc: bool = False):
    return get_method("peft").resolve_config({"peft": peft, "training": {"gradient_checkpointing": gc}})


QV = ["q_proj", "v_proj"]
TYPES = {  # PEFT MetaMathQA's experiment configs, scaled to the tiny model where a size must divide its widths
    "loha": {"peft_type": "LOHA", "r": 8, "alpha": 16, "target_modules": QV},
    "lokr": {"peft_type": "LOKR", "r": 8, "decompose_factor": 4, "target_modules": QV},
    "vera": {"peft_type": "VERA", "r": 16, "target_modules": QV},
    "oft": {"peft_type": "OFT", "r": 8, "oft_block_size": 0, "target_modules": QV},
    "boft": {"peft_type": "BOFT", "boft_block_size": 4, "target_modules": QV},
    "fourierft": {"peft_type": "FOURIERFT", "n_frequency": 100, "target_modules": QV},
    "ln_tuning": {"peft_type": "LN_TUNING"},
    "p_tuning": {"peft_type": "P_TUNING", "num_virtual_tokens": 8, "encoder_hidden_size": 64},
    "adaption_prompt": {"peft_type": "ADAPTION_PROMPT", "adapter_len": 4, "adapter_layers": 3},
}


@pytest.mark.parametrize("name", sorted(TYPES))
def test_simulation_equals_a_real_run(llama, name):
    cfg = _cfg(TYPES[name], gc=name == "loha")
    sim = simulate_in_process(llama, cfg, 2, 48)
    real = measure_real(llama, cfg, 2, 48)
    assert (sim["peak_bytes"], sim["breakdown_bytes"]) == (real["peak_bytes"], real["breakdown_bytes"])
    assert sim["trainable_params"] == real["trainable_params"] > 0


def test_loha_trains_its_hadamard_factors(llama):
    """LoHa: ΔW = (A1·B1) ⊙ (A2·B2), four factors of rank r per adapted layer, trained in fp32 over a bf16 base
    unless autocast_adapter_dtype is off, which keeps them in the base's dtype (half the bytes)."""
    c = llama.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    r = 8
    per_layer = 2 * r * (c.hidden_size + c.hidden_size) + 2 * r * (c.hidden_size + kv)  # q, v
    fp32 = simulate_in_process(llama, _cfg(TYPES["loha"]), 1, 32)
    assert fp32["trainable_params"] == c.num_hidden_layers * per_layer
    assert fp32["breakdown_bytes"]["trainable"] == 4 * fp32["trainable_params"]
    bf16 = simulate_in_process(llama, _cfg({**TYPES["loha"], "autocast_adapter_dtype": False}), 1, 32)
    assert bf16["breakdown_bytes"]["trainable"] == 2 * fp32["trainable_params"]


def test_fast_estimate_follows_the_simulation_and_names_its_time_proxy(llama):
    from advisor.estimator.service import run_estimate
    from advisor.schemas import EstimateRequest

    body = {"model": llama.path, "hardware": {"gpu": "a100-80gb"}, "method": "peft",
            "config": {"peft": TYPES["lokr"], "training": {"per_device_train_batch_size": 2, "max_seq_length": 64}}}
    fast = run_estimate(EstimateRequest(**body))
    exact = run_estimate(EstimateRequest(**body, exact=True))
    assert fast["method"] == "peft" and fast["trainable_params"] == exact["trainable_params"]
    tensors = [sum(v for k, v in e["breakdown_gib"].items() if k != "overhead") for e in (fast, exact)]
    assert abs(tensors[0] / tensors[1] - 1) < 0.02  # the device overhead is modelled apart (allocator replay)
    assert "LOKR has no probe of its own: timed at lora's rate" in fast["provenance"]["time"]
    assert fast["tokens_per_s"] > 0
    # prompt-learning types are timed as prompt tuning, whose virtual tokens lengthen every layer's sequence
    pt = run_estimate(EstimateRequest(**{**body, "config": {"peft": TYPES["p_tuning"], "training": body["config"]["training"]}}))
    assert "timed at prompt_tuning's rate" in pt["provenance"]["time"]


@pytest.mark.parametrize("peft, field, message", [
    ({}, "config.peft.peft_type", "required"),
    ({"peft_type": "LOHAA"}, "config.peft.peft_type", "unknown PEFT type"),
    ({"peft_type": "XLORA"}, "config.peft.peft_type", "already-trained"),
    ({"peft_type": "SHIRA"}, "config.peft.peft_type", "data-dependent"),
    ({"peft_type": "LOHA", "rank": 8}, "config.peft.rank", "not a knob of peft"),
    ({"peft_type": "LOHA", "r": 8, "target_modules": ["q_proj", "nope"]}, "config.peft.target_modules", "no layer"),
    ({"peft_type": "ADAPTION_PROMPT", "adapter_len": 4, "adapter_layers": 9}, "config.peft.adapter_layers", "has 3"),
    ({"peft_type": "VBLORA", "vector_length": 100, "target_modules": QV}, "config.peft", "VBLORA"),
])
def test_bad_configs_are_refused_naming_the_field(llama, peft, field, message):
    from advisor.estimator.service import run_estimate
    from advisor.schemas import EstimateRequest

    body = {"model": llama.path, "hardware": {"gpu": "a100-80gb"}, "method": "peft",
            "config": {"peft": peft, "training": {"max_seq_length": 32}}}
    with pytest.raises(AdvisorInputError) as err:
        run_estimate(EstimateRequest(**body))
    assert err.value.field == field and message in str(err.value)
    if peft.get("peft_type") in ("LOHAA", "XLORA"):
        assert "LOHA" in err.value.allowed and "XLORA" not in err.value.allowed


def test_a_job_trains_saves_and_merges_a_loha_adapter(tiny_dirs, tmp_path):
    import torch
    from safetensors.torch import load_file

    from advisor.demo import write_datasets
    from advisor.train import normalize_job, run_training
    from advisor.train.merge import merge

    data = write_datasets(tmp_path / "data", n=16)
    job = normalize_job({"model": str(tiny_dirs["llama"]), "method": "peft", "max_steps": 2,
                         "dataset": {"path": str(data["alpaca"]), "format": "auto"},
                         "config": {"peft": {"peft_type": "LOHA", "r": 4, "target_modules": QV},
                                    "training": {"bf16": False, "learning_rate": 1e-3, "max_seq_length": 64,
                                                 "per_device_train_batch_size": 4, "warmup_ratio": 0.0}}})
    out = run_training(job, output_dir=tmp_path / "out", device="cpu")
    assert out["status"] == "succeeded", out
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert any("hada_w1_a" in k for k in saved) and all(t.dtype == torch.float32 for t in saved.values())
    merged = merge(tmp_path / "out")
    assert (merged / "model.safetensors").exists() and not (merged / "adapter_config.json").exists()


def test_the_script_export_builds_it_with_peft_and_others_refuse(tiny_dirs, tmp_path):
    from conftest import single_gpu_recommendation

    from advisor.demo import write_datasets
    from advisor.export import export

    data = str(write_datasets(tmp_path / "data", n=8)["alpaca"])
    rec = single_gpu_recommendation(tiny_dirs["llama"], "peft", {}, peft=TYPES["loha"])
    script = export("script", recommendation=rec, dataset=data)["content"]
    assert "get_peft_model(model, get_peft_config(keys)" in script and "'peft_type': 'LOHA'" in script
    compile(script, "train.py", "exec")
    for fmt in ("axolotl", "llamafactory"):
        with pytest.raises(AdvisorInputError) as err:
            export(fmt, recommendation=rec, dataset=data)
        assert err.value.field == "method" and "peft" in str(err.value)
