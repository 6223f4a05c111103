"""Any adapter PEFT implements, from its own config: `config.peft` is an `adapter_config.json`.

The twelve methods are the ones the reference documents decide between. PEFT implements dozens more (LoHa, LoKr,
VeRA, OFT, BOFT, FourierFT, LN tuning, P-tuning, LLaMA-Adapter, ...), and a user who already chose one asks the same
questions: does it fit, how long, what does it cost, and train it. `method: "peft"` answers them for any PEFT type
this PEFT version has: `config.peft` holds `peft_type` and the keyword arguments of that type's config class
(exactly the keys of the `adapter_config.json` PEFT saves), the model is built by `peft.get_peft_model` like every
other method, and so the simulation, the fast estimate and the executor all run PEFT's own layers. Unknown keys
are refused with that class's fields; a config PEFT itself rejects is refused with PEFT's reason.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from advisor.errors import AdvisorInputError
from advisor.methods.base import MethodSpec, Prepared, check_targets, peft_task_type, register_method

# PEFT types that cannot be trained from a config alone: X-LoRA mixes adapters that must already exist, Poly needs
# per-example task ids in every batch, Cartridge is initialised from a KV cache computed on a corpus
UNSUPPORTED = {
    "XLORA": "X-LoRA mixes already-trained LoRA adapters (its config names them); train those first",
    "POLY": "Poly routes by a task id that every batch must carry; the advisor's data has none",
    "CARTRIDGE": "Cartridges are initialised from a KV cache computed on a corpus, not from a config",
    # initialised from the base weights' values or data-dependent shapes, which the memory simulation (fake tensors:
    # shapes without values) cannot take, so none of them can be estimated
    "SHIRA": "SHiRA picks its sparse trainable entries with torch.nonzero on a mask (a data-dependent shape): the "
             "memory simulation cannot run it",
    "WAVEFT": "WaveFT picks its trainable coefficients with torch.nonzero (a data-dependent shape): the memory "
              "simulation cannot run it",
    "FROD": "FRoD is initialised from a decomposition of the base weights' values: the memory simulation has none",
    "CPT": "CPT's forward branches on its token-type mask's values: the memory simulation cannot run it",
    "SHADOW": "Shadow's carrier layers do not run under the memory simulation in this PEFT version",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning selects a prompt by a task id that every batch must carry; "
                               "the advisor's data has none (use PROMPT_TUNING)",
}
# keys of an adapter_config.json that say where it came from or how it is loaded, not what is trained
IGNORED = ("base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version", "task_type")
# prompt-learning types: their virtual tokens lengthen the sequence every layer runs over (the FLOP count's concern)
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")


@functools.lru_cache(maxsize=1)
def _mapping() -> dict[str, type]:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(getattr(k, "value", k)).upper(): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def peft_types() -> list[str]:
    """The PEFT types `method: "peft"` accepts, in this PEFT version."""
    return sorted(t for t in _mapping() if t not in UNSUPPORTED)


def peft_type_of(peft: dict[str, Any]) -> str:
    raw = peft.get("peft_type")
    if raw is None:
        raise AdvisorInputError("config.peft.peft_type", "required for method 'peft': the PEFT type to train",
                                allowed=peft_types())
    name = str(getattr(raw, "value", raw)).strip().upper().replace("-", "_")
    if name in UNSUPPORTED:
        raise AdvisorInputError("config.peft.peft_type", f"{name}: {UNSUPPORTED[name]}", allowed=peft_types())
    if name not in _mapping():
        raise AdvisorInputError("config.peft.peft_type", f"unknown PEFT type {raw!r}", allowed=peft_types())
    return name


def config_fields(peft: dict[str, Any]) -> list[str]:
    """The keys `config.peft` may hold for its `peft_type`: that PEFT config class's fields (a missing or unknown
    `peft_type` is the error to report first)."""
    cls = _mapping()[peft_type_of(peft)]
    return sorted(f.name for f in dataclasses.fields(cls) if f.init)


# knobs of `get_peft_model` rather than of the config class: PEFT keeps adapter weights in fp32 over a bf16/fp16 base
# unless told not to (PEFT's MetaMathQA benchmark turns it off per experiment in training_params.json)
CALL_KNOBS = {"autocast_adapter_dtype": True}


def _kwargs(peft: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in peft.items() if k != "peft_type" and k not in IGNORED and k not in CALL_KNOBS}


def check_model(peft: dict[str, Any], model_config) -> None:
    """What depends on the whole model, checked before anything is built (a simulation builds 1-2 block slices)."""
    layers = _layer_count(model_config)
    if peft_type_of(peft) == "ADAPTION_PROMPT" and layers and int(peft.get("adapter_layers") or 0) > layers:
        raise AdvisorInputError("config.peft.adapter_layers",
                                f"{peft['adapter_layers']} adapter layers, but the model has {layers}",
                                allowed=f"1..{layers}")
    if not isinstance(peft.get("autocast_adapter_dtype", True), bool):
        raise AdvisorInputError("config.peft.autocast_adapter_dtype",
                                f"must be true or false, got {peft['autocast_adapter_dtype']!r}")


def notes(peft: dict[str, Any], model_config) -> list[str]:
    """What an estimate of this PEFT config should say about itself."""
    layers = _layer_count(model_config)
    if peft_type_of(peft) == "ADAPTION_PROMPT" and layers and int(peft.get("adapter_layers") or 0) < layers:
        return [f"adaption prompt in the top {peft.get('adapter_layers')} of {layers} layers: the fast estimate "
                "extrapolates from blocks that all carry it, so it is over by the other layers' share (exact: "
                "\"exact\": true)"]
    return []


def _layer_count(model_config) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(model_config, name, None)
        if isinstance(value, int):
            return value
    return 0


def peft_config(peft: dict[str, Any], ctx, model=None):
    """PEFT's config object for `config.peft`, or a clear error naming the field PEFT objected to."""
    name = peft_type_of(peft)
    cls = _mapping()[name]
    kwargs = _kwargs(peft)
    if name == "ADALORA" and "total_step" not in kwargs:
        kwargs["total_step"] = max(int(ctx.total_steps), 3)
    if name == "ADAPTION_PROMPT" and model is not None and kwargs.get("adapter_layers"):
        # a simulation's 1-2 block slice of a deeper model: every block of the slice carries the adapter
        # (check_model has held the request to the whole model's depth)
        kwargs["adapter_layers"] = min(int(kwargs["adapter_layers"]), _layer_count(model.config) or 10**9)
    try:
        return cls(task_type=peft_task_type(ctx), inference_mode=False, **kwargs)
    except TypeError as err:  # an unknown keyword (resolve_config refuses those first) or a wrong type
        raise AdvisorInputError("config.peft", f"{name}: {err}", allowed=config_fields(peft)) from None
    except (ValueError, AssertionError) as err:
        raise AdvisorInputError("config.peft", f"PEFT refuses this {name} config: {err}") from None


