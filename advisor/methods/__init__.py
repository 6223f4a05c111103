"""The method registry. Importing this package registers the twelve methods the rules decide between, and
`peft` (any other PEFT adapter type, from its adapter_config.json), `freeze` (full fine-tuning of a few blocks,
LLaMA-Factory's freeze tuning) and `llama_pro` (LLaMA-Pro's block expansion): estimated, trained and exported on
request, never recommended."""

import re

from advisor.errors import AdvisorInputError
from advisor.methods.base import METHOD_IDS, BuildContext, MethodSpec, Prepared, register_method, registry

from advisor.methods import (  # noqa: E402,F401  (registration side effects, in METHOD_IDS order)
    full,
    lora,
    qlora,
    adalora,
    ia3,
    bitfit,
    prompt_tuning,
    prefix_tuning,
    adapter,
    longlora,
    galore,
    molora,
    peft_any,
    freeze,
)

# registered methods outside the twelve: estimated, trained and exported on request, never recommended or probed
EXTRA_METHOD_IDS = ("peft", "freeze", "llama_pro")


_LISA = {"trainable_layers": -2, "extra_modules": ["embed_tokens", "norm", "lm_head"]}
# names users give methods that are a registered method with settings: (method id, config it implies, what it means)
METHOD_ALIASES: dict[str, tuple[str, dict, str]] = {
    "dora": ("lora", {"peft": {"use_dora": True}}, "DoRA is LoRA with the weight decomposed (peft.use_dora)"),
    "qdora": ("qlora", {"peft": {"use_dora": True}}, "QDoRA is QLoRA with DoRA's decomposition (peft.use_dora)"),
    "rslora": ("lora", {"peft": {"use_rslora": True}}, "rsLoRA is LoRA with rank-stabilized scaling "
               "(peft.use_rslora): the same tensors"),
    "lora_fa": ("lora", {"training": {"optim": "lorafa"}}, "LoRA-FA is LoRA with A frozen (training.optim 'lorafa')"),
    "lorafa": ("lora", {"training": {"optim": "lorafa"}}, "LoRA-FA is LoRA with A frozen (training.optim 'lorafa')"),
    "lora+": ("lora", {}, "LoRA+ changes only B's learning rate: memory and time are LoRA's"),
    "loraplus": ("lora", {}, "LoRA+ changes only B's learning rate: memory and time are LoRA's"),
    "lisa": ("freeze", {"peft": _LISA}, "LISA is estimated at its worst interval: freeze tuning of the first 2 blocks "
             "with the embeddings, final norm and head (peft.trainable_layers -N for N active layers)"),
    "llamapro": ("llama_pro", {}, "LLaMA-Pro"),
    **{name: ("full", {}, "full fine-tuning") for name in ("fft", "full_ft", "full_finetuning", "full_fine_tuning",
                                                            "full_parameter", "full_finetune")},
    **{name: ("peft", {"peft": {"peft_type": ptype}}, f"{ptype} through method 'peft' (PEFT's own layers, its "
                                                       "config class's defaults)")
       for name, ptype in (("loha", "LOHA"), ("lokr", "LOKR"), ("vera", "VERA"), ("oft", "OFT"), ("boft", "BOFT"),
                           ("fourierft", "FOURIERFT"), ("ln_tuning", "LN_TUNING"))},
    **{name: ("peft", {"peft": {"peft_type": "P_TUNING", "num_virtual_tokens": 20}}, "P-tuning through method "
              "'peft' (PEFT's prompt encoder; 20 virtual tokens, prompt tuning's default, unless given)")
       for name in ("p_tuning", "ptuning")},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_method_alias(method: str, config: dict | None) -> tuple[str, dict | None, str | None]:
    """(method id, config, note) for a method name that is a registered method with settings ("dora" → lora with
    peft.use_dora; "lisa" → freeze of the first 2 blocks with embeddings and head; "loha" → peft LOHA); the
    request's own config wins over what the name implies. Registered ids pass through unchanged."""
    key = re.sub(r"[\s-]+", "_", (method or "").strip().lower()) if isinstance(method, str) else method
    if isinstance(key, str) and key in registry():  # "LLaMA-Pro", "Prompt Tuning": the id, spelled as typed
        return key, config, None
    if not isinstance(key, str) or key not in METHOD_ALIASES:
        return method, config, None
    target, implied, meaning = METHOD_ALIASES[key]
    merged = _merge(implied, config or {}) if implied else config
    return target, merged, f"method {method!r} is read as {target!r}: {meaning}"


def get_method(method_id: str) -> MethodSpec:
    key = (method_id or "").strip().lower()
    spec = registry().get(key)
    if spec is None:
        raise AdvisorInputError("method", f"unknown method {method_id!r}",
                                allowed=[*METHOD_IDS, *EXTRA_METHOD_IDS, *METHOD_ALIASES])
    return spec


def all_methods(extra: bool = False) -> list[MethodSpec]:
    """The twelve methods (with `extra`, then the methods outside them)."""
    return [registry()[m] for m in (*METHOD_IDS, *(EXTRA_METHOD_IDS if extra else ()))]


__all__ = ["EXTRA_METHOD_IDS", "METHOD_ALIASES", "METHOD_IDS", "BuildContext", "MethodSpec", "Prepared", "all_methods",
           "get_method", "register_method", "resolve_method_alias"]
