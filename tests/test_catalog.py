"""Hardware and model catalogs: data integrity, name resolution, and parameter counts on meta."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict

import pytest

from advisor.catalog import gpus as gpu_cat
from advisor.catalog import models as model_cat
from advisor.catalog.gpus import GPU, gpu_table, load_gpus, normalize_gpu_name, resolve_gpu
from advisor.catalog.models import ResolvedModel, load_models, model_table, resolve_model
from advisor.errors import AdvisorInputError

# ----------------------------------------------------------------------------------------- GPUs

REQUIRED_GPUS = {
    "rtx-3060", "rtx-3080", "rtx-3090", "rtx-4080", "rtx-4090", "rtx-5090", "a10g", "l4", "t4",
    "rtx-a5000", "rtx-a6000", "rtx-6000-ada", "l40s", "v100-16gb", "v100-32gb", "a100-40gb",
    "a100-80gb", "h100-sxm", "h100-pcie", "h200", "b200", "mi300x", "apple-m2-max-96gb",
    "apple-m3-max-128gb",
}


def test_gpu_catalog_has_required_entries():
    gpus = load_gpus()
    ids = [g.id for g in gpus]
    assert len(gpus) >= 24
    assert len(ids) == len(set(ids))
    assert REQUIRED_GPUS <= set(ids)


def test_every_gpu_name_resolves_to_its_own_entry():
    for gpu in load_gpus():
        for name in gpu.names():
            assert resolve_gpu(name).id == gpu.id, name
            assert resolve_gpu(name.upper()).id == gpu.id, name


def test_no_two_gpus_share_a_normalized_name():
    owners: dict[str, set[str]] = defaultdict(set)
    for gpu in load_gpus():
        for name in gpu.names():
            owners[normalize_gpu_name(name)].add(gpu.id)
    clashes = {k: v for k, v in owners.items() if len(v) > 1}
    assert not clashes


@pytest.mark.parametrize(
    "name, gpu_id",
    [
        ("4090", "rtx-4090"), ("rtx-4090", "rtx-4090"), ("RTX 4090", "rtx-4090"), ("RTX4090", "rtx-4090"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("geforce_rtx_4090", "rtx-4090"),
        ("A100-80GB", "a100-80gb"), ("a100 80gb", "a100-80gb"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("a100-40gb", "a100-40gb"), ("h100", "h100-sxm"), ("H100", "h100-sxm"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("h100 pcie", "h100-pcie"), ("Tesla T4", "t4"),
        ("t4", "t4"), ("a6000", "rtx-a6000"), ("L40S", "l40s"), ("mi300x", "mi300x"),
        ("m3 max", "apple-m3-max-128gb"), ("v100", "v100-16gb"),
    ],
)
def test_common_gpu_names(name, gpu_id):
    assert resolve_gpu(name).id == gpu_id


@pytest.mark.parametrize("name", ["gtx 1080", "", "h1000", "nvidia"])
def test_unknown_gpu_is_an_input_error(name):
    with pytest.raises(AdvisorInputError) as info:
        resolve_gpu(name)
    err = info.value
    assert err.field == "hardware.gpu"
    assert err.allowed == [g.id for g in load_gpus()]
    assert "unknown GPU" in str(err)


@pytest.mark.parametrize(("name", "gpu_id"), [
    ("RTX4090-24GB", "rtx-4090"), ("T4-16GB", "t4"), ("L40S-48GB", "l40s"), ("RTX 3090 24 GB", "rtx-3090"),
    ("A6000-48GB", "rtx-a6000"), ("H100-94GB", "h100-nvl"), ("V100-32GB", "v100-32gb"), ("A10G-24GB", "a10g"),
])
def test_a_name_with_its_memory_size_written_after_it_is_that_card(name, gpu_id):
    assert resolve_gpu(name).id == gpu_id


def test_a_stated_memory_size_that_no_such_card_has_or_a_bare_size_is_a_clear_error():
    with pytest.raises(AdvisorInputError) as info:
        resolve_gpu("RTX4090-48GB")
    assert info.value.field == "hardware.gpu" and "23.65 GiB" in str(info.value) and "vram_gib" in str(info.value)
    with pytest.raises(AdvisorInputError) as info:
        resolve_gpu("24GB")
    assert "memory size" in str(info.value) and "hardware.vram_gib: 24" in str(info.value)
    with pytest.raises(AdvisorInputError) as info:
        resolve_gpu("MI250")
    assert "did you mean mi250x" in str(info.value)


def test_gpu_fields_are_consistent():
    reserve = {"datacenter": 0.5, "workstation": 0.75, "consumer": 1.0}
    for g in load_gpus():
        assert 0 < g.usable_memory_gib < g.memory_gib
        if g.tier == "unified-memory":
            assert g.usable_memory_gib == pytest.approx(g.memory_gib * 0.75, abs=0.01)
        else:
            assert g.usable_memory_gib == pytest.approx(g.memory_gib - reserve[g.tier], abs=0.01)
        assert g.fp32_tflops <= g.fp16_tflops or g.vendor == "apple"
        if g.usd_per_hour is not None:
            assert g.price_date and g.price_source
    by_id = {g.id: g for g in load_gpus()}
    for gid in ("t4", "v100-16gb", "v100-32gb"):
        assert by_id[gid].bf16_supported is False and by_id[gid].bf16_tflops is None
    assert by_id["rtx-4090"].bf16_tflops == 165.2  # FP32-accumulate dense, not the 330.3 FP16-acc figure
    assert by_id["h100-sxm"].bf16_tflops == pytest.approx(989.4)


def test_gpu_table_rows():
    rows = gpu_table()
    assert len(rows) == len(load_gpus())
    assert {"id", "name", "memory_gib", "usable_memory_gib", "bf16_tflops", "usd_per_hour"} <= set(rows[0])
    GPU.model_validate(rows[0])


def test_profiles_dir_override(tmp_path, monkeypatch):
    (tmp_path / "gpus.yaml").write_text(
        "gpus:\n"
        "  - {id: toy, name: Toy GPU, aliases: [toy1], vendor: nvidia, architecture: Ampere, tier: datacenter,\n"
        "     memory_gib: 8.0, memory_basis: estimated, usable_memory_gib: 7.5, bf16_tflops: 10, fp16_tflops: 10,\n"
        "     fp32_tflops: 5, memory_bandwidth_gbs: 100, bf16_supported: true, source: test}\n"
    )
    monkeypatch.setenv(gpu_cat.PROFILES_ENV, str(tmp_path))
    assert [g.id for g in load_gpus()] == ["toy"]
    assert resolve_gpu("TOY-1").id == "toy"
    monkeypatch.delenv(gpu_cat.PROFILES_ENV)
    assert len(load_gpus()) >= 24


# --------------------------------------------------------------------------------------- models

REQUIRED_MODELS = {
    "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf",
    "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-70B", "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-405B", "meta-llama/Llama-3.2-1B",
    "meta-llama/Llama-3.2-3B", "mistralai/Mistral-7B-v0.1", "mistralai/Mixtral-8x7B-v0.1",
    "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-14B",
    "Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-72B", "microsoft/phi-1_5", "microsoft/phi-2",
    "microsoft/Phi-3-mini-4k-instruct", "google/gemma-2b", "google/gemma-7b", "google/gemma-2-9b",
    "google/gemma-2-27b", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "openai-community/gpt2",
    "tiiuae/falcon-7b", "stabilityai/stablelm-base-alpha-3b", "stabilityai/stablelm-3b-4e1t",
    "google-t5/t5-base", "google/flan-t5-base", "google/flan-t5-large", "google/flan-t5-xl",
    "bigscience/T0_3B", "bigscience/mt0-xxl", "bigscience/bloomz-7b1",
}


def test_model_catalog_has_required_entries():
    ids = [m.id for m in load_models()]
    assert len(ids) == len(set(ids))
    assert REQUIRED_MODELS <= set(ids)


def test_model_keys_are_unambiguous():
    owners: dict[str, set[str]] = defaultdict(set)
    for m in load_models():
        for key in m.keys():
            owners[key].add(m.id)
    assert not {k: v for k, v in owners.items() if len(v) > 1}
    for m in load_models():
        for key in m.keys():
            assert model_cat.find_model(key).id == m.id


@pytest.mark.parametrize("model_id", sorted(m.id for m in load_models()))
def test_computed_params_match_published(model_id):
    resolved = resolve_model(model_id)
    entry = resolved.entry
    assert entry is not None and resolved.origin == "catalog"
    assert resolved.kind == entry.kind
    assert resolved.config.model_type == entry.config["model_type"]
    summary = model_cat.computed_summary(resolved)  # the count computed now, not read from a cache or shipped
    assert model_cat.shipped_summaries().get(resolved.cache_key()) == summary, (
        "profiles/model_summaries.json is stale for this model: regenerate it with `python -m advisor.catalog.models`")
    n = summary["params"]
    if entry.published_params_exact:
        assert n == entry.published_params
    else:
        assert abs(n - entry.published_params) <= 0.01 * entry.published_params


def test_catalog_resolution_forms():
    for ref in ("meta-llama/Llama-2-7b-hf", "META-LLAMA/llama-2-7b-HF", "llama-2-7b-hf", "Llama-2-7B", "llama2-7b"):
        assert resolve_model(ref).id == "meta-llama/Llama-2-7b-hf"
    assert resolve_model("gpt2").id == "openai-community/gpt2"
    assert resolve_model("  flan-t5-base ").kind == "seq2seq"


def test_t5_lm_head_tying_follows_the_checkpoint():
    # t5-base ties lm_head to the shared embedding; flan-t5 (T5 v1.1) ships a separate lm_head.
    t5 = resolve_model("t5-base").build_meta()
    assert t5.lm_head.weight is t5.shared.weight
    flan = resolve_model("flan-t5-base").build_meta()
    assert flan.lm_head.weight is not flan.shared.weight
    assert flan.encoder.embed_tokens.weight is flan.shared.weight
    assert all(p.device.type == "meta" for p in flan.parameters())


def test_max_positions():
    assert resolve_model("llama-2-7b").max_positions == 4096
    assert resolve_model("gpt2").max_positions == 1024
    assert resolve_model("llama-3.1-8b").max_positions == 131072
    assert resolve_model("t5-base").max_positions is None
    assert resolve_model("bloomz-7b1").max_positions is None


def test_model_table_and_public_dict():
    rows = model_table()
    assert len(rows) == len(load_models())
    row = next(r for r in rows if r["id"] == "meta-llama/Llama-2-7b-hf")
    assert row["params"] == 6738415616 and row["layers"] == 32 and row["hidden"] == 4096
    assert row["vocab"] == 32000 and row["max_positions"] == 4096 and row["kind"] == "causal_lm"
    pub = resolve_model("flan-t5-xl").to_public()
    assert pub["kind"] == "seq2seq" and pub["layers"] == 24 and pub["decoder_layers"] == 24
    assert pub["params"] == 2849757184 and pub["max_positions"] is None
    json.dumps(pub)


def test_catalog_counts_come_from_the_shipped_table_and_a_bad_table_means_computing_them(tmp_path, monkeypatch):
    from advisor.settings import get_settings

    monkeypatch.setenv("ADVISOR_CACHE_DIR", str(tmp_path / "cache"))  # no disk cache of computed counts
    get_settings.cache_clear()
    model_cat.clear_cache()
    computed = []
    real_count = ResolvedModel.count_params
    monkeypatch.setattr(ResolvedModel, "count_params", lambda self: computed.append(self.id) or real_count(self))
    try:
        rows = {r["id"]: r for r in model_table()}
        assert computed == [] and rows["meta-llama/Llama-2-7b-hf"]["params"] == 6738415616  # all read, none built
        assert resolve_model("gpt2").num_params() == rows["openai-community/gpt2"]["params"] and computed == []

        # a profiles directory whose table is corrupt: the summaries are computed instead, and equal
        profiles = tmp_path / "profiles"
        (profiles / "models").mkdir(parents=True)
        for slug in ("openai-community--gpt2", "meta-llama--Llama-2-7b-hf"):
            shutil.copy(gpu_cat.profiles_dir() / "models" / f"{slug}.json", profiles / "models")
        (profiles / model_cat.SHIPPED_SUMMARIES).write_text("{not json")
        monkeypatch.setenv(gpu_cat.PROFILES_ENV, str(profiles))
        model_cat.clear_cache()
        assert resolve_model("gpt2").num_params() == 124439808 and computed == ["openai-community/gpt2"]
        recomputed = model_table()
        assert recomputed == [rows["meta-llama/Llama-2-7b-hf"], rows["openai-community/gpt2"]]
        assert computed == ["openai-community/gpt2", "meta-llama/Llama-2-7b-hf"]  # gpt2's count was cached
    finally:
        model_cat.clear_cache()
        get_settings.cache_clear()


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)


def _llama_params(h, inter, layers, heads, kv, vocab, tie=False):
    head_dim = h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    mlp = 3 * h * inter
    return vocab * h * (1 if tie else 2) + layers * (attn + mlp + 2 * h) + h


def test_local_directory_with_config(tmp_path):
    _tiny_llama_config().save_pretrained(tmp_path)
    r = resolve_model(str(tmp_path))
    assert r.origin == "local" and r.path == str(tmp_path.resolve()) and r.entry is None
    assert r.kind == "causal_lm" and r.max_positions == 256
    assert r.num_params() == _llama_params(64, 128, 2, 4, 2, 1000)
    # the config.json file itself works too
    assert resolve_model(str(tmp_path / "config.json")).num_params() == r.num_params()


def test_local_seq2seq_directory(tmp_path):
    from transformers import T5Config

    T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=100).save_pretrained(tmp_path)
    r = resolve_model(tmp_path)
    assert r.kind == "seq2seq" and r.max_positions is None
    assert r.num_params() > 0


def test_directory_without_config_json(tmp_path):
    with pytest.raises(AdvisorInputError) as info:
        resolve_model(str(tmp_path))
    assert info.value.field == "model"
    assert "config.json" in str(info.value)


def test_architecture_dict():
    r = resolve_model({"params_b": 7, "hidden_size": 4096, "num_hidden_layers": 32})
    assert r.origin == "dict" and r.kind == "causal_lm" and r.config.model_type == "llama"
    # Llama defaults (32 heads, 11008 = 8/3*4096 rounded up to 256, vocab 32000) reproduce Llama-2-7B
    assert r.num_params() == 6738415616
    assert r.declared_params == 7_000_000_000
    gqa = resolve_model({"name": "gqa", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                         "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256})
    assert gqa.id == "gqa" and gqa.num_params() == 8030261248  # Llama-3-8B shape
    assert gqa.to_public()["params"] == 8030261248


@pytest.mark.parametrize(
    "ref, field",
    [
        ({"params_b": 7}, "model.hidden_size"),
        ({"hidden_size": 4096}, "model.num_hidden_layers"),
        ({"hidden_size": 4096, "num_hidden_layers": 32, "params_b": 70}, "model.params_b"),
        ({"hidden_size": 4096, "num_hidden_layers": -1}, "model.num_hidden_layers"),
        ({"hidden_size": 4096, "num_hidden_layers": 2, "n_layer": 3}, "model.n_layer"),
        ({"hidden_size": 4096, "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 5},
         "model.num_key_value_heads"),
        ({"model_type": "no-such-architecture"}, "model"),
        # sizes out of range, named as the dict spells them (GPT-2's n_positions), from either form of dict
        ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 0, "num_attention_heads": 4},
         "model.num_hidden_layers"),
        ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": -5}, "model.intermediate_size"),
        ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 0}, "model.n_positions"),
        ({"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 10**9}, "model.vocab_size"),
    ],
)
def test_bad_architecture_dict(ref, field):
    with pytest.raises(AdvisorInputError) as info:
        resolve_model(ref)
    assert info.value.field == field


def test_full_config_dict():
    entry = model_cat.find_model("gpt2")
    r = resolve_model(dict(entry.config))
    assert r.origin == "dict" and r.kind == "causal_lm" and r.entry is None
    assert r.num_params() == entry.published_params
    cfg = _tiny_llama_config().to_dict()
    assert resolve_model(cfg).num_params() == _llama_params(64, 128, 2, 4, 2, 1000)


def test_encoder_only_model_is_rejected():
    with pytest.raises(AdvisorInputError) as info:
        resolve_model({"model_type": "distilbert", "dim": 64, "n_layers": 2,
                       "n_heads": 2, "hidden_dim": 128})
    assert info.value.field == "model" and "causal LM" in str(info.value)


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AdvisorInputError) as info:
        resolve_model("some-org/definitely-not-a-real-model-xyz")
    err = info.value
    assert err.field == "model"
    assert "unknown model" in str(err) and "HF_HUB_OFFLINE" in str(err)
    assert "meta-llama/Llama-2-7b-hf" in err.allowed


@pytest.mark.parametrize(("ref", "base"), [
    ("meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-hf"),
    ("Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B"),
    ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B"),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mistralai/Mixtral-8x7B-v0.1"),
    ("google/gemma-7b-it", "google/gemma-7b"),
])
def test_chat_variant_offline_uses_its_base_architecture(monkeypatch, ref, base):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rm = resolve_model(ref)
    assert rm.id == base and rm.note and ref in rm.note and base in rm.note


@pytest.mark.parametrize(("ref", "base", "why"), [
    ("NousResearch/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf", "another organisation"),
    ("unsloth/llama-3-8b-Instruct-bnb-4bit", "meta-llama/Meta-Llama-3-8B", "'-bnb-4bit' suffix"),
    ("TheBloke/Llama-2-7B-Chat-GPTQ", "meta-llama/Llama-2-7b-hf", "'-GPTQ' suffix"),
    ("Qwen/Qwen-7B-Chat-Int4", "Qwen/Qwen-7B", "'-Int4' suffix"),
    ("Qwen/Qwen3-8B-Base", "Qwen/Qwen3-8B", "variant"),
    ("mistralai/Mistral-Nemo-Instruct-2407", "mistralai/Mistral-Nemo-Base-2407", "variant"),
    ("google/gemma-3-4b-it", "google/gemma-3-4b-pt", "variant"),
])
def test_mirrors_quantized_copies_and_variants_offline_use_the_catalog_architecture(monkeypatch, ref, base, why):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rm = resolve_model(ref)
    assert rm.id == base and rm.origin == "catalog"
    assert ref in rm.note and base in rm.note and why in rm.note


def test_qwen1_is_built_as_the_qwen2_block_it_is():
    # Qwen-1 (remote code) = Qwen2's block: biased q/k/v, unbiased o_proj, SwiGLU at half the config's
    # intermediate_size; the published 7.72B follows from that layout, and the chat model resolves to it
    rm = resolve_model("qwen-7b-chat")
    assert rm.id == "Qwen/Qwen-7B" and rm.config.model_type == "qwen2"
    attn = rm.build_meta().model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    assert abs(rm.num_params() - 7.72e9) < 0.01 * 7.72e9


def test_an_unknown_name_offline_suggests_the_nearest_catalog_ids(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AdvisorInputError) as info:
        resolve_model("some-org/Qwen2.5-7B-Instrukt-v9")
    message = str(info.value)
    assert info.value.field == "model" and "did you mean" in message and "Qwen/Qwen2.5-7B" in message
    assert "hidden_size" in message  # how to give the architecture itself


@pytest.mark.parametrize(("ref", "base", "why"), [
    # ms-swift's model-type names and family names without the dash
    ("qwen1half-7b-chat", "Qwen/Qwen1.5-7B", "'1half' as '1.5'"),
    ("qwen1half-moe-a2_7b-chat", "Qwen/Qwen1.5-MoE-A2.7B", "'_' between digits as '.'"),
    ("llama3_1-8b-instruct", "meta-llama/Llama-3.1-8B", "'_' between digits as '.'"),
    ("phi3-mini-4k-instruct", "microsoft/Phi-3-mini-4k-instruct", "'phi3' as 'phi-3'"),
    # community fine-tunes: by the base their name contains, or by the base their model card states
    ("teknium/OpenHermes-2.5-Mistral-7B", "mistralai/Mistral-7B-v0.1", "it names 'Mistral-7B'"),
    ("NousResearch/Nous-Hermes-2-Mixtral-8x7B-DPO", "mistralai/Mixtral-8x7B-v0.1", "it names 'Mixtral-8x7B'"),
    ("lmsys/vicuna-13b-v1.5", "meta-llama/Llama-2-13b-hf", "Vicuna v1.5 is fine-tuned from Llama 2"),
    ("TheBloke/guanaco-33B-GPTQ", "huggyllama/llama-30b", "Guanaco is LLaMA"),
    ("HuggingFaceH4/zephyr-7b-beta", "mistralai/Mistral-7B-v0.1", "fine-tuned from Mistral-7B-v0.1"),
])
def test_other_spellings_and_fine_tunes_offline_use_their_base_architecture(monkeypatch, ref, base, why):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rm = resolve_model(ref)
    assert rm.id == base and rm.origin == "catalog"
    assert ref in rm.note and base in rm.note and why in rm.note


@pytest.mark.parametrize("ref", ["mistralai/Mistral-7B-Instruct-v0.9", "Mistral-7B-v0.9-finetune",
                                 "some-org/qwen9half-7b-chat"])
def test_another_version_of_a_catalog_model_is_not_taken_for_a_fine_tune(monkeypatch, ref):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AdvisorInputError) as info:
        resolve_model(ref)
    assert info.value.field == "model"


def test_chat_variant_of_another_version_is_not_guessed(monkeypatch):
    # a chat variant of a version the catalog lacks (v0.9) is not v0.1's architecture: no fallback
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AdvisorInputError) as info:
        resolve_model("mistralai/Mistral-7B-Instruct-v0.9")
    assert info.value.field == "model"


def test_missing_local_path_is_an_input_error(tmp_path):
    with pytest.raises(AdvisorInputError) as info:
        resolve_model(str(tmp_path / "nope" / "deeper"))
    assert info.value.field == "model"


def test_param_count_cache_and_fresh_objects():
    a, b = resolve_model("llama-2-7b"), resolve_model("llama-2-7b")
    assert a is not b and a.cache_key() == b.cache_key()
    assert a.num_params() == b.num_params()
    assert isinstance(a, ResolvedModel)


@pytest.mark.parametrize(("model_id", "expected"), [
    ("EleutherAI/gpt-j-6b", ["q_proj", "k_proj", "v_proj", "out_proj"]),
    ("facebook/opt-125m", ["q_proj", "k_proj", "v_proj", "out_proj"]),
    ("microsoft/phi-2", ["q_proj", "k_proj", "v_proj", "dense"]),
    ("microsoft/Phi-3-mini-4k-instruct", ["qkv_proj", "o_proj"]),
])
def test_llama_style_default_targets_map_to_a_family_that_shares_q_k_v_names(model_id, expected):
    """The seeds' default [q, k, v, o]_proj on a family that names some of them otherwise (another output projection,
    Phi-3's fused qkv_proj): their equivalents, not a refusal; a name with no equivalent stays an error naming the field."""
    from advisor.methods._targets import resolve_targets

    model = resolve_model(model_id).build_meta()
    got = resolve_targets(model, ["q_proj", "k_proj", "v_proj", "o_proj"], model.config.model_type, "config.peft.t")
    assert got == expected
    with pytest.raises(AdvisorInputError) as info:
        resolve_targets(model, [expected[-1], "nonexistent"], model.config.model_type, "config.peft.t")
    assert info.value.field == "config.peft.t"


