import itertools

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from advisor.methods.modules.molora import MoLoRALinear, apply_molora, molora_aux_loss, molora_state_dict


def tiny_llama_config():
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128)


def make_layer(num_experts=4, top_k=2):
    torch.manual_seed(0)
    return MoLoRALinear(nn.Linear(12, 10), num_experts=num_experts, top_k=top_k, r=3, alpha=6, dropout=0.0)


def test_identity_at_init():
    layer = make_layer()
    x = torch.randn(2, 5, 12)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_matches_per_token_reference(top_k):
    layer = make_layer(top_k=top_k)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 12)
    out = layer(x)
    ref = torch.empty_like(out)
    for idx in itertools.product(range(2), range(5)):
        t = x[idx]
        logits = layer.router(t)
        vals, experts = logits.topk(top_k)
        gates = vals.softmax(-1)
        delta = sum(g * (t @ layer.lora_A[e]) @ layer.lora_B[e] for g, e in zip(gates, experts.tolist()))
        ref[idx] = layer.base_layer(t) + layer.scaling * delta
    torch.testing.assert_close(out, ref)
    assert layer.scaling == 2.0


def test_gradients_and_aux_loss():
    layer = make_layer().train()
    nn.init.normal_(layer.lora_B)
    out = layer(torch.randn(4, 7, 12))
    assert layer.aux_loss is not None and layer.aux_loss.ndim == 0
    (out.square().mean() + 0.01 * molora_aux_loss(layer)).backward()
    for p in (layer.router.weight, layer.lora_A, layer.lora_B):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    layer.eval()
    layer(torch.randn(1, 12))
    assert layer.aux_loss is None


def test_aux_loss_value():
    layer = make_layer(num_experts=2, top_k=1).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 1.0, -1.0
    x = torch.zeros(4, 12)
    x[:2, 0], x[2:, 0] = 5.0, -5.0  # perfectly balanced: half the tokens go to each expert
    layer(x)
    probs = layer.router(x).softmax(-1)
    expected = 2 * (0.5 * probs[:, 0].mean() + 0.5 * probs[:, 1].mean())
    torch.testing.assert_close(layer.aux_loss, expected)
    torch.testing.assert_close(layer.aux_loss, torch.tensor(1.0))


def test_apply_errors_and_state_dict():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(ValueError, match="available: .*q_proj"):
        apply_molora(model, target_modules=("query",))
    names = apply_molora(model, target_modules=("q_proj", "v_proj"))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    sd = molora_state_dict(model)
    assert set(sd) == {f"{n}.{k}" for n in names for k in ("router.weight", "lora_A", "lora_B")}
    full = model.state_dict()
    assert all(torch.equal(full[k], v) for k, v in sd.items())


def test_reapply_does_not_wrap_base_or_router():
    model = LlamaForCausalLM(tiny_llama_config())
    apply_molora(model, target_modules=("q_proj",))
    with pytest.raises(ValueError):
        apply_molora(model, target_modules=("q_proj", "base_layer", "router"))


def test_tiny_llama_trains():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.requires_grad_(False)
    apply_molora(model, num_experts=4, top_k=2, r=4, alpha=8, dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4 * 3
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 128, (4, 16))
    model.train()
    losses = []
    for _ in range(5):
        lm_loss = model(ids, labels=ids).loss
        losses.append(lm_loss.item())
        (lm_loss + 0.01 * molora_aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]


def test_meta_device():
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    apply_molora(model)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, MoLoRALinear)
    assert layer.lora_A.device.type == "meta" and layer.lora_B.dtype == torch.bfloat16
    model.train()
    logits = model(input_ids=torch.zeros(2, 8, dtype=torch.long, device="meta")).logits
    assert logits.shape == (2, 8, 128) and logits.device.type == "meta"
    assert molora_aux_loss(model).device.type == "meta"
