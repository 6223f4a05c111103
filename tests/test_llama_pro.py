"""Method "llama_pro": LLaMA-Pro's block expansion (N copies interleaved, output projections zeroed, only the copies
train). The expanded model computes what the original did; only the new blocks train, at LLaMA-Factory's positions;
the simulation of the expanded architecture equals a real run that expands the model to the byte; the fast estimate
equals the simulation at a real depth; a job trains and saves the expanded model, which reloads; the exports express
it; bad knobs are refused naming the field."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from advisor.catalog.models import resolve_model
from advisor.errors import AdvisorInputError
from advisor.memory.simulate import measure_real, simulate_in_process
from advisor.methods import get_method
from advisor.methods.freeze import expanded_model, llama_pro_trained_indices


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer):
    from advisor.demo import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("llama_pro") / "llama", "llama", tokenizer, vocab_size=2048,
                            hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    return resolve_model(str(path))


def _cfg(peft: dict, **training):
    return get_method("llama_pro").resolve_config({"peft": peft, "training": training})


def test_new_blocks_sit_where_llama_factory_trains_them():
    # LLaMA-Factory's use_llama_pro: stride (L + N) / N, trained ids stride-1, 2*stride-1, ...; ms-swift inserts a copy
    # after every L/N original blocks: the same positions
    assert llama_pro_trained_indices(36, 4) == [8, 17, 26, 35]  # Llama-2-7B's 32 + 4
    assert llama_pro_trained_indices(6, 2) == [2, 5]


def test_the_expanded_model_computes_what_the_original_did_and_only_the_copies_train(llama):
    from advisor.engine import load_base_model, make_batch, make_optimizer, prepare, train_step

    cfg = _cfg({"num_new_blocks": 2}, learning_rate=1e-2, bf16=False, torch_dtype="float32", max_grad_norm=0.0)
    torch.manual_seed(0)
    original = load_base_model(llama, cfg, on_meta=False, device="cpu")
    batch = make_batch(llama.kind, 2, 32, llama.config.vocab_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = original(input_ids=batch["input_ids"]).logits
    prepared = prepare(original, llama, cfg, on_meta=False, total_steps=3)
    model = prepared.model
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6
    with torch.no_grad():  # the copies' output projections start at zero: each new block passes its input through
        assert torch.allclose(model(input_ids=batch["input_ids"]).logits, before, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.match(r"model\.layers\.[25]\.", n) for n in trainable)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(prepared, cfg.training)
    for step in range(3):
        train_step(prepared, optimizer, batch, cfg.training, step)
    changed = {n for n, p in model.named_parameters() if not torch.equal(start[n], p)}
    assert changed == trainable
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(6))


def test_copies_of_biased_blocks_add_nothing_either(tiny_dirs):
    """GPT-2's output projections (attention's and the MLP's c_proj) have biases: the copy zeroes them too."""
    from advisor.engine import load_base_model, make_batch, prepare

    gpt2 = resolve_model(str(tiny_dirs["gpt2"]))
    cfg = _cfg({"num_new_blocks": 2}, bf16=False, torch_dtype="float32")
    model = load_base_model(gpt2, cfg, on_meta=False, device="cpu").eval()  # eval: no dropout
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.bias"):
                p.normal_()  # a trained model's biases are not zero
    batch = make_batch(gpt2.kind, 2, 16, gpt2.config.vocab_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"]).logits
    expanded = prepare(model, gpt2, cfg, on_meta=False, total_steps=1).model.eval()
    assert len(expanded.transformer.h) == 4 and expanded.config.n_layer == 4  # one new block after each
    with torch.no_grad():
        assert torch.allclose(expanded(input_ids=batch["input_ids"]).logits, before, atol=1e-5)


@pytest.mark.parametrize("peft, training", [
    ({"num_new_blocks": 2}, {}),
    ({"num_new_blocks": 1, "extra_modules": ["lm_head"]}, {"gradient_checkpointing": True}),
])
def test_simulating_the_expanded_architecture_equals_a_real_run(llama, peft, training):
    cfg = _cfg(peft, **training)
    sim = simulate_in_process(expanded_model(llama, cfg.peft), cfg, 2, 48)
    real = measure_real(llama, cfg, 2, 48)  # a real 4-block model, expanded by the method as a job would
    assert (sim["peak_bytes"], sim["breakdown_bytes"]) == (real["peak_bytes"], real["breakdown_bytes"])
    assert sim["trainable_params"] == real["trainable_params"] > 0


def _estimate(peft: dict, b: int, gc: bool, exact: bool = False, model: str = "Qwen/Qwen2.5-0.5B"):
    from advisor.estimator.service import run_estimate
    from advisor.schemas import EstimateRequest

    return run_estimate(EstimateRequest.model_validate({
        "model": model, "hardware": {"gpu": "a100-80gb"}, "method": "llama_pro", "exact": exact,
        "config": {"peft": peft, "training": {"per_device_train_batch_size": b, "max_seq_length": 256,
                                              "gradient_checkpointing": gc}}}))


def test_fast_estimate_equals_the_simulation_at_depth():
    """The slices are 2 and 3 groups of (frozen blocks + one new block), so the fit is linear in the frozen blocks per
    group: Qwen2.5-0.5B's 24 + 4 blocks land on the whole simulation (tensor bytes; device overhead apart)."""
    fast, exact = (_estimate({"num_new_blocks": 4}, 2, False, exact=e) for e in (False, True))
    tensors = [sum(v for k, v in r["breakdown_gib"].items() if k != "overhead") for r in (fast, exact)]
    assert abs(tensors[0] / tensors[1] - 1) < 0.005, tensors
    block = 14_912_384  # one Qwen2.5-0.5B block's parameters
    assert fast["trainable_params"] == exact["trainable_params"] == 4 * block
    assert fast["total_params"] == resolve_model("Qwen/Qwen2.5-0.5B").num_params() + 4 * block
    assert "full" in fast["provenance"]["time"]  # timed at full fine-tuning's calibrated rate


def test_more_new_blocks_cost_more_and_run_slower(llama):
    two, four = (_estimate({"num_new_blocks": n}, 2, True, model=llama.path) for n in (2, 4))
    assert four["trainable_params"] == 2 * two["trainable_params"]
    assert four["peak_bytes"] > two["peak_bytes"] and four["tokens_per_s"] < two["tokens_per_s"]


@pytest.mark.parametrize("peft, field, message", [
    ({"num_new_blocks": 0}, "config.peft.num_new_blocks", "positive integer"),
    ({"num_new_blocks": "4"}, "config.peft.num_new_blocks", "positive integer"),
    ({"num_new_blocks": 5}, "config.peft.num_new_blocks", "must divide the depth"),
    ({"num_new_blocks": 48}, "config.peft.num_new_blocks", "must divide the depth"),
    ({"extra_modules": ["nope"]}, "config.peft.extra_modules", "no module named 'nope'"),
    ({"trainable_layers": 2}, "config.peft.trainable_layers", "not a knob of llama_pro"),
])
def test_bad_knobs_are_refused_naming_the_field(peft, field, message):
    with pytest.raises(AdvisorInputError) as err:
        _estimate(peft, 1, False)
    assert err.value.field == field and message in str(err.value)
    if "divide" in message:
        assert err.value.allowed == ["1", "2", "3", "4", "6", "8", "12", "24"]


def test_a_job_trains_and_saves_the_expanded_model_which_reloads(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from advisor.demo import write_datasets
    from advisor.train import normalize_job, run_training

    data = write_datasets(tmp_path / "data", n=16)
    job = normalize_job({"model": str(tiny_dirs["llama"]), "method": "llama_pro", "max_steps": 2,
                         "dataset": {"path": str(data["alpaca"]), "format": "auto"},
                         "config": {"peft": {"num_new_blocks": 1},
                                    "training": {"bf16": False, "learning_rate": 1e-3, "max_seq_length": 64,
                                                 "per_device_train_batch_size": 4, "warmup_ratio": 0.0}}})
    out = run_training(job, output_dir=tmp_path / "out", device="cpu")
    assert out["status"] == "succeeded", out
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(reloaded.model.layers) == 3 and reloaded.config.num_hidden_layers == 3  # 2 + 1 new
    assert reloaded.model.layers[2].mlp.down_proj.weight.abs().sum() > 0  # the new block trained away from zero


def test_exports_llama_factory_and_a_script_that_runs(tiny_dirs, tmp_path):
    import yaml
    from conftest import single_gpu_recommendation

    from advisor.demo import write_datasets
    from advisor.export import export

    data = str(write_datasets(tmp_path / "data", n=8)["alpaca"])
    rec = single_gpu_recommendation(tiny_dirs["llama"], "llama_pro", {"bf16": False}, peft={"num_new_blocks": 2})
    lf = export("llamafactory", recommendation=rec, dataset=data)
    doc = yaml.safe_load(lf["content"])
    assert (doc["finetuning_type"], doc["use_llama_pro"], doc["freeze_trainable_layers"]) == ("freeze", True, 2)
    assert "scripts/llama_pro.py" in lf["content"] and "--num_expand 2" in lf["content"]
    with pytest.raises(AdvisorInputError) as err:
        export("axolotl", recommendation=rec, dataset=data)
    assert "block expansion" in str(err.value)
    out = export("script", recommendation=rec, dataset=data, output_dir=str(tmp_path / "run"))
    script = tmp_path / "train.py"
    script.write_text(out["content"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script), "--max-steps", "2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == "llama_pro"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 4  # the tiny model's 2 blocks + 2 new ones
