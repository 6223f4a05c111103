"""Per-architecture target modules: tables, not branches (PEFT's own mappings, by `model_type`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from advisor.errors import AdvisorInputError
from advisor.methods.base import linear_module_names

if TYPE_CHECKING:
    import torch

# attention projections (q, k, v, o) per family, for LongLoRA which adapts all four
ATTENTION_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "stablelm": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "falcon": ["query_key_value", "dense"],
    "bloom": ["query_key_value", "dense"],
    "t5": ["q", "k", "v", "o"],
    "mt5": ["q", "k", "v", "o"],
}


# architectures PEFT's table does not cover (fused projections): the query/value-equivalent layers
LORA_TARGETS_EXTRA = {"phi3": ["qkv_proj"], "falcon": ["query_key_value"], "gpt_neox": ["query_key_value"],
                      # DeepSeek-V2/V3's multi-head latent attention: the query (or its up-projection when the query
                      # is low-rank too) and the up-projection that makes the keys and values
                      "deepseek_v2": ["q_proj", "kv_b_proj"], "deepseek_v3": ["q_b_proj", "kv_b_proj"]}

# families that share Llama's q/k/v names but not the others: the seeds' Llama-style names (the methods' defaults)
# map to their equivalents (a name with none, such as gate_proj in an MLP without a gate, is dropped)
LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NAME_EQUIVALENTS = {
    "gptj": {"o_proj": "out_proj", "up_proj": "fc_in", "down_proj": "fc_out", "gate_proj": None},
    "opt": {"o_proj": "out_proj", "up_proj": "fc1", "down_proj": "fc2", "gate_proj": None},
    "phi": {"o_proj": "dense", "up_proj": "fc1", "down_proj": "fc2", "gate_proj": None},
    "codegen": {"o_proj": "out_proj", "up_proj": "fc_in", "down_proj": "fc_out", "gate_proj": None},
    # Phi-3 / Phi-3.5 / Phi-4 fuse q, k, v into qkv_proj and gate, up into gate_up_proj
    "phi3": {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
             "up_proj": "gate_up_proj"},
    # GLM (ChatGLM2/3, GLM-4) fuses gate and up into gate_up_proj
    "glm": {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"},
    # DeepSeek-V2/V3 (MLA): keys and values come out of kv_b_proj; a low-rank query's up-projection is q_b_proj
    "deepseek_v2": {"q_proj": "q_b_proj", "k_proj": "kv_b_proj", "v_proj": "kv_b_proj"},
    "deepseek_v3": {"q_proj": "q_b_proj", "k_proj": "kv_b_proj", "v_proj": "kv_b_proj"},
}


def resolve_targets(
    model: torch.nn.Module,
    requested: Any,
    model_type: str,
    field_name: str,
    table: dict[str, list[str]] | None = None,
) -> Any:
    """The requested names if the model has them; else the architecture's table entry; else a clear error.

    "all-linear" passes through (PEFT expands it). A requested list of Llama-style names that the model lacks
    entirely is treated as the seeds' default and mapped to this architecture; a list that partly matches, or names a
    layer that is neither in the model nor Llama-style, is a user mistake and is refused with the names that exist.
    """
    if requested == "all-linear":
        return requested
    available = linear_module_names(model)
    if isinstance(requested, str):
        requested = [requested]
    requested = list(requested or [])
    head = output_head_name(model)
    if head and head in requested:  # the output head only when named (torchtune's apply_lora_to_output)
        available = [*available, head]
    present = [t for t in requested if t in available]
    if requested and len(present) == len(requested):
        return requested
    if requested and present:
        missing = [t for t in requested if t not in available]
        equivalents = NAME_EQUIVALENTS.get(model_type, {})
        if all(t in LLAMA_STYLE and t in equivalents for t in missing):
            translated = [equivalents.get(t, t) if t in missing else t for t in requested]
            translated = list(dict.fromkeys(t for t in translated if t))
            if all(t in available for t in translated):
                return translated
        raise AdvisorInputError(field_name, f"no layer named {missing} in this {model_type} model", allowed=available)
    unknown = [t for t in requested if t not in LLAMA_STYLE]
    if unknown:  # only the seeds' Llama-style names stand for "this architecture's equivalents"
        regex = [t for t in unknown if isinstance(t, str) and any(c in t for c in ".*+?[]()|^$\\")]
        hint = (f"; {regex[0]!r} looks like a regular expression (PEFT's string form), which the advisor does not "
                "take: list the layers' names") if regex else ""
        raise AdvisorInputError(field_name, f"no layer named {unknown} in this {model_type} model{hint}",
                                allowed=available)
    if table is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        table = {**TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, **LORA_TARGETS_EXTRA}
    mapped = table.get(model_type)
    if mapped and all(t in available for t in mapped):
        return list(mapped)
    raise AdvisorInputError(
        field_name, f"no default target modules known for model type {model_type!r}; name them", allowed=available
    )


def ia3_modules(model: torch.nn.Module, peft: dict, model_type: str) -> tuple[list[str], list[str]]:
    targets = peft.get("target_modules")
    ff = peft.get("feedforward_modules")
    available = linear_module_names(model)
    if not targets:
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
        )

        targets = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)
        ff = ff or TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    if not targets:
        raise AdvisorInputError(
            "config.peft.target_modules", f"IA3 has no default modules for model type {model_type!r}; name them",
            allowed=available,
        )
    leaf = [t.rsplit(".", 1)[-1] for t in targets]
    missing = [t for t in leaf if t not in available]
    if missing:
        raise AdvisorInputError("config.peft.target_modules", f"no layer named {missing} in this model", allowed=available)
    ff = list(ff or [])
    if not ff:
        raise AdvisorInputError(
            "config.peft.feedforward_modules",
            "IA3 needs the feed-forward module names (scaled on their input)", allowed=leaf,
        )
    bad = [f for f in ff if f not in targets]
    if bad:
        raise AdvisorInputError("config.peft.feedforward_modules", f"{bad} are not among target_modules", allowed=list(targets))
    return list(targets), ff


def output_head_name(model: torch.nn.Module) -> str | None:
    """The leaf name of the model's output projection (`lm_head` for most causal LMs), when it is a Linear."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return None
    for name, mod in model.named_modules():
        if mod is head:
            return name.rsplit(".", 1)[-1]
    return None