def test_prompt_tuning_on_a_model_that_embeds_narrower_than_its_hidden_size(tmp_path, monkeypatch):
    """OPT-350m embeds tokens in 512 and projects to 1024: the virtual tokens take the embeddings' width (PEFT's
    default, hidden_size, failed to concatenate)."""
    from advisor.estimator.fast import fast_estimate
    from advisor.schemas import EstimateRequest
    from advisor.settings import get_settings

    monkeypatch.setenv("ADVISOR_CACHE_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        est = fast_estimate(EstimateRequest.model_validate({
            "model": "facebook/opt-350m", "method": "prompt_tuning", "hardware": {"gpu": "a10g"},
            "config": {"training": {"per_device_train_batch_size": 1, "max_seq_length": 64}}}))
    finally:
        get_settings.cache_clear()
    assert est["trainable_params"] == 20 * 512 and est["fits"]


@pytest.mark.parametrize(("ref", "expected"), [
    ("Llama 2 7B", "meta-llama/Llama-2-7b-hf"), ("Flan-T5 XL", "google/flan-t5-xl"), ("GPT-J 6B", "EleutherAI/gpt-j-6b"),
    ("Llama 3.1 70B", "meta-llama/Llama-3.1-70B"),
])
def test_names_typed_with_spaces_find_their_dashed_alias(ref, expected):
    assert model_cat.find_model(ref).id == expected


