import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from advisor.methods.modules.bottleneck import AdapterWrapped, BottleneckAdapter, add_bottleneck_adapters


def tiny_llama():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg)


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64))


def tiny_t5():
    cfg = T5Config(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2, vocab_size=128,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg)


def run(model, ids):
    if model.config.is_encoder_decoder:
        return model(input_ids=ids, decoder_input_ids=ids).logits
    return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "factory, placement, expected",
    [
        (tiny_llama, "pfeiffer", ["model.layers.0.mlp.adapter", "model.layers.1.mlp.adapter"]),
        (tiny_llama, "houlsby", ["model.layers.0.mlp.adapter", "model.layers.0.self_attn.o_proj.adapter",
                                 "model.layers.1.mlp.adapter", "model.layers.1.self_attn.o_proj.adapter"]),
        (tiny_gpt2, "houlsby", ["transformer.h.0.mlp.adapter", "transformer.h.0.attn.c_proj.adapter",
                                "transformer.h.1.mlp.adapter", "transformer.h.1.attn.c_proj.adapter"]),
        (tiny_t5, "pfeiffer", ["encoder.block.0.layer.1.DenseReluDense.adapter",
                               "encoder.block.1.layer.1.DenseReluDense.adapter",
                               "decoder.block.0.layer.2.DenseReluDense.adapter",
                               "decoder.block.1.layer.2.DenseReluDense.adapter"]),
        (tiny_t5, "houlsby", None),
    ],
)
def test_identity_at_init_then_trainable(factory, placement, expected):
    torch.manual_seed(0)
    model = factory().eval()
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        ref = run(model, ids)
    names = add_bottleneck_adapters(model, reduction_factor=8, placement=placement)
    if expected is not None:
        assert names == expected
    else:  # T5 Houlsby: FFN + self-attention in each of 4 blocks
        assert len(names) == 8 and sum(n.endswith("SelfAttention.o.adapter") for n in names) == 4
    for name in names:
        adapter = model.get_submodule(name)
        assert isinstance(adapter, BottleneckAdapter) and adapter.down.out_features == 8
    with torch.no_grad():
        assert torch.equal(run(model, ids), ref)

    # freeze the base like the caller would; only adapters train and they now change the output
    for n, p in model.named_parameters():
        p.requires_grad_(".adapter." in n)
    run(model, ids).sum().backward()
    ups = [model.get_submodule(n).up.weight for n in names]
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in ups)
    with torch.no_grad():
        for w in ups:
            w.normal_(0, 0.5)
        assert not torch.allclose(run(model, ids), ref)


def test_adapter_and_wrapper_mechanics():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(16, reduction_factor=4, non_linearity="relu")
    nn.init.normal_(adapter.up.weight)
    x = torch.randn(3, 16)
    assert torch.allclose(adapter(x), x + adapter.up(torch.relu(adapter.down(x))))

    class TupleOut(nn.Module):
        def forward(self, x):
            return x * 2, "extra"

    out, extra = AdapterWrapped(TupleOut(), adapter)(x)
    assert extra == "extra" and torch.allclose(out, adapter(2 * x))
    with pytest.raises(ValueError, match="non_linearity"):
        BottleneckAdapter(16, non_linearity="tanh")


def test_no_block_raises():
    model = nn.Sequential(nn.Linear(4, 4))
    model.config = GPT2Config(n_embd=4, n_head=1)
    with pytest.raises(ValueError, match="no transformer block"):
        add_bottleneck_adapters(model)


def test_meta_device_and_dtype():
    with torch.device("meta"):
        model = tiny_llama().to(torch.bfloat16)
    names = add_bottleneck_adapters(model, placement="houlsby")
    for name in names:
        p = model.get_submodule(name).down.weight
        assert p.device.type == "meta" and p.dtype == torch.bfloat16
    logits = model(input_ids=torch.zeros(2, 8, dtype=torch.long, device="meta")).logits
    assert logits.shape == (2, 8, 128) and logits.device.type == "meta"
