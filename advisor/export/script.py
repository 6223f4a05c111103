"""A standalone Python training script (transformers + PEFT only; it never imports `advisor`).

The script is `script_template.py` with three regions filled in: the docstring header (how to run it, why this
method, the estimate), the CONFIG block (the recommendation's config as Python literals, with target module names
resolved for the architecture) and the METHOD block (only the code of the exported method). It loads a Hub id or a
local directory, reads JSONL/JSON data in alpaca / chat / completion / text form with the loss on responses only,
trains with transformers' Trainer using the recommended arguments and saves what the method trained. Flags
override model, data, output, steps, epochs, sequence length and validation split, so it runs on a tiny local model.

    method          how the script expresses it
    full            every parameter trains; saves the model
    lora            peft.LoraConfig
    qlora           BitsAndBytesConfig 4-bit load + peft.LoraConfig (prepare_model_for_kbit_training if upcast)
    adalora         peft.AdaLoraConfig + a callback that calls update_and_allocate after each optimizer step
    ia3             peft.IA3Config
    prompt_tuning   peft.PromptTuningConfig
    prefix_tuning   peft.PrefixTuningConfig
    bitfit          existing biases: requires_grad on biases only, saves them (bitfit_biases.safetensors);
                    bias_source 'add': peft.BeftConfig
    galore          transformers' optim="galore_adamw*" + optim_target_modules + optim_args (needs galore-torch)
    longlora        S²-Attn registered through transformers' AttentionInterface (the advisor's own implementation,
                    copied in), LoRA on attention, embeddings and norms trainable and saved beside the adapter
    adapter         refused: bottleneck adapters are not in PEFT; the advisor trains them with its own module
    molora          refused: mixture-of-LoRA-experts is not in PEFT; the advisor trains it with its own module
    freeze          freeze tuning: the chosen blocks' (and extra modules') parameters train; saves the model
    peft            any other PEFT type: peft.get_peft_config(PEFT) (PEFT is the adapter_config.json), get_peft_model
"""

from __future__ import annotations

import inspect
import pprint
import re
from pathlib import Path

from advisor.config import quantization_settings
from advisor.errors import AdvisorInputError
from advisor.export.base import ExportContext, ExportFormat, Rendered, register_format

METHODS = ("full", "lora", "qlora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "bitfit", "galore",
           "longlora", "peft", "freeze", "llama_pro")
REFUSALS = {
    "adapter": "bottleneck adapters (Houlsby/Pfeiffer) are not part of PEFT; only the advisor's own trainer "
               "(advisor train) builds them",
    "molora": "mixture-of-LoRA-experts is not part of PEFT; only the advisor's own trainer (advisor train) builds it",
}
TEMPLATE = Path(__file__).with_name("script_template.py")
REQUIREMENTS = {"qlora": ["bitsandbytes"], "galore": ["galore-torch"]}

_SAVE_TRAINER = '''

def save(trainer, model, output_dir: str) -> None:
    """The Trainer's own save: {what}."""
    trainer.save_model(output_dir)
'''

_NO_EXTRAS = '''

def trainer_extras() -> dict:
    return {}
'''

SNIPPETS: dict[str, str] = {}

SNIPPETS["full"] = '''CALLBACKS: list = []


def apply_method(model, seq2seq: bool, total_steps: int):
    """Full fine-tuning: every weight trains (AdamW keeps two moments per weight)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model
''' + _NO_EXTRAS + _SAVE_TRAINER.format(what="the full model (model.safetensors + config)")

_LORA_CALL = '''LoraConfig(
        task_type=peft_task_type(seq2seq),
        r=PEFT["r"],
        lora_alpha=PEFT["lora_alpha"],
        lora_dropout=PEFT["lora_dropout"],
        target_modules=TARGET_MODULES,
        bias=PEFT.get("bias", "none"),
        use_rslora=PEFT.get("use_rslora", False),
        use_dora=PEFT.get("use_dora", False),
        modules_to_save=PEFT.get("modules_to_save"),
    )'''

SNIPPETS["lora"] = f'''from peft import LoraConfig, get_peft_model

CALLBACKS: list = []


def apply_method(model, seq2seq: bool, total_steps: int):
    """LoRA: frozen base, trainable low-rank A·B beside the target linear layers."""
    config = {_LORA_CALL}
    return get_peft_model(model, config, autocast_adapter_dtype=PEFT.get("autocast_adapter_dtype", True))
''' + _NO_EXTRAS + _SAVE_TRAINER.format(what="the adapter (adapter_config.json + adapter_model.safetensors)")