def test_a_chat_variant_typed_with_spaces_uses_its_base(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("Llama 2 7B chat").id == "meta-llama/Llama-2-7b-hf"


def test_resolving_a_model_leaves_its_catalog_entry_and_config_hash_unchanged():
    import copy

    entry = model_cat.find_model("deepseek-ai/deepseek-coder-1.3b-base")  # rope_scaling, which transformers updates
    before = copy.deepcopy(entry.config)
    first = resolve_model(entry.id).cache_key()
    assert entry.config == before and resolve_model(entry.id).cache_key() == first
    assert model_cat._config_hash(entry.kind, entry.config) == first


def test_the_size_check_passes_every_transformers_config_class_as_it_comes():
    """The range check on a config's sizes refuses typos, not real architectures: each config class of a causal or
    seq2seq LM in the installed transformers (what the advisor takes), with its own defaults (XLNet's -1 positions,
    Doge's 16,384 experts), passes it."""
    import warnings

    from transformers import CONFIG_MAPPING

    from advisor.catalog.models import _mapping_names, config_from_dict

    causal, seq2seq = _mapping_names()
    checked, refused = 0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in sorted(set(causal) | set(seq2seq)):
            try:
                raw = {**CONFIG_MAPPING[model_type]().to_dict(), "model_type": model_type}
            except Exception:  # noqa: BLE001 - classes that need arguments have no defaults to check
                continue
            try:
                config_from_dict(raw)
            except AdvisorInputError as err:
                if "whole number" in err.message:
                    refused.append((model_type, err.message))
            except Exception:  # noqa: BLE001 - failures of transformers itself are not this check's
                pass
            checked += 1
    assert checked > 150 and not refused, refused
