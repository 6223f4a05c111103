"""Exports as users run them: Axolotl / LLaMA-Factory YAML with the tools' key names, the standalone training script
actually trained on tiny local models (then its outputs reloaded with PEFT / transformers), accelerate configs loaded
by accelerate's own classes, refusals, the `advisor export` command and POST /v1/export on a real uvicorn server.

Recommendations are written by hand in the Recommendation shape (CONTRACT.md), configs filled in by the method
registry, so these tests do not depend on the recommender.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import AdvisorServer
import torch
import yaml
from typer.testing import CliRunner

from advisor.errors import AdvisorInputError
from advisor.export import export
from advisor.export import axolotl as axolotl_fmt
from advisor.export import llamafactory as lf_fmt
from advisor.methods import get_method

ADVISOR = [sys.executable, "-m", "advisor.cli"]
ROOT = Path(__file__).resolve().parents[1]
A100 = "NVIDIA A100 80GB"


def config(method: str, **training) -> dict:
    base = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_seq_length": 64,
            "logging_steps": 1}
    return get_method(method).resolve_config({"training": {**base, **training}}).model_dump(mode="json")


def make_rec(model, method: str, alternatives=(), *, count: int = 1, strategy: str | None = None, gpu: str = A100,
             sources: dict | None = None, **training) -> dict:
    strategy = strategy or ("single" if count == 1 else "ddp")
    estimate = {"peak_vram_gib": 9.8, "fits": True, "max_micro_batch": 8, "seq_len": 64, "strategy": strategy,
                "hardware": {"name": gpu, "count": count, "usable_memory_gib": 79.2}, "train_hours": 0.5,
                "cost_usd": 1.25, "total_steps": 48}
    return {
        "decision": "fine_tune", "method": method, "config": config(method, **training), "estimate": estimate,
        "reasons": [{"rule": "hardware.consumer_24gb", "says": "Consumer GPU (24 GB): QLoRA, r=16",
                     "source": "000_369b0fe7524e8611.txt § Decision Tree by Hardware"}],
        "alternatives": [{"method": m, "config": config(m), "estimate": estimate, "why_not_first": "scores lower"}
                         for m in alternatives],
        "rejected": [], "notes": [], "model": str(model), "config_sources": sources or {},
        "scenario": {"model": str(model), "hardware": {"gpu": gpu, "count": count},
                     "dataset": {"num_examples": 2000}},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from advisor.demo import write_datasets

    return write_datasets(tmp_path_factory.mktemp("data"), n=48)


# ------------------------------------------------------------------------------------------------ Axolotl
def test_axolotl_yaml_for_qlora_lora_full(tiny_dirs, data):
    llama = tiny_dirs["llama"]
    rule = {"value": 16, "rule": "hardware.consumer_24gb_qlora",
            "source": "000_369b0fe7524e8611.txt § Decision Tree by Hardware"}
    rec = make_rec(llama, "qlora", ["lora", "full"], sources={"r": rule})
    out = export("axolotl", recommendation=rec, dataset=str(data["alpaca"]))
    assert out["format"] == "axolotl" and out["method"] == "qlora" and out["chosen"] is True
    text = out["content"]
    cfg = yaml.safe_load(text)
    assert set(cfg) <= axolotl_fmt.KNOWN_KEYS
    assert cfg["base_model"] == str(llama)
    assert cfg["adapter"] == "qlora" and cfg["load_in_4bit"] is True
    assert (cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (16, 32, 0.05)
    assert cfg["lora_target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg["bnb_config_kwargs"] == {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    assert (cfg["sequence_len"], cfg["micro_batch_size"], cfg["gradient_accumulation_steps"]) == (64, 2, 2)
    assert (cfg["num_epochs"], cfg["learning_rate"], cfg["lr_scheduler"]) == (3.0, 2e-4, "cosine")
    assert cfg["warmup_ratio"] == 0.03
    assert cfg["optimizer"] == "adamw_torch_fused" and cfg["bf16"] is True and cfg["fp16"] is False
    assert cfg["gradient_checkpointing"] is False and cfg["sample_packing"] is False
    assert "gradient_checkpointing_kwargs" not in cfg
    assert cfg["datasets"] == [{"path": str(data["alpaca"]), "ds_type": "json", "type": "alpaca"}]
    assert cfg["train_on_inputs"] is False and cfg["val_set_size"] == 0.1
    assert cfg["output_dir"] == "outputs/llama-qlora" and cfg["use_tensorboard"] is True
    assert "deepspeed" not in cfg
    # the command to run it, the reasons, and "why" beside the knobs (the rule that set r; seed citations)
    assert "#   axolotl train axolotl_config.yml" in text
    assert "Consumer GPU (24 GB): QLoRA, r=16 [seed 000 § Decision Tree by Hardware]" in text
    assert "lora_r: 16  # hardware.consumer_24gb_qlora (seed 000 § Decision Tree by Hardware)" in text
    assert "lora_alpha: 32  # from seed 000 § Practical Implementation Guide > QLoRA Example" in text

    lora = yaml.safe_load(export("axolotl", recommendation=rec, method="lora")["content"])
    assert lora["adapter"] == "lora" and "load_in_4bit" not in lora and "bnb_config_kwargs" not in lora
    assert lora["lora_target_modules"] == ["q_proj", "v_proj"] and lora["learning_rate"] == 2e-4
    assert lora["datasets"][0]["path"] == "data/train.jsonl"  # placeholder when no dataset is given

    full = export("axolotl", recommendation=rec, method="full", dataset=str(data["chat"]))
    assert full["chosen"] is False and "Not the first choice: scores lower" in full["content"]
    fcfg = yaml.safe_load(full["content"])
    assert "adapter" not in fcfg and not any(k.startswith("lora_") for k in fcfg)
    assert fcfg["learning_rate"] == 1e-5 and fcfg["lr_scheduler"] == "linear"
    assert fcfg["chat_template"] == "tokenizer_default"
    assert fcfg["datasets"][0] == {"path": str(data["chat"]), "ds_type": "json", "type": "chat_template",
                                   "field_messages": "messages", "roles_to_train": ["assistant"]}


def test_axolotl_galore_bitfit_completion_text_and_multi_gpu(tiny_dirs, data):
    gal = make_rec(tiny_dirs["llama"], "galore", count=4, strategy="zero3_offload")
    out = export("axolotl", recommendation=gal, dataset=str(data["completion"]))
    cfg = yaml.safe_load(out["content"])
    assert cfg["optimizer"] == "galore_adamw"
    assert cfg["optim_target_modules"] == ["attn", "attention", "mlp", "DenseReluDense"]
    assert cfg["optim_args"] == {"rank": 256, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
    assert cfg["datasets"][0]["type"] == {"field_instruction": "prompt", "field_output": "completion",
                                          "format": "{instruction}", "no_input_format": "{instruction}"}
    zero = cfg["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert "axolotl train axolotl_config.yml --launcher accelerate -- --num_processes=4" in out["content"]

    ckpt = make_rec(tiny_dirs["llama"], "qlora", gradient_checkpointing=True, gradient_checkpointing_reentrant=True)
    ckpt = yaml.safe_load(export("axolotl", recommendation=ckpt)["content"])
    assert ckpt["gradient_checkpointing"] is True and ckpt["gradient_checkpointing_kwargs"] == {"use_reentrant": True}

    bit = yaml.safe_load(export("axolotl", recommendation=make_rec(tiny_dirs["gpt2"], "bitfit"),
                                dataset=str(data["text"]))["content"])
    assert bit["unfrozen_parameters"] == [".+bias$"] and "adapter" not in bit
    assert bit["datasets"][0] == {"path": str(data["text"]), "ds_type": "json", "type": "completion", "field": "text"}
    with pytest.raises(AdvisorInputError) as err:  # Llama has no biases to unfreeze
        export("axolotl", recommendation=make_rec(tiny_dirs["llama"], "bitfit"))
    assert err.value.field == "config.peft.bias_source"


# ------------------------------------------------------------------------------------------------ LLaMA-Factory
def _training_argument_names() -> set[str]:
    from transformers import Seq2SeqTrainingArguments

    return set(inspect.signature(Seq2SeqTrainingArguments).parameters)


def test_llamafactory_yaml_for_qlora_lora_full(tiny_dirs, data):
    rec = make_rec(tiny_dirs["llama"], "qlora", ["lora", "full"], gradient_checkpointing=True)
    out = export("llamafactory", recommendation=rec, dataset=str(data["chat"]))
    cfg = yaml.safe_load(out["content"])
    # every key is LLaMA-Factory's own or a transformers training argument (it refuses any other)
    assert set(cfg) - lf_fmt.OWN_KEYS <= _training_argument_names() | {"warmup_ratio"}
    assert cfg["model_name_or_path"] == str(tiny_dirs["llama"])
    assert (cfg["quantization_bit"], cfg["quantization_method"], cfg["quantization_type"]) == (4, "bnb", "nf4")
    assert cfg["double_quantization"] is True
    assert (cfg["stage"], cfg["finetuning_type"], cfg["do_train"]) == ("sft", "lora", True)
    assert (cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"]) == (16, 32, 0.05)
    assert cfg["lora_target"] == "q_proj,k_proj,v_proj,o_proj"
    assert (cfg["cutoff_len"], cfg["per_device_train_batch_size"], cfg["gradient_accumulation_steps"]) == (64, 2, 2)
    assert (cfg["learning_rate"], cfg["num_train_epochs"], cfg["lr_scheduler_type"]) == (2e-4, 3.0, "cosine")
    assert cfg["warmup_steps"] == 1  # round(0.03 × 48 steps): whole steps work before and after transformers 5.2
    assert cfg["bf16"] is True and cfg["fp16"] is False and cfg["optim"] == "adamw_torch_fused"
    assert "disable_gradient_checkpointing" not in cfg  # checkpointing on: LLaMA-Factory's default
    assert cfg["use_reentrant_gc"] is False  # as estimated; LLaMA-Factory's own default is reentrant
    assert cfg["train_on_prompt"] is False and cfg["val_size"] == 0.1 and cfg["packing"] is False
    assert cfg["report_to"] == "tensorboard" and cfg["eval_strategy"] == "steps"
    assert cfg["template"] == "default" and cfg["dataset"] == lf_fmt.DATASET_NAME
    assert cfg["dataset_dir"] == str(Path(data["chat"]).parent)
    info = json.loads(out["files"]["dataset_info.json"])[lf_fmt.DATASET_NAME]
    assert info["file_name"] == Path(data["chat"]).name and info["formatting"] == "sharegpt"
    assert info["columns"] == {"messages": "messages"} and info["tags"]["assistant_tag"] == "assistant"
    assert "llamafactory-cli train llamafactory_config.yaml" in out["content"]

    lora = yaml.safe_load(export("llamafactory", recommendation=rec, method="lora")["content"])
    assert lora["finetuning_type"] == "lora" and "quantization_bit" not in lora
    assert lora["lora_target"] == "q_proj,v_proj"
    full = export("llamafactory", recommendation=rec, method="full", dataset=str(data["text"]))
    full = yaml.safe_load(full["content"])
    assert full["finetuning_type"] == "full" and not any(k.startswith("lora_") for k in full)
    assert full["stage"] == "pt" and "train_on_prompt" not in full and full["learning_rate"] == 1e-5
    assert full["disable_gradient_checkpointing"] is True


def test_llamafactory_galore_longlora_and_multi_gpu(tiny_dirs, data):
    gal = yaml.safe_load(export("llamafactory", recommendation=make_rec(tiny_dirs["llama"], "galore", count=2,
                                                                         strategy="ddp"))["content"])
    assert (gal["finetuning_type"], gal["use_galore"], gal["galore_rank"]) == ("full", True, 256)
    assert gal["galore_target"] == "attn,attention,mlp,DenseReluDense" and gal["galore_scale"] == 0.25
    assert gal["optim"] == "adamw_torch" and gal["galore_layerwise"] is False and "deepspeed" not in gal
    with pytest.raises(AdvisorInputError) as err:  # LLaMA-Factory: "GaLore and APOLLO are incompatible with DeepSpeed"
        export("llamafactory", recommendation=make_rec(tiny_dirs["llama"], "galore", count=4, strategy="zero3"))
    assert err.value.field == "method" and "DeepSpeed" in err.value.message

    ll = yaml.safe_load(export("llamafactory", recommendation=make_rec(tiny_dirs["llama"], "longlora"))["content"])
    assert ll["shift_attn"] is True and ll["finetuning_type"] == "lora" and "rope_scaling" not in ll
    rope = {"type": "linear", "factor": 8}
    long = yaml.safe_load(export("llamafactory", recommendation=make_rec(
        tiny_dirs["llama"], "longlora", rope_scaling=rope, max_seq_length=8192))["content"])
    assert long["rope_scaling"] == "linear" and long["cutoff_len"] == 8192  # LLaMA-Factory derives × 8 from these
    ax = yaml.safe_load(export("axolotl", recommendation=make_rec(tiny_dirs["llama"], "lora", rope_scaling=rope))
                        ["content"])
    assert ax["rope_scaling"] == {"type": "linear", "factor": 8.0}
    assert ll["lora_target"] == "q_proj,k_proj,v_proj,o_proj" and ll["additional_target"] == "embed_tokens,norm"
    with pytest.raises(AdvisorInputError) as err:  # shift_attn patches Llama only
        export("llamafactory", recommendation=make_rec(tiny_dirs["gpt2"], "longlora"))
    assert err.value.field == "method" and "Llama" in err.value.message

    z3 = yaml.safe_load(export("llamafactory", recommendation=make_rec(tiny_dirs["llama"], "full", count=8,
                                                                        strategy="zero3"))["content"])
    zero = z3["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and "offload_optimizer" not in zero


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("fmt,method,tool", [
    ("axolotl", "adalora", "Axolotl"), ("axolotl", "ia3", "Axolotl"), ("axolotl", "prompt_tuning", "Axolotl"),
    ("axolotl", "prefix_tuning", "Axolotl"), ("axolotl", "longlora", "Axolotl"), ("axolotl", "molora", "Axolotl"),
    ("axolotl", "adapter", "Axolotl"),
    ("llamafactory", "adalora", "LLaMA-Factory"), ("llamafactory", "ia3", "LLaMA-Factory"),
    ("llamafactory", "bitfit", "LLaMA-Factory"), ("llamafactory", "prompt_tuning", "LLaMA-Factory"),
    ("llamafactory", "prefix_tuning", "LLaMA-Factory"), ("llamafactory", "molora", "LLaMA-Factory"),
    ("script", "adapter", "training script"), ("script", "molora", "training script"),
    ("accelerate", "molora", "accelerate"),
])
def test_methods_a_tool_cannot_express_are_refused(tiny_dirs, fmt, method, tool):
    with pytest.raises(AdvisorInputError) as err:
        export(fmt, recommendation=make_rec(tiny_dirs["llama"], method))
    e = err.value
    assert e.field == "method" and tool in e.message and repr(method) in e.message
    from advisor.export import get_format

    assert e.allowed == list(get_format(fmt).methods) and method not in e.allowed


def test_bad_requests_name_the_field(tiny_dirs):
    rec = make_rec(tiny_dirs["llama"], "lora", ["qlora"])
    cases = [
        (dict(fmt="yaml", recommendation=rec), "format"),
        (dict(fmt="axolotl", recommendation=rec, method="ia3"), "method"),  # not among the alternatives
        (dict(fmt="axolotl", recommendation={**rec, "decision": "rag"}), "recommendation.decision"),
        (dict(fmt="axolotl", recommendation={"method": "lora"}), "recommendation.decision"),
        (dict(fmt="axolotl", recommendation=make_rec(tiny_dirs["t5"], "lora")), "model"),  # encoder-decoder
        (dict(fmt="llamafactory", recommendation=make_rec(tiny_dirs["t5"], "lora")), "model"),
        (dict(fmt="axolotl", recommendation=rec, dataset={"path": "x.jsonl", "format": "csv"}), "dataset.format"),
        (dict(fmt="axolotl", recommendation=rec, val_split=0.9), "val_split"),
        (dict(fmt="accelerate", recommendation=make_rec(tiny_dirs["llama"], "full", count=2, strategy="zero2_offload"),
              backend="fsdp"), "backend"),
        (dict(fmt="script", recommendation={**rec, "config": {**rec["config"], "training": {"optim": "adam9"}}}),
         "config.training.optim"),
    ]
    for kwargs, field in cases:
        with pytest.raises(AdvisorInputError) as err:
            export(kwargs.pop("fmt"), **kwargs)
        assert err.value.field == field, (field, err.value.message)
    with pytest.raises(AdvisorInputError) as err:
        export("axolotl", recommendation=rec, method="ia3")
    assert err.value.allowed == ["lora", "qlora"]


# ------------------------------------------------------------------------------------------------ the script, run
def _base(path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if "t5" in Path(path).name else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch.float32)


def test_exported_script_runs_as_is_and_its_adapter_reloads(tiny_dirs, data, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    out = export("script", recommendation=make_rec(tiny_dirs["llama"], "lora"), dataset=str(data["alpaca"]),
                 output_dir=str(tmp_path / "run"))
    script = tmp_path / "train.py"
    script.write_text(out["content"])
    assert "import advisor" not in out["content"] and "from advisor" not in out["content"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script), "--max-steps", "3"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["method"] == "lora" and 0 < summary["train_loss"] < 100
    weights = load_file(tmp_path / "run" / "adapter_model.safetensors")
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and any(t.abs().sum() > 0 for t in b)  # B starts at zero: non-zero means it trained and was saved
    model = PeftModel.from_pretrained(_base(tiny_dirs["llama"]), tmp_path / "run")
    peft_cfg = model.peft_config["default"]
    assert peft_cfg.r == 16 and set(peft_cfg.target_modules) == {"q_proj", "v_proj"}
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]])).logits).all()


DRIVER = '''
import json, runpy, sys, traceback
results = {}
for spec in json.loads(sys.argv[1]):
    sys.argv = [spec["script"], *spec["args"]]
    try:
        runpy.run_path(spec["script"], run_name="__main__")
        results[spec["name"]] = "ok"
    except BaseException:
        results[spec["name"]] = traceback.format_exc()[-2500:]
print("DRIVER_RESULTS " + json.dumps(results))
'''

# (method, model, data format, extra training args)
RUNS = [
    ("qlora", "llama", "chat", {}),
    ("adalora", "llama", "completion", {}),
    ("ia3", "llama", "alpaca", {}),
    ("prompt_tuning", "llama", "alpaca", {}),
    ("prefix_tuning", "gpt2", "text", {}),
    ("bitfit", "gpt2", "alpaca", {}),
    ("galore", "llama", "alpaca", {}),
    ("longlora", "llama", "text", {"rope_scaling": {"type": "linear", "factor": 2}}),  # the config path runs
    ("full", "llama", "chat", {"gradient_checkpointing": True}),
    ("lora", "t5", "alpaca", {}),
    ("lora", "llama", "alpaca", {"optim": "lorafa"}),  # PEFT's LoRA-FA optimizer, passed to the Trainer
]


def test_exported_scripts_train_each_method_and_outputs_reload(tiny_dirs, data, tmp_path):
    """Every method the script expresses: exported, run (each script as __main__, one interpreter so torch and
    transformers are imported once), and what it saved reloaded."""
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file

    specs = []
    for method, arch, fmt, extra in RUNS:
        name = f"{method}-{arch}"
        out = export("script", recommendation=make_rec(tiny_dirs[arch], method, **extra), dataset=str(data[fmt]),
                     output_dir=str(tmp_path / name))
        path = tmp_path / f"train_{name}.py"
        path.write_text(out["content"])
        specs.append({"name": name, "script": str(path), "args": ["--max-steps", "2"]})
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), json.dumps(specs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("DRIVER_RESULTS ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(line.removeprefix("DRIVER_RESULTS "))
    failed = {k: v for k, v in results.items() if v != "ok"}
    assert not failed, failed

    for method, arch, _fmt, _extra in RUNS:
        out_dir = tmp_path / f"{method}-{arch}"
        summary = json.loads((out_dir / "train_summary.json").read_text())
        assert summary["steps"] == 2 and summary["method"] == method, summary
        base = _base(tiny_dirs[arch])
        before = {k: v.clone() for k, v in base.state_dict().items()}
        if method in ("full", "galore"):
            trained = _base(out_dir)
            changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, before[k].to(v.dtype))]
            assert changed, f"{method}: saved weights equal the base"
        elif method == "bitfit":
            biases = load_file(out_dir / "bitfit_biases.safetensors")
            assert biases and all(k.endswith("bias") for k in biases)
            missing, unexpected = base.load_state_dict(biases, strict=False)
            assert not unexpected
            assert any(not torch.equal(biases[k], before[k]) for k in biases)
        else:
            if method == "longlora":
                extra = load_file(out_dir / "trainable_params.safetensors")
                assert any("embed_tokens" in k for k in extra) and any("norm" in k for k in extra)
                _missing, unexpected = base.load_state_dict(extra, strict=False)
                assert not unexpected
                assert "S2-Attn calls: shifted=" in proc.stdout
                shifted = int(proc.stdout.split("S2-Attn calls: shifted=")[1].split()[0])
                assert shifted > 0  # the shifted sparse attention ran, not the full-attention fallback
            cfg = PeftConfig.from_pretrained(out_dir)
            expected = {"qlora": "LORA", "lora": "LORA", "longlora": "LORA", "adalora": "ADALORA", "ia3": "IA3",
                        "prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING"}[method]
            assert str(cfg.peft_type).split(".")[-1] == expected
            model = PeftModel.from_pretrained(base, out_dir)
            ids = torch.tensor([[1, 5, 9, 12]])
            with torch.no_grad():
                kwargs = {"decoder_input_ids": ids} if arch == "t5" else {}
                assert torch.isfinite(model(input_ids=ids, **kwargs).logits).all()


# ------------------------------------------------------------------------------------------------ accelerate
def _launch_env(path: Path) -> tuple[object, dict]:
    """What `accelerate launch --config_file path train.py` would set up, through accelerate's own code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _mp = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args) if (args.multi_gpu or args.use_fsdp) else {}