def resolve_modules_to_save(model: torch.nn.Module, requested: Any, field_name: str) -> list[str] | None:
    """PEFT's `modules_to_save`: whole modules trained beside the adapters (a trainable copy of each, the frozen
    original kept), typically the embeddings and the output head. Each name must end the path of some module;
    the error lists the embedding and head names this model has."""
    import torch

    if requested in (None, [], ()):
        return None
    if isinstance(requested, str):
        requested = [requested]
    if not isinstance(requested, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in requested):
        raise AdvisorInputError(field_name, "must be a list of module names, e.g. ['embed_tokens', 'lm_head']")
    names = [n for n, _ in model.named_modules() if n]
    missing = [r for r in requested if not any(n == r or n.endswith("." + r) for n in names)]
    if missing:
        suggest = []
        inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        for n, mod in model.named_modules():
            if mod is inp or isinstance(mod, torch.nn.Embedding):
                suggest.append(n.rsplit(".", 1)[-1])
        head = output_head_name(model)
        if head:
            suggest.append(head)
        raise AdvisorInputError(field_name, f"no module named {missing} in this model",
                                allowed=sorted(set(suggest)) or None)
    quantized = [n for n, mod in model.named_modules() if type(mod).__name__ in ("Linear4bit", "SimLinear4bit", "Linear8bitLt", "SimLinear8bit",
                                                                                      "SimLinearGPTQ", "QuantLinear")
                 and any(n == r or n.endswith("." + r) for r in requested)]
    if quantized:
        raise AdvisorInputError(field_name, f"{quantized[0]!r} is a quantized layer, which cannot train whole; adapt it "
                                "through target_modules instead")
    return list(requested)