SNIPPETS["qlora"] = f'''from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

CALLBACKS: list = []


def apply_method(model, seq2seq: bool, total_steps: int):
    """QLoRA: the base was loaded in 4-bit (QUANTIZATION); LoRA adapters train in higher precision."""
    if PEFT.get("upcast_non_quantized"):  # PEFT's recipe: norms, embeddings and head in fp32
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    config = {_LORA_CALL}
    return get_peft_model(model, config, autocast_adapter_dtype=PEFT.get("autocast_adapter_dtype", True))
''' + _NO_EXTRAS + _SAVE_TRAINER.format(what="the adapter (adapter_config.json + adapter_model.safetensors)")

SNIPPETS["adalora"] = '''from peft import AdaLoraConfig, get_peft_model


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA reallocates its rank budget after every optimizer step, before the gradients are cleared;
    transformers' Trainer does not do it by itself."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)


CALLBACKS: list = [AdaLoraBudget]


def apply_method(model, seq2seq: bool, total_steps: int):
    """AdaLoRA: SVD-shaped LoRA whose rank budget moves to the layers that matter most."""
    total = max(total_steps, 3)
    tinit, tfinal = PEFT["tinit"], PEFT["tfinal"]
    if tinit + tfinal >= total:  # PEFT needs a budgeting phase between warm-up (tinit) and final (tfinal) steps
        tinit, tfinal = max(0, total // 10), max(1, total // 5)
        if tinit + tfinal >= total:
            tinit, tfinal = 0, max(0, total - 2)
        print(f"AdaLoRA schedule scaled to {total} steps: tinit={tinit}, tfinal={tfinal}")
    config = AdaLoraConfig(
        task_type=peft_task_type(seq2seq),
        init_r=PEFT["init_r"],
        target_r=PEFT["target_r"],
        tinit=tinit,
        tfinal=tfinal,
        deltaT=PEFT["deltaT"],
        beta1=PEFT["beta1"],
        beta2=PEFT["beta2"],
        orth_reg_weight=PEFT["orth_reg_weight"],
        lora_alpha=PEFT["lora_alpha"],
        lora_dropout=PEFT["lora_dropout"],
        target_modules=TARGET_MODULES,
        total_step=total,
    )
    return get_peft_model(model, config)
''' + _NO_EXTRAS + _SAVE_TRAINER.format(what="the adapter with its final rank pattern")

SNIPPETS["ia3"] = '''from peft import IA3Config, get_peft_model

CALLBACKS: list = []


def apply_method(model, seq2seq: bool, total_steps: int):
    """IA3: learned vectors rescale keys, values and the feed-forward input (~0.01% of the weights)."""
    config = IA3Config(task_type=peft_task_type(seq2seq), target_modules=TARGET_MODULES,
                       feedforward_modules=FEEDFORWARD_MODULES)
    return get_peft_model(model, config)
''' + _NO_EXTRAS + _SAVE_TRAINER.format(what="the IA3 vectors")

SNIPPETS["prompt_tuning"] = '''from peft import PromptTuningConfig, get_peft_model

CALLBACKS: list = []


def apply_method(model, seq2seq: bool, total_steps: int):
    """Prompt tuning: a few trainable virtual-token embeddings in front of every input."""
    config = PromptTuningConfig(task_type=peft_task_type(seq2seq), num_virtual_tokens=PEFT["num_virtual_tokens"],
                                prompt_tuning_init="RANDOM",
                                token_dim=model.get_input_embeddings().embedding_dim)  # OPT-350m: 512, not hidden
    return get_peft_model(model, config)
''' + _NO_EXTRAS + _SAVE_TRAINER.format(what="the soft prompt")

SNIPPETS["prefix_tuning"] = '''from peft import PrefixTuningConfig, get_peft_model

CALLBACKS: list = []


def apply_method(model, seq2seq: bool, total_steps: int):
    """Prefix tuning: trainable key/value prefixes in every attention layer (no gradient checkpointing)."""
    config = PrefixTuningConfig(task_type=peft_task_type(seq2seq), num_virtual_tokens=PEFT["num_virtual_tokens"],
                                prefix_projection=bool(PEFT["prefix_projection"]))
    return get_peft_model(model, config)
''' + _NO_EXTRAS + _SAVE_TRAINER.format(what="the prefixes")

