"""Every method builds on a real (tiny) Hugging Face model, trains a few AdamW steps, and changes only what it should."""

from __future__ import annotations

import pytest
import torch

from advisor.catalog.models import resolve_model
from advisor.engine import load_base_model, make_batch, make_optimizer, prepare, train_step
from advisor.errors import AdvisorInputError
from advisor.methods import METHOD_IDS, all_methods, get_method

STEPS = 4


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(resolved, method: str, peft: dict | None = None, training: dict | None = None, steps: int = STEPS):
    cfg = get_method(method).resolve_config(
        {"peft": peft or {}, "training": {"learning_rate": 1e-2, "bf16": False, "torch_dtype": "float32",
                                          "max_grad_norm": 0.0, **(training or {})}}
    )
    torch.manual_seed(0)
    model = load_base_model(resolved, cfg, on_meta=False, random_init=False, device="cpu")
    prepared = prepare(model, resolved, cfg, on_meta=False, total_steps=steps)
    calls = []
    if prepared.after_optimizer_step is not None:
        inner = prepared.after_optimizer_step
        prepared.after_optimizer_step = lambda step: (calls.append(step), inner(step))
    before = _snapshot(prepared.model)
    optimizer = make_optimizer(prepared, cfg.training)
    gen = torch.Generator().manual_seed(0)
    batch = make_batch(resolved.kind, 4, 32, resolved.config.vocab_size, generator=gen)
    losses = [train_step(prepared, optimizer, batch, cfg.training, step).loss for step in range(steps)]
    after = _snapshot(prepared.model)
    trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    return prepared, losses, trainable, changed, calls


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    return resolve_model(str(tiny_dirs["llama"]))


@pytest.mark.parametrize("method", [m for m in METHOD_IDS if m != "bitfit"])
def test_method_trains_on_llama(llama, method):
    prepared, losses, trainable, changed, calls = _train(llama, method)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] != pytest.approx(losses[0], abs=1e-6), f"{method}: loss did not move {losses}"
    assert trainable, f"{method}: nothing trainable"
    # only trainable parameters change, and (AdamW with a non-zero lr) trainable ones do change
    assert changed <= trainable, f"{method}: frozen parameters changed: {sorted(changed - trainable)[:5]}"
    assert changed, f"{method}: no parameter changed"
    n_trainable, n_total = prepared.param_counts()
    if method in ("full", "galore"):
        assert n_trainable == n_total
    else:
        assert 0 < n_trainable < 0.5 * n_total
    if method == "adalora":
        assert calls == list(range(STEPS)), "update_and_allocate must run after every optimizer step"


def test_lora_trains_only_adapters(llama):
    _, _, trainable, changed, _ = _train(llama, "lora", peft={"target_modules": ["q_proj", "v_proj"]})
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}


def test_qlora_base_is_4bit_and_frozen(llama):
    prepared, losses, trainable, changed, _ = _train(llama, "qlora", training={"bf16": True, "torch_dtype": "bfloat16"})
    kinds = {type(m).__name__ for m in prepared.model.modules()}
    assert "Linear4bit" in kinds
    assert all("lora_" in n for n in trainable)
    packed = [p for n, p in prepared.model.named_parameters() if p.dtype == torch.uint8]
    assert packed and not any(p.requires_grad for p in packed)


def test_longlora_trains_embeddings_and_norms_with_s2attn(llama):
    from advisor.methods.modules import s2attn

    before = s2attn.S2_CALLS["shifted"]
    prepared, _, trainable, _, _ = _train(llama, "longlora", training={"max_seq_length": 64})
    assert any("embed_tokens" in n for n in trainable) and any("norm" in n for n in trainable)
    assert s2attn.S2_CALLS["shifted"] > before, "shifted sparse attention was not used in training"
    assert prepared.model.config._attn_implementation == "s2attn"


def test_bitfit_existing_biases_on_gpt2(tiny_dirs):
    gpt2 = resolve_model(str(tiny_dirs["gpt2"]))
    _, losses, trainable, changed, _ = _train(gpt2, "bitfit")
    assert trainable and all(n.endswith("bias") for n in trainable)
    assert changed <= trainable and losses[-1] != pytest.approx(losses[0], abs=1e-6)
    # PEFT's BEFT adds biases to torch.nn.Linear only: GPT-2's Conv1D layers are a clear input error, not a crash
    with pytest.raises(AdvisorInputError) as err:
        _train(gpt2, "bitfit", peft={"bias_source": "add"})
    assert err.value.field == "config.peft.bias_source" and "use bias_source 'existing'" in str(err.value)


