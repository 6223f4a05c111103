"""Bottleneck adapters (Houlsby / Pfeiffer): small down-up MLPs inserted after sub-layers.

PEFT has no bottleneck adapter and AdapterHub's `adapters` pins an old transformers, so the module is ours
(`modules/bottleneck.py`).
"""

from advisor.errors import AdvisorInputError
from advisor.methods.base import MethodSpec, Prepared, freeze, register_method

PLACEMENTS = ("pfeiffer", "houlsby")


def validate(peft, ctx):
    if peft["placement"] not in PLACEMENTS:
        raise AdvisorInputError("config.peft.placement", f"unknown placement {peft['placement']!r}", allowed=PLACEMENTS)
    rf = peft["reduction_factor"]
    if not isinstance(rf, int) or rf < 1:
        raise AdvisorInputError("config.peft.reduction_factor", f"must be a positive integer, got {rf!r}")


def build(model, peft, ctx):
    from advisor.methods.modules.bottleneck import add_bottleneck_adapters

    validate(peft, ctx)
    freeze(model)
    try:
        names = add_bottleneck_adapters(
            model,
            reduction_factor=peft["reduction_factor"],
            placement=peft["placement"],
            non_linearity=peft["non_linearity"],
            dropout=peft["dropout"],
        )
    except ValueError as err:
        raise AdvisorInputError("model", f"bottleneck adapters: {err}") from None
    return Prepared(model=model, method="adapter", peft=peft, notes=[f"{len(names)} bottleneck adapters inserted"])


SPEC = register_method(
    MethodSpec(
        id="adapter",
        name="Bottleneck adapters",
        summary="Insert small trainable bottleneck MLPs after each block's sub-layers; the base stays frozen.",
        build=build,
        knobs={"reduction_factor": 16, "placement": "pfeiffer", "non_linearity": "gelu", "dropout": 0.0},
        mergeable=False,
        paper="Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2020, arXiv:2005.00247",
        validate=validate,
    )
)