SNIPPETS["peft"] = '''from peft import get_peft_config, get_peft_model

CALLBACKS: list = []


def apply_method(model, seq2seq: bool, total_steps: int):
    """Any PEFT adapter type: PEFT builds it from its own adapter_config.json keys (PEFT above)."""
    keys = {k: v for k, v in PEFT.items() if k != "autocast_adapter_dtype"}
    keys["task_type"] = peft_task_type(seq2seq)
    if keys.get("peft_type") == "ADALORA":
        keys.setdefault("total_step", total_steps)
    return get_peft_model(model, get_peft_config(keys), autocast_adapter_dtype=PEFT.get("autocast_adapter_dtype", True))
''' + _NO_EXTRAS + _SAVE_TRAINER.format(what="the adapter (adapter_config.json + adapter_model.safetensors)")

SNIPPETS["freeze"] = '''CALLBACKS: list = []


def apply_method(model, seq2seq: bool, total_steps: int):
    """Freeze tuning (LLaMA-Factory's finetuning_type freeze): the last PEFT["trainable_layers"] blocks train (the
    first |N| when negative), or only PEFT["trainable_modules"] inside them, plus PEFT["extra_modules"]."""
    stack, blocks = next((name, list(mod)) for name, mod in model.named_modules()
                         if isinstance(mod, torch.nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1
                         and next(mod.parameters(), None) is not None)
    n = PEFT["trainable_layers"]
    trained = list(range(len(blocks) - n, len(blocks))) if n > 0 else list(range(-n))
    wanted = PEFT["trainable_modules"]
    for p in model.parameters():
        p.requires_grad_(False)
    for i in trained:
        for name, p in blocks[i].named_parameters():
            p.requires_grad_(wanted == "all" or any(part in wanted for part in name.split(".")[:-1]))
    for name, mod in model.named_modules():
        if name.split(".")[-1] in PEFT["extra_modules"] and not name.startswith(stack):
            for p in mod.parameters():
                p.requires_grad_(True)
    return model
''' + _NO_EXTRAS + _SAVE_TRAINER.format(what="the whole model (freeze tuning trains no adapter)")

SNIPPETS["llama_pro"] = '''CALLBACKS: list = []


def apply_method(model, seq2seq: bool, total_steps: int):
    """LLaMA-Pro (block expansion, arXiv:2401.02415; ms-swift's llamapro, LLaMA-Factory's use_llama_pro): after every
    L/N blocks a copy of the last one is inserted with its output projections at zero (the expanded model computes
    what the original did); only the N copies train, plus PEFT["extra_modules"]."""
    import copy

    stack, blocks = next((name, mod) for name, mod in model.named_modules()
                         if isinstance(mod, torch.nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1
                         and next(mod.parameters(), None) is not None)
    n = PEFT["num_new_blocks"]
    if len(blocks) % n:
        raise SystemExit(f"num_new_blocks {n} must divide the model's {len(blocks)} blocks")
    stride, expanded, new, order = len(blocks) // n, torch.nn.ModuleList(), [], []
    for i, block in enumerate(blocks):
        expanded.append(block)
        order.append(i)
        if (i + 1) % stride == 0:
            twin = copy.deepcopy(block)
            with torch.no_grad():  # attention's and the MLP's output projections, weight and bias: adds nothing
                for name, param in twin.named_parameters():
                    parts = name.split(".")
                    if parts[-1] in ZEROED_OUTPUTS or (len(parts) > 1 and parts[-2] in ZEROED_OUTPUTS):
                        param.zero_()
            expanded.append(twin)
            new.append(twin)
            order.append(i)
    for pos, block in enumerate(expanded):  # the KV cache and per-layer settings index blocks by position
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = pos
    parent, _, attr = stack.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, expanded)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(model.config, key, None), int):
            setattr(model.config, key, len(expanded))
            break
    types = getattr(model.config, "layer_types", None)
    if isinstance(types, list) and len(types) == len(blocks):
        model.config.layer_types = [types[i] for i in order]
    for p in model.parameters():
        p.requires_grad_(False)
    for block in new:
        for p in block.parameters():
            p.requires_grad_(True)
    for name, mod in model.named_modules():
        if name.split(".")[-1] in PEFT["extra_modules"] and not name.startswith(stack):
            for p in mod.parameters():
                p.requires_grad_(True)
    return model


ZEROED_OUTPUTS = {zeroed!r}
''' + _NO_EXTRAS + _SAVE_TRAINER.format(what="the whole expanded model (LLaMA-Pro trains no adapter)")