@pytest.mark.parametrize("strategy,backend,distributed", [
    ("single", "auto", "NO"), ("ddp", "auto", "MULTI_GPU"), ("zero2", "auto", "FSDP"), ("zero3", "auto", "FSDP"),
    ("zero2_offload", "auto", "DEEPSPEED"), ("zero3_offload", "auto", "DEEPSPEED"), ("zero3", "deepspeed", "DEEPSPEED"),
    ("zero3_offload_params", "auto", "FSDP"), ("zero3_offload_params", "deepspeed", "DEEPSPEED"),
])
def test_accelerate_config_loads_with_accelerates_own_classes(tiny_dirs, tmp_path, monkeypatch, strategy, backend,
                                                              distributed):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.dataclasses import get_module_class_from_name

    count = 1 if strategy == "single" else 4
    rec = make_rec(tiny_dirs["llama"], "full", count=count, strategy=strategy, gradient_checkpointing=True)
    out = export("accelerate", recommendation=rec, backend=backend)
    path = tmp_path / out["filename"]
    path.write_text(out["content"])
    assert f"accelerate launch --config_file {out['filename']} train.py" in out["content"]
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type.value == distributed and cfg.num_processes == count and cfg.mixed_precision == "bf16"
    args, env = _launch_env(path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if distributed == "FSDP":
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is (strategy != "zero2")
        # FSDP's offload moves parameters, gradients and the step to the host: only the parameter-offload strategy
        assert (type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy") is (strategy == "zero3_offload_params")
        assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"] and plugin.activation_checkpointing
        assert get_module_class_from_name(_base(tiny_dirs["llama"]), "LlamaDecoderLayer") is not None
    elif distributed == "DEEPSPEED":
        plugin = DeepSpeedPlugin()
        assert plugin.zero_stage == (2 if strategy.startswith("zero2") else 3)
        assert plugin.offload_optimizer_device == ("cpu" if "offload" in strategy else "none")
        assert plugin.offload_param_device == ("cpu" if strategy == "zero3_offload_params" else "none")
        assert plugin.gradient_accumulation_steps == 2
    elif distributed == "MULTI_GPU":
        assert args.multi_gpu and args.num_processes == 4


def test_accelerate_fp16_and_script_defers_to_fsdp_checkpointing(tiny_dirs):
    rec = make_rec(tiny_dirs["llama"], "lora", count=2, strategy="zero3", gpu="Tesla T4", bf16=False, fp16=True,
                   gradient_checkpointing=True)
    cfg = yaml.safe_load(export("accelerate", recommendation=rec)["content"])
    assert cfg["mixed_precision"] == "fp16" and cfg["fsdp_config"]["fsdp_activation_checkpointing"] is True
    script = export("script", recommendation=rec)["content"]
    assert 'os.environ.get("FSDP_ACTIVATION_CHECKPOINTING"' in script
    assert "accelerate launch --config_file accelerate_config.yaml train.py" in script


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_files_and_exits_2_naming_the_field(tiny_dirs, data, tmp_path):
    from advisor.cli import app

    runner = CliRunner()
    rec_file = tmp_path / "rec.json"
    rec_file.write_text(json.dumps(make_rec(tiny_dirs["llama"], "qlora", ["lora", "adalora"])))
    out = tmp_path / "cfg" / "lf.yaml"
    r = runner.invoke(app, ["export", "--format", "llamafactory", "--from", str(rec_file), "--dataset",
                            str(data["alpaca"]), "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    cfg = yaml.safe_load(out.read_text())
    assert cfg["dataset_dir"] == str(out.parent) and "llamafactory-cli train lf.yaml" in out.read_text()
    info = json.loads((out.parent / "dataset_info.json").read_text())[lf_fmt.DATASET_NAME]
    assert info["file_name"] == str(Path(data["alpaca"]).resolve())
    r = runner.invoke(app, ["export", "--format", "script", "--from", str(rec_file), "--method", "adalora"])
    assert r.exit_code == 0 and "AdaLoraConfig(" in r.stdout
    compile(r.stdout, "train.py", "exec")
    r = runner.invoke(app, ["export", "--format", "axolotl", "--from", str(rec_file), "--json"])
    body = json.loads(r.stdout)
    assert body["format"] == "axolotl" and body["method"] == "qlora" and body["filename"] == "axolotl_config.yml"

    for argv, field in [
        (["--format", "nope", "--from", str(rec_file)], "format"),
        (["--from", str(rec_file)], "--format"),
        (["--format", "axolotl", "--from", str(tmp_path / "missing.json")], "--from"),
        (["--format", "axolotl"], "--from"),
        (["--format", "axolotl", "--from", str(rec_file), "--method", "adalora"], "method"),
        (["--format", "axolotl", "--from", str(rec_file), "--method", "galore"], "method"),
    ]:
        r = runner.invoke(app, ["export", *argv])
        assert r.exit_code == 2, (argv, r.stdout, r.stderr)
        assert f"{field}:" in r.stderr, (argv, r.stderr)
    r = runner.invoke(app, ["export", "--format", "axolotl", "--from", str(rec_file), "--method", "adalora"])
    assert "Axolotl cannot express method 'adalora'" in r.stderr


def test_cli_entry_point_exports_a_runnable_script(tiny_dirs, tmp_path):
    rec_file = tmp_path / "rec.json"
    rec_file.write_text(json.dumps(make_rec(tiny_dirs["llama"], "ia3")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*ADVISOR, "export", "--format", "script", "--from", str(rec_file), "--out",
                           str(tmp_path / "train.py")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert os.access(tmp_path / "train.py", os.X_OK) and "run: python train.py" in proc.stderr
    compile((tmp_path / "train.py").read_text(), "train.py", "exec")


# ------------------------------------------------------------------------------------------------ API
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv") / "var"
    # fitted memory models are deterministic: the recommender's shares the repository's cache between runs
    cache = os.environ.get("ADVISOR_CACHE_DIR", str(ROOT / "var" / "cache"))
    srv = AdvisorServer(root, {"ADVISOR_CACHE_DIR": cache}).start()
    yield srv.url, root
    srv.stop()


def test_export_over_http(server, tiny_dirs, data):
    from advisor.demo import write_datasets

    base, root = server
    rec = make_rec(tiny_dirs["llama"], "qlora", ["lora"])
    r = httpx.post(f"{base}/v1/export", json={"format": "axolotl", "recommendation": rec}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["format"] == "axolotl" and body["method"] == "qlora" and body["filename"] == "axolotl_config.yml"
    assert yaml.safe_load(body["content"])["adapter"] == "qlora"
    assert body["command"] == "axolotl train axolotl_config.yml"
    r = httpx.post(f"{base}/v1/export", json={"format": "llamafactory", "recommendation": rec, "method": "lora"},
                   timeout=120)
    assert r.status_code == 200 and "dataset_info.json" in r.json()["files"] and r.json()["chosen"] is False

    # data files are read (to detect their format) only under the data root
    inside = write_datasets(root / "data", n=4)["chat"]
    r = httpx.post(f"{base}/v1/export", json={"format": "axolotl", "recommendation": rec, "dataset": str(inside)})
    assert yaml.safe_load(r.json()["content"])["datasets"][0]["type"] == "chat_template"
    r = httpx.post(f"{base}/v1/export", json={"format": "axolotl", "recommendation": rec, "dataset": str(data["chat"])})
    assert yaml.safe_load(r.json()["content"])["datasets"][0]["type"] == "alpaca"  # outside: not opened

    for payload, field in [
        ({"format": "axolotl", "recommendation": make_rec(tiny_dirs["llama"], "adalora")}, "method"),
        ({"format": "toml", "recommendation": rec}, "format"),
        ({"format": "axolotl"}, "recommendation"),
        ({"format": "axolotl", "recommendation": rec, "colour": "red"}, "colour"),
        ({"format": "accelerate", "recommendation": rec, "backend": "mpi"}, "backend"),
    ]:
        r = httpx.post(f"{base}/v1/export", json=payload, timeout=60)
        assert r.status_code == 422, (payload, r.text)
        assert r.json()["field"] == field, r.json()
    ia3 = make_rec(tiny_dirs["llama"], "ia3")
    r = httpx.post(f"{base}/v1/export", json={"format": "axolotl", "recommendation": ia3})
    assert "Axolotl cannot express method 'ia3'" in r.json()["detail"] and "lora" in r.json()["allowed"]


def test_export_from_a_scenario_recommends_first(server, tiny_dirs):
    pytest.importorskip("advisor.recommend")
    base, _root = server
    scenario = {"model": str(tiny_dirs["llama"]), "hardware": {"gpu": "RTX 4090"},
                "dataset": {"num_examples": 2000, "avg_tokens": 48, "max_tokens": 64}}
    r = httpx.post(f"{base}/v1/export", json={"format": "script", "scenario": scenario}, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["chosen"] is True and f"MODEL = {str(tiny_dirs['llama'])!r}" in body["content"]
    assert f"METHOD = {body['method']!r}" in body["content"] and "'max_seq_length': 64," in body["content"]
