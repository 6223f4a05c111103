"""Per-architecture target modules: tables, not branches (PEFT's own mappings, by `model_type`)."""

from __future__ import annotations

from typing import Any

import torch
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)

from advisor.errors import AdvisorInputError
from advisor.methods.base import linear_module_names

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
LORA_TARGETS_EXTRA = {"phi3": ["qkv_proj"], "falcon": ["query_key_value"], "gpt_neox": ["query_key_value"]}


def resolve_targets(
    model: torch.nn.Module,
    requested: Any,
    model_type: str,
    field_name: str,
    table: dict[str, list[str]] | None = None,
) -> Any:
    """The requested names if the model has them; else the architecture's table entry; else a clear error.

    "all-linear" passes through (PEFT expands it). A requested list that the model lacks entirely is
    treated as the seeds' Llama-style default and mapped to this architecture; a list that partly matches
    is a user mistake and is refused with the names that exist.
    """
    if requested == "all-linear":
        return requested
    available = linear_module_names(model)
    if isinstance(requested, str):
        requested = [requested]
    requested = list(requested or [])
    present = [t for t in requested if t in available]
    if requested and len(present) == len(requested):
        return requested
    if requested and present:
        missing = [t for t in requested if t not in available]
        raise AdvisorInputError(field_name, f"no layer named {missing} in this {model_type} model", allowed=available)
    mapped = (table or {**TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, **LORA_TARGETS_EXTRA}).get(model_type)
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