SNIPPETS["bitfit_existing"] = '''CALLBACKS: list = []


def apply_method(model, seq2seq: bool, total_steps: int):
    """BitFit: only the model's bias terms train."""
    names = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    if not names:
        raise SystemExit("this model has no bias terms; export BitFit with bias_source 'add' instead")
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    return model
''' + _NO_EXTRAS + '''

def save(trainer, model, output_dir: str) -> None:
    """Only the trained biases (bitfit_biases.safetensors); load them with
    model.load_state_dict(safetensors.torch.load_file(path), strict=False) on the base model."""
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    biases = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(biases, os.path.join(output_dir, "bitfit_biases.safetensors"))
    model.config.save_pretrained(output_dir)
'''

SNIPPETS["bitfit_add"] = '''from peft import BeftConfig, get_peft_model

CALLBACKS: list = []


def apply_method(model, seq2seq: bool, total_steps: int):
    """BitFit on a model without biases: PEFT's BEFT adds a trainable bias to every linear layer."""
    config = BeftConfig(task_type=peft_task_type(seq2seq), target_modules="all-linear")
    return get_peft_model(model, config)
''' + _NO_EXTRAS + _SAVE_TRAINER.format(what="the added biases as a PEFT adapter")

SNIPPETS["galore"] = '''CALLBACKS: list = []


def apply_method(model, seq2seq: bool, total_steps: int):
    """GaLore: every weight trains; the optimizer keeps low-rank projected moments (transformers' galore optim)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainer_extras() -> dict:
    args = ",".join(f"{k}={PEFT[k]}" for k in ("rank", "update_proj_gap", "scale", "proj_type"))
    # optimizer_in_backward: transformers' layer-wise GaLore steps each weight inside backward
    optim = TRAINING["optim"] + ("_layerwise" if TRAINING.get("optimizer_in_backward") else "")
    return {"optim": optim, "optim_target_modules": PEFT["target_modules"], "optim_args": args}
''' + _SAVE_TRAINER.format(what="the full model (model.safetensors + config)")

_S2ATTN_HEAD = '''from collections import Counter

import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# ---- S²-Attn (LongLoRA, arXiv:2309.12307): grouped causal attention with half the heads shifted by half a group.
# Taken from the advisor's implementation (advisor/methods/modules/s2attn.py); used only in training, evaluation and
# generation fall back to full attention. Needs unpadded batches (the script packs the data into fixed blocks).
DEFAULT_GROUP_SIZE_RATIO = 0.25
S2_CALLS: Counter = Counter()


'''

_LONGLORA_TAIL = f'''

def enable_s2attn(model, group_size_ratio: float):
    AttentionInterface.register("s2attn", s2_attention_forward)
    AttentionMaskInterface.register("s2attn", sdpa_mask)  # keeps padding masks working for the fallback path
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            config.s2attn_group_size_ratio = group_size_ratio
    model.set_attn_implementation("s2attn")


CALLBACKS: list = []


def apply_method(model, seq2seq: bool, total_steps: int):
    """LongLoRA: S²-Attn in training, LoRA on attention, embeddings and norms trainable."""
    enable_s2attn(model, float(PEFT["group_size_ratio"]))
    config = {_LORA_CALL}
    model = get_peft_model(model, config)
    for name, p in model.named_parameters():
        if "lora_" not in name and any(k in name for k in PEFT["trainable_params"]):
            p.requires_grad_(True)
    return model
''' + _NO_EXTRAS + '''

def save(trainer, model, output_dir: str) -> None:
    """The LoRA adapter, plus the trained embeddings/norms (trainable_params.safetensors, named as in the base
    model: load them with base.load_state_dict(load_file(path), strict=False) before PeftModel.from_pretrained)."""
    from safetensors.torch import save_file

    trainer.save_model(output_dir)
    extra = {n.removeprefix("base_model.model."): p.detach().cpu().contiguous()
             for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    save_file(extra, os.path.join(output_dir, "trainable_params.safetensors"))
    print(f"S2-Attn calls: shifted={S2_CALLS['shifted']} full={S2_CALLS['full']}")
'''


def _longlora_snippet() -> str:
    from advisor.methods.modules import s2attn

    functions = (s2attn._grouped_causal, s2attn._wraparound_mask, s2attn.s2_attention_forward)
    parts = [inspect.getsource(f) for f in functions]
    return _S2ATTN_HEAD + "\n\n".join(parts) + _LONGLORA_TAIL


