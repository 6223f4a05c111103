import pytest
import torch
from torch import nn
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from advisor.methods.modules import s2attn
from advisor.methods.modules.s2attn import S2_CALLS, disable_s2attn, enable_s2attn, register_s2attn, s2_attention_forward


class FakeAttn(nn.Module):
    def __init__(self, ratio=0.25, n_rep=1, mask_wraparound=False):
        super().__init__()
        self.config = type("C", (), {"s2attn_group_size_ratio": ratio, "s2attn_mask_wraparound": mask_wraparound})()
        self.num_key_value_groups = n_rep
        self.is_causal = True


def naive(q, k, v, allowed):
    """Reference attention with an explicit boolean mask (n, n); q/k/v (b, h, n, d) -> (b, h, n, d)."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def block_causal(n, group_size, offset=0):
    i = torch.arange(n)
    gid = (i + offset) // group_size
    return (i[:, None] >= i[None, :]) & (gid[:, None] == gid[None, :])


def qkv(b=2, h=4, kv=4, n=16, d=8):
    torch.manual_seed(0)
    return torch.randn(b, h, n, d), torch.randn(b, kv, n, d), torch.randn(b, kv, n, d)


@pytest.mark.parametrize("n_kv", [4, 2])
def test_shifted_path_matches_naive_reference(n_kv):
    n, group = 16, 4
    q, k, v = qkv(kv=n_kv, n=n)
    module = FakeAttn(n_rep=4 // n_kv).train()
    before = S2_CALLS["shifted"]
    out, weights = s2_attention_forward(module, q, k, v, None)
    assert S2_CALLS["shifted"] == before + 1 and weights is None
    assert out.shape == (2, n, 4, 8)
    out = out.transpose(1, 2)  # back to (b, h, n, d)
    k, v = k.repeat_interleave(4 // n_kv, 1), v.repeat_interleave(4 // n_kv, 1)
    mask = block_causal(n, group)
    torch.testing.assert_close(out[:, :2], naive(q[:, :2], k[:, :2], v[:, :2], mask))
    rolled = [t[:, 2:].roll(-group // 2, dims=2) for t in (q, k, v)]  # paper's Algorithm 1 on rolled inputs
    torch.testing.assert_close(out[:, 2:], naive(*rolled, mask).roll(group // 2, dims=2))


def test_wraparound_mask_is_causal_shifted_grouping():
    n, group = 16, 4
    q, k, v = qkv(n=n)
    out, _ = s2_attention_forward(FakeAttn(mask_wraparound=True).train(), q, k, v, None)
    out = out.transpose(1, 2)
    torch.testing.assert_close(out[:, :2], naive(q[:, :2], k[:, :2], v[:, :2], block_causal(n, group)))
    # shifted heads: groups [0, 2), [2, 6), ..., [14, 16) in original order, strictly causal (no wrap-around)
    shifted_mask = block_causal(n, group, offset=group // 2)
    torch.testing.assert_close(out[:, 2:], naive(q[:, 2:], k[:, 2:], v[:, 2:], shifted_mask))


@pytest.mark.parametrize(
    "train, n, mask, ratio",
    [
        (False, 16, False, 0.25),  # eval -> full attention
        (True, 18, False, 0.25),  # 18 % int(18 * 0.25) != 0
        (True, 16, True, 0.25),  # explicit mask
        (True, 16, False, 0.75),  # a single group would not fit twice
        (True, 4, False, 0.25),  # group size 1
    ],
)
def test_fallback_equals_sdpa(train, n, mask, ratio):
    q, k, v = qkv(kv=2, n=n)
    module = FakeAttn(ratio=ratio, n_rep=2).train(train)
    attn_mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None] if mask else None
    before = dict(S2_CALLS)
    out, _ = s2_attention_forward(module, q, k, v, attn_mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, attn_mask, scaling=0.3)
    assert torch.equal(out, ref)
    assert S2_CALLS["shifted"] == before.get("shifted", 0) and S2_CALLS["full"] == before.get("full", 0) + 1


def test_meta_tensors():
    q, k, v = (torch.empty(2, 4, 16, 8, device="meta") for _ in range(3))
    for wrap in (False, True):
        out, _ = s2_attention_forward(FakeAttn(mask_wraparound=wrap).train(), q, k, v, None)
        assert out.shape == (2, 16, 4, 8) and out.device.type == "meta"


def test_register_is_idempotent():
    assert register_s2attn() == register_s2attn() == "s2attn"
    assert AttentionInterface._global_mapping["s2attn"] is s2_attention_forward
    assert "s2attn" in AttentionMaskInterface._global_mapping


def test_tiny_llama_train_and_generate():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (2, 16))
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    model.eval()
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref_padded = model(ids, attention_mask=padded).logits
    ref_gen = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False)

    enable_s2attn(model, group_size_ratio=0.25)
    assert model.config._attn_implementation == "s2attn" and model.config.s2attn_group_size_ratio == 0.25

    model.train()
    before = S2_CALLS["shifted"]
    out = model(ids, labels=ids)
    assert S2_CALLS["shifted"] == before + cfg.num_hidden_layers
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not torch.allclose(out.logits, ref_logits)  # grouped attention differs from full attention
    model(ids, attention_mask=torch.ones_like(ids))  # an all-ones padding mask is dropped -> still shifted
    assert S2_CALLS["shifted"] == before + 2 * cfg.num_hidden_layers
    # real padding -> full-attention fallback; the padding mask reaches attention (needs the mask-fn registration)
    torch.testing.assert_close(model(ids, attention_mask=padded).logits, ref_padded)
    assert S2_CALLS["shifted"] == before + 2 * cfg.num_hidden_layers

    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)
    assert torch.equal(model.generate(ids[:, :5], max_new_tokens=4, do_sample=False), ref_gen)
    assert S2_CALLS["shifted"] == before + 2 * cfg.num_hidden_layers

    disable_s2attn(model)
    assert model.config._attn_implementation == "sdpa"


def test_module_docstring_cites_paper():
    assert "2309.12307" in s2attn.__doc__


def test_tiny_llama_on_meta_device():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    enable_s2attn(model, mask_wraparound=True)
    model.train()
    before = S2_CALLS["shifted"]
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.shape == (2, 16, 128) and S2_CALLS["shifted"] == before + 2
