"""The method registry. Importing this package registers the twelve methods the rules decide between, and
`peft` (any other PEFT adapter type, from its adapter_config.json), `freeze` (full fine-tuning of a few blocks,
LLaMA-Factory's freeze tuning) and `llama_pro` (LLaMA-Pro's block expansion): estimated, trained and exported on
request, never recommended."""

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


def get_method(method_id: str) -> MethodSpec:
    key = (method_id or "").strip().lower()
    spec = registry().get(key)
    if spec is None:
        raise AdvisorInputError("method", f"unknown method {method_id!r}", allowed=[*METHOD_IDS, *EXTRA_METHOD_IDS])
    return spec


def all_methods(extra: bool = False) -> list[MethodSpec]:
    """The twelve methods (with `extra`, then the methods outside them)."""
    return [registry()[m] for m in (*METHOD_IDS, *(EXTRA_METHOD_IDS if extra else ()))]


__all__ = ["EXTRA_METHOD_IDS", "METHOD_IDS", "BuildContext", "MethodSpec", "Prepared", "all_methods", "get_method", "register_method"]