def test_bitfit_adds_biases_on_llama_only_when_asked(llama):
    with pytest.raises(AdvisorInputError) as err:
        _train(llama, "bitfit")
    assert err.value.field == "config.peft.bias_source" and "add" in err.value.allowed
    _, losses, trainable, changed, _ = _train(llama, "bitfit", peft={"bias_source": "add"})
    assert trainable and changed <= trainable


@pytest.mark.parametrize("method", ["full", "lora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "adapter",
                                    "galore", "molora"])
def test_method_trains_on_t5(tiny_dirs, method):
    t5 = resolve_model(str(tiny_dirs["t5"]))
    peft = {"target_modules": ["q", "v"]} if method in ("lora", "molora", "adalora") else None
    _, losses, trainable, changed, _ = _train(t5, method, peft=peft)
    assert changed <= trainable and changed
    assert losses[-1] != pytest.approx(losses[0], abs=1e-6)


def test_longlora_refuses_seq2seq(tiny_dirs):
    t5 = resolve_model(str(tiny_dirs["t5"]))
    cfg = get_method("longlora").resolve_config({})
    model = load_base_model(t5, cfg, on_meta=True)
    with pytest.raises(AdvisorInputError) as err:
        prepare(model, t5, cfg, on_meta=True)
    assert err.value.field == "method"


@pytest.mark.parametrize(
    "method,config,field",
    [
        ("lora", {"peft": {"r": 0}}, "config.peft.r"),
        ("lora", {"peft": {"rank": 8}}, "config.peft.rank"),
        ("lora", {"peft": {"target_modules": ["q_proj", "nonexistent"]}}, "config.peft.target_modules"),
        ("lora", {"peft": {"target_modules": ["nonexistent"]}}, "config.peft.target_modules"),
        ("lora", {"peft": {"target_modules": r".*\.(q_proj|v_proj)$"}}, "config.peft.target_modules"),
        ("lora", {"training": {"per_device_train_batch_size": 0}}, "config.training.per_device_train_batch_size"),
        ("lora", {"training": {"optim": "adamw_magic"}}, "config.training.optim"),
        ("lora", {"quantization": {"load_in_4bit": True}}, "config.quantization"),
        ("qlora", {"quantization": {"load_in_4bit": False}}, "config.quantization.load_in_4bit"),
        ("molora", {"peft": {"top_k": 9}}, "config.peft.top_k"),
        ("molora", {"peft": {"num_experts": 100000}}, "config.peft.num_experts"),
        # what PEFT takes silently: a negative scale, AdaLoRA's target rank above its initial one
        ("lora", {"peft": {"lora_alpha": -5}}, "config.peft.lora_alpha"),
        ("qlora", {"peft": {"lora_dropout": "a lot"}}, "config.peft.lora_dropout"),
        ("adalora", {"peft": {"init_r": 8, "target_r": 64}}, "config.peft.target_r"),
        ("adalora", {"peft": {"beta1": 1.5}}, "config.peft.beta1"),
        ("galore", {"peft": {"update_proj_gap": 0}}, "config.peft.update_proj_gap"),  # galore-torch: step % 0
        ("galore", {"peft": {"rank": "high"}}, "config.peft.rank"),
        ("prefix_tuning", {"peft": {"prefix_projection": "no"}}, "config.peft.prefix_projection"),
        ("lora", {"training": {"seed": -1}}, "config.training.seed"),
        ("prefix_tuning", {"training": {"gradient_checkpointing": True}}, "config.training.gradient_checkpointing"),
        ("ia3", {"peft": {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}}, "config.peft.feedforward_modules"),
    ],
)
def test_bad_method_config_names_the_field(llama, method, config, field):
    with pytest.raises(AdvisorInputError) as err:
        cfg = get_method(method).resolve_config(config)
        prepare(load_base_model(llama, cfg, on_meta=True), llama, cfg, on_meta=True)
    assert err.value.field == field, err.value.message
    if isinstance(config.get("peft", {}).get("target_modules"), str):  # a regular expression is named as one
        assert "regular expression" in err.value.message and "q_proj" in err.value.allowed


def test_registry_is_complete_and_described():
    assert [m.id for m in all_methods()] == list(METHOD_IDS)
    with pytest.raises(AdvisorInputError) as err:
        get_method("dora")
    assert err.value.field == "method" and "lora" in err.value.allowed
    for spec in all_methods():
        d = spec.describe()
        assert d["summary"] and d["applies_to"]
        for knob, source in d["citations"].items():
            assert source, f"{spec.id}.{knob} has no source"