def validate(peft: dict[str, Any], ctx) -> None:
    peft_config(peft, ctx)


def build(model, peft, ctx):
    from peft import get_peft_model

    cfg = peft_config(peft, ctx, model)
    targets = getattr(cfg, "target_modules", None)
    if isinstance(targets, (list, set, tuple)):
        check_targets(model, sorted(targets), "config.peft.target_modules")
    try:
        wrapped = get_peft_model(model, cfg, autocast_adapter_dtype=bool(peft.get("autocast_adapter_dtype", True)))
    except (ValueError, TypeError, NotImplementedError, AssertionError, ImportError) as err:
        raise AdvisorInputError("config.peft", f"PEFT could not apply this {peft_type_of(peft)} config to "
                                               f"{ctx.model_type}: {err}") from None
    return Prepared(model=wrapped, method="peft", peft=peft)


def is_prompt_learning(peft: dict[str, Any]) -> bool:
    try:
        name = peft_type_of(peft)
    except AdvisorInputError:
        return False
    return name in PROMPT_TYPES or name in ("PREFIX_TUNING", "ADAPTION_PROMPT")


# the calibrated method whose achieved FLOP/s times an uncalibrated PEFT type: the nearest one in how it runs
RATE_PROXY = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "prompt_tuning", "MULTITASK_PROMPT_TUNING": "prompt_tuning",
              "CPT": "prompt_tuning", "PREFIX_TUNING": "prefix_tuning", "ADAPTION_PROMPT": "prefix_tuning",
              "IA3": "ia3", "ADALORA": "adalora", "LN_TUNING": "bitfit", "TRAINABLE_TOKENS": "bitfit"}


def rate_proxy(peft: dict[str, Any]) -> str:
    """The method id whose calibrated rate times this PEFT type (weight adapters: LoRA's)."""
    try:
        return RATE_PROXY.get(peft_type_of(peft), "lora")
    except AdvisorInputError:
        return "lora"


SPEC = register_method(
    MethodSpec(
        id="peft",
        name="Any PEFT adapter",
        summary="Any adapter type PEFT implements (LoHa, LoKr, VeRA, OFT, BOFT, FourierFT, LN tuning, P-tuning, ...), "
                "from its adapter_config.json: estimated and trained with PEFT's own layers; not one the rules "
                "recommend.",
        build=build,
        knobs={"peft_type": None, **CALL_KNOBS},
        open_knobs=config_fields,
        mergeable=True,
        paper="Mangrulkar et al. 2022, PEFT: State-of-the-art Parameter-Efficient Fine-Tuning methods, "
              "https://github.com/huggingface/peft",
        validate=validate,
    )
)
