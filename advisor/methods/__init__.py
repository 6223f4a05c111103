"""The method registry. Importing this package registers all twelve methods."""

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
)


def get_method(method_id: str) -> MethodSpec:
    key = (method_id or "").strip().lower()
    spec = registry().get(key)
    if spec is None:
        raise AdvisorInputError("method", f"unknown method {method_id!r}", allowed=list(METHOD_IDS))
    return spec


def all_methods() -> list[MethodSpec]:
    return [registry()[m] for m in METHOD_IDS]


__all__ = ["METHOD_IDS", "BuildContext", "MethodSpec", "Prepared", "all_methods", "get_method", "register_method"]