def _snippet(ctx: ExportContext) -> str:
    if ctx.method == "bitfit":
        return SNIPPETS["bitfit_existing" if ctx.peft.get("bias_source") == "existing" else "bitfit_add"]
    if ctx.method == "longlora":
        return _longlora_snippet()
    if ctx.method == "llama_pro":  # the projections the method zeroes, read when used (advisor.methods imports torch)
        from advisor.methods.freeze import ZEROED_OUTPUTS

        return SNIPPETS["llama_pro"].replace("{zeroed!r}", repr(ZEROED_OUTPUTS))
    return SNIPPETS[ctx.method]


def _literal(value) -> str:
    return pprint.pformat(value, sort_dicts=False, width=110)


def _dict_literal(values: dict, why) -> str:
    """A dict literal, one knob per line, each with its reason as a comment where there is one."""
    if not values:
        return "{}"
    lines = ["{"]
    for key, value in values.items():
        reason = why(key, value)
        lines.append(f"    {key!r}: {value!r},{f'  # {reason}' if reason else ''}")
    return "\n".join(lines + ["}"])


def _replace_region(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"# ==== {name} ====\n.*?# ==== END {name} ====\n", re.DOTALL)
    if not pattern.search(text):
        raise AssertionError(f"script template has no {name} region")
    return pattern.sub(lambda _m: body.rstrip("\n") + "\n", text, count=1)


def render(ctx: ExportContext) -> Rendered:
    _check(ctx)
    cfg = ctx.config
    training = cfg.training.model_dump(mode="json")
    name = ctx.filename
    needs = ["torch", "transformers", "peft", "accelerate"] + REQUIREMENTS.get(ctx.method, [])
    run = [f"pip install {' '.join(needs)}", f"python {name}"]
    if ctx.multi_gpu:
        run.append(f"accelerate launch --config_file accelerate_config.yaml {name}   "
                   f"# {ctx.gpu_count} GPUs: advisor export --format accelerate")
    run.append(f"python {name} --model DIR --data FILE --output DIR --max-steps N   # overrides")
    lines = ctx.header_lines(f"{ctx.method} fine-tuning of {ctx.model_id}", run)
    docstring = '"""' + "\n".join(lines).replace('"""', "'''").replace("\\", "\\\\") + '\n"""\n'

    config_lines = [
        f"MODEL = {ctx.model_ref!r}",
        f"DATA = {ctx.dataset_path!r}",
        f"DATA_FORMAT = {ctx.dataset_format!r}  # alpaca | chat | completion | text | auto",
        f"OUTPUT_DIR = {ctx.output_dir!r}",
        f"VAL_SPLIT = {ctx.val_split!r}",
        f"METHOD = {ctx.method!r}",
        f"PEFT = {_dict_literal(dict(cfg.peft), ctx.why)}",
        f"QUANTIZATION = {_literal(quantization_settings(cfg.quantization))}",
        f"TRAINING = {_dict_literal(training, _training_why(ctx))}",
    ]
    if ctx.method in ("lora", "qlora", "adalora", "longlora", "ia3"):
        config_lines.append(f"TARGET_MODULES = {_literal(ctx.targets)}  # resolved for {ctx.model_type}")
    if ctx.method == "ia3":
        config_lines.append(f"FEEDFORWARD_MODULES = {_literal(ctx.ia3_feedforward)}")
    text = TEMPLATE.read_text(encoding="utf-8")
    text = _replace_region(text, "HEADER", docstring)
    text = _replace_region(text, "CONFIG", "\n".join(config_lines) + "\n")
    text = _replace_region(text, "METHOD", _snippet(ctx))
    compile(text, name, "exec")  # a programming error if the assembled script is not valid Python
    return Rendered(content=text, command=run[1], notes=[])


def _training_why(ctx: ExportContext):
    quiet = {"torch_dtype", "attn_implementation", "seed", "logging_steps", "save_steps", "eval_steps"}
    return lambda key, value: None if key in quiet else ctx.why(key, value)


def _check(ctx: ExportContext) -> None:
    if ctx.method == "prefix_tuning" and ctx.training.gradient_checkpointing:
        raise AdvisorInputError(
            "config.training.gradient_checkpointing",
            "prefix_tuning does not work with gradient checkpointing (PEFT refuses it); set it to false")
    if ctx.method == "longlora" and ctx.kind != "causal_lm":
        raise AdvisorInputError("method", "LongLoRA applies to causal language models only", allowed=["causal_lm"])


FORMAT = register_format(ExportFormat(
    id="script", tool="the standalone training script", filename="train.py", methods=METHODS, refusals=REFUSALS,
    render=render, kinds=("causal_lm", "seq2seq"),
    summary="standalone Python script (transformers + PEFT): python train.py",
))
