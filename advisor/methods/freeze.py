"""Freeze tuning: full fine-tuning of a few transformer blocks, the rest of the model frozen.

LLaMA-Factory's `finetuning_type: freeze` (`freeze_trainable_layers`, `freeze_trainable_modules`,
`freeze_extra_modules`; default the last 2 blocks), the "train only the top layers" baseline of the LoRA and LISA
papers, and the shape of one LISA interval. The knobs keep LLaMA-Factory's meaning:

- `trainable_layers` N: the last N blocks train (N > 0), or the first |N| (N < 0).
- `trainable_modules`: "all", or names of submodules inside those blocks ("mlp", "self_attn", "q_proj", ...).
- `extra_modules`: modules outside the blocks that train too ("embed_tokens", "lm_head", "norm", ...).

Memory follows from what autograd needs. Without gradient checkpointing, frozen blocks below the lowest trained one
save nothing and run forward only (no gradient flows into them); frozen blocks above it save what their input
gradient needs, as under LoRA. With checkpointing, transformers makes the embeddings' output require grad
(`enable_input_require_grads`, for every model whose input is `input_ids`), so backward recomputes and runs through
every block, frozen ones included, and reentrant checkpointing trains the lowest trained block as well. Trained
parameters hold gradients and the optimizer's full state. Nothing here is an adapter: the saved model is the whole
model.

LISA (Pan et al. 2024, arXiv:2403.17919; ms-swift's `lisa_activated_layers`, LMFlow) trains a random |N| blocks at a
time, with the embeddings and the output head always trained: its worst interval, the one that sets a run's peak,
is the first |N| blocks (backward runs through every block) with `extra_modules` the embeddings, final norm and
head, i.e. `trainable_layers: -N` with those extras.

LLaMA-Pro (method `llama_pro`, below) is freeze tuning of N new blocks interleaved into the stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from advisor.errors import AdvisorInputError
from advisor.methods.base import MethodSpec, Prepared, freeze, register_method

if TYPE_CHECKING:
    import torch


def _block_stack(model: torch.nn.Module) -> tuple[str, list[torch.nn.Module]]:
    """(name, blocks) of the model's stack of transformer blocks (`advisor.memory.counter.named_block_stacks`)."""
    from advisor.memory.counter import named_block_stacks

    stacks = named_block_stacks(model)
    if not stacks:
        raise AdvisorInputError("method", "freeze tuning needs a stack of transformer blocks; this model has none")
    return stacks[0]


def trained_block_indices(n_blocks: int, trainable_layers: int) -> list[int]:
    """The blocks that train: the last N (N > 0) or the first |N| (N < 0) of `n_blocks`."""
    n = abs(int(trainable_layers))
    return list(range(n_blocks - n, n_blocks)) if trainable_layers > 0 else list(range(n))


def validate(peft: dict[str, Any], ctx=None, n_blocks: int | None = None) -> None:
    n = peft.get("trainable_layers")
    if isinstance(n, bool) or not isinstance(n, int) or n == 0:
        raise AdvisorInputError("config.peft.trainable_layers", f"must be a non-zero integer (the last N blocks "
                                f"train for N > 0, the first |N| for N < 0), got {n!r}")
    if n_blocks is not None and abs(n) >= n_blocks:
        raise AdvisorInputError("config.peft.trainable_layers", f"|{n}| blocks of this model's {n_blocks}: every block "
                                "would train; that is full fine-tuning (method 'full')",
                                allowed=[f"1..{n_blocks - 1}", f"-{n_blocks - 1}..-1"])
    modules = peft.get("trainable_modules")
    if modules != "all" and not (isinstance(modules, list) and modules and all(isinstance(m, str) and m
                                                                                for m in modules)):
        raise AdvisorInputError("config.peft.trainable_modules", "'all' or a non-empty list of submodule names inside "
                                f"the blocks (e.g. ['mlp'], ['self_attn']), got {modules!r}")
    extra = peft.get("extra_modules")
    if not isinstance(extra, list) or not all(isinstance(m, str) and m for m in extra):
        raise AdvisorInputError("config.peft.extra_modules", "a list of module names outside the blocks (e.g. "
                                f"['embed_tokens', 'lm_head']), got {extra!r}")


def selection(model: torch.nn.Module, peft: dict[str, Any]) -> tuple[str, list[torch.nn.Module], list[int], dict]:
    """What freeze tuning trains in `model`: (the block stack's name, its blocks, the trained blocks' indices, the
    extra modules by full name). Unknown extra module names are refused with the names there are."""
    stack_name, blocks = _block_stack(model)
    validate(peft, None, len(blocks))
    outside = {name: mod for name, mod in model.named_modules()
               if name and not name.startswith(stack_name) and not stack_name.startswith(name)}
    extras = {}
    for extra in peft["extra_modules"]:
        hits = {name: mod for name, mod in outside.items() if name.split(".")[-1] == extra}
        if not hits:
            raise AdvisorInputError("config.peft.extra_modules", f"no module named {extra!r} outside the blocks",
                                    allowed=sorted({n.split(".")[-1] for n in outside}))
        extras.update(hits)
    return stack_name, blocks, trained_block_indices(len(blocks), peft["trainable_layers"]), extras


def build(model, peft, ctx):
    _, blocks, trained, extras = selection(model, peft)
    freeze(model)
    wanted = peft["trainable_modules"]
    for i in trained:
        for name, p in blocks[i].named_parameters():
            if wanted == "all" or any(part in wanted for part in name.split(".")[:-1]):
                p.requires_grad_(True)
    if wanted != "all" and not any(p.requires_grad for i in trained for p in blocks[i].parameters()):
        names = sorted({n for i in trained for n, _ in blocks[i].named_modules() if n})
        raise AdvisorInputError("config.peft.trainable_modules", f"{wanted} names no submodule of the blocks",
                                allowed=sorted({n.split(".")[-1] for n in names}))
    for mod in extras.values():
        for p in mod.parameters():
            p.requires_grad_(True)
    notes = [f"freeze tuning: blocks {trained[0]}-{trained[-1]} of {len(blocks)} train"
             + ("" if wanted == "all" else f" (their {', '.join(wanted)})")
             + (f", and {', '.join(peft['extra_modules'])}" if peft["extra_modules"] else "")]
    return Prepared(model=model, method="freeze", peft=peft, notes=notes)


def pinned_blocks(peft: dict[str, Any]) -> int:
    """Blocks whose role the method fixes (the trained ones): memory is linear in the number of the others."""
    n = peft.get("trainable_layers")
    return abs(n) if isinstance(n, int) and not isinstance(n, bool) else 0


SPEC = register_method(
    MethodSpec(
        id="freeze",
        name="Freeze tuning",
        summary="Full fine-tuning of the last (or first) few blocks, the rest frozen: no adapter, no saved activations "
                "below the lowest trained block; LISA's worst interval with the first blocks and embeddings/head.",
        build=build,
        knobs={"trainable_layers": 2, "trainable_modules": "all", "extra_modules": []},
        kinds=("causal_lm",),
        full_weights=True,
        paper="LLaMA-Factory (Zheng et al. 2024, arXiv:2403.13372) freeze tuning; LISA (Pan et al. 2024, "
              "arXiv:2403.17919)",
        validate=validate,
        pinned_blocks=pinned_blocks,
    )
)


# ------------------------------------------------------------------------------------------------------- LLaMA-Pro
# LLaMA-Pro (Wu et al. 2024, arXiv:2401.02415, "block expansion"): N copies of existing blocks are interleaved into
# the stack, one after every L/N original blocks, each with its output projections zeroed so that the expanded model
# computes what the original did; only the copies (and any extra modules) train. ms-swift's `train_type llamapro`
# (`llamapro_num_new_blocks`, default 4) expands in place; LLaMA-Factory expands offline (scripts/llama_pro.py
# `--num_expand N`) and trains with `use_llama_pro: true`, `finetuning_type: freeze`, `freeze_trainable_layers: N`,
# which picks the same blocks: stride = (L + N) / N, trained ids stride-1, 2*stride-1, ... The estimator works on the
# expanded architecture (`expanded_model`): every later term sees L + N blocks.

EXPANDED_MARK = "advisor_llama_pro_new_blocks"  # config key of an architecture already expanded for the estimator
# the output projections (attention's and the MLP's) a new block's copy starts at zero, weight and bias, so that it
# adds nothing to the residual stream (LLaMA-Factory's llama_pro.py zeroes o_proj and down_proj, Llama's; the others
# are the same projections in GPT-2/StarCoder (c_proj), OPT/Phi (out_proj, fc2, dense), GPT-J/CodeGen (fc_out),
# GPT-NeoX/Falcon/BLOOM (dense, dense_4h_to_h), MoE experts stored as 3-D parameters (down_proj))
ZEROED_OUTPUTS = ("o_proj", "down_proj", "out_proj", "dense_4h_to_h", "c_proj", "fc2", "fc_out", "wo", "w2", "dense")


def zero_outputs(block: torch.nn.Module) -> None:
    """Zero a copied block's output projections (see ZEROED_OUTPUTS)."""
    import torch

    with torch.no_grad():
        for name, param in block.named_parameters():
            parts = name.split(".")
            if parts[-1] in ZEROED_OUTPUTS or (len(parts) > 1 and parts[-2] in ZEROED_OUTPUTS):
                param.zero_()


def llama_pro_trained_indices(n_blocks: int, new_blocks: int) -> list[int]:
    """The new blocks' positions in an expanded stack of `n_blocks` (LLaMA-Factory's `use_llama_pro` rule)."""
    stride = n_blocks // new_blocks
    return list(range(stride - 1, n_blocks, stride))


def validate_llama_pro(peft: dict[str, Any], ctx=None, n_blocks: int | None = None) -> None:
    """`n_blocks`: the original model's depth (before expansion)."""
    n = peft.get("num_new_blocks")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise AdvisorInputError("config.peft.num_new_blocks", f"must be a positive integer (the blocks LLaMA-Pro adds "
                                f"and trains), got {n!r}")
    if n_blocks is not None and n_blocks % n:
        allowed = [str(d) for d in range(1, n_blocks + 1) if n_blocks % d == 0]
        raise AdvisorInputError("config.peft.num_new_blocks", f"{n} new blocks for this model's {n_blocks}: LLaMA-Pro "
                                "inserts one after every L/N blocks, so N must divide the depth", allowed=allowed)
    extra = peft.get("extra_modules")
    if not isinstance(extra, list) or not all(isinstance(m, str) and m for m in extra):
        raise AdvisorInputError("config.peft.extra_modules", "a list of module names outside the blocks (e.g. "
                                f"['embed_tokens', 'lm_head']), got {extra!r}")


def _layer_field(raw: dict) -> str:
    from advisor.estimator.static import _LAYER_FIELDS

    key = next((k for k in _LAYER_FIELDS if isinstance(raw.get(k), int)), None)
    if key is None:
        raise AdvisorInputError("method", "LLaMA-Pro needs a model config with its number of blocks")
    return key


def expanded_model(resolved, peft: dict[str, Any]):
    """The architecture LLaMA-Pro trains: `resolved` with `num_new_blocks` more blocks (per-layer settings such as
    `layer_types` follow the copied blocks), marked so that `build_llama_pro` does not expand it again."""
    import copy

    from advisor.catalog.models import config_from_dict

    raw = copy.deepcopy(resolved.raw_config if resolved.raw_config is not None else resolved.config.to_dict())
    if raw.get(EXPANDED_MARK):
        return resolved
    key = _layer_field(raw)
    n, depth = int(peft["num_new_blocks"]), int(raw[key])
    validate_llama_pro(peft, None, depth)
    order = _expanded_order(depth, n)
    raw[key] = len(order)
    types = getattr(resolved.config, "layer_types", None)
    if isinstance(types, list) and len(types) == depth:
        raw["layer_types"] = [types[i] for i in order]
    raw[EXPANDED_MARK] = n
    out = copy.copy(resolved)
    out.raw_config, out.config = raw, config_from_dict(raw)
    out.declared_params = None
    return out


def _expanded_order(depth: int, new_blocks: int) -> list[int]:
    """Original block index of each block of the expanded stack (a copy repeats the block it follows)."""
    stride = depth // new_blocks
    order = []
    for i in range(depth):
        order.append(i)
        if (i + 1) % stride == 0:
            order.append(i)
    return order


def _expand(model: torch.nn.Module, new_blocks: int) -> None:
    """Insert the copies into `model` in place (real weights: a copy starts with its output projections at zero)."""
    import copy

    import torch

    stack_name, blocks = _block_stack(model)
    order = _expanded_order(len(blocks), new_blocks)
    new = torch.nn.ModuleList()
    for pos, i in enumerate(order):
        block = blocks[i] if pos == 0 or order[pos - 1] != i else copy.deepcopy(blocks[i])
        if block is not blocks[i]:
            zero_outputs(block)
        for mod in block.modules():  # the KV cache and per-layer settings index blocks by position
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = pos
        new.append(block)
    parent_name, _, attr = stack_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    config = model.config
    raw = {k: getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, k)}
    setattr(config, _layer_field(raw), len(order))
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == len(blocks):
        config.layer_types = [types[i] for i in order]


def build_llama_pro(model, peft, ctx):
    _, blocks = _block_stack(model)
    n = int(peft["num_new_blocks"])
    if not getattr(model.config, EXPANDED_MARK, None):  # a real model: expand it; the estimator's is expanded already
        validate_llama_pro(peft, None, len(blocks))
        _expand(model, n)
    stack_name, blocks = _block_stack(model)
    trained = llama_pro_trained_indices(len(blocks), n)
    freeze_peft = {"trainable_layers": 1, "trainable_modules": "all", "extra_modules": peft["extra_modules"]}
    _, _, _, extras = selection(model, freeze_peft)
    freeze(model)
    for i in trained:
        for p in blocks[i].parameters():
            p.requires_grad_(True)
    for mod in extras.values():
        for p in mod.parameters():
            p.requires_grad_(True)
    notes = [f"LLaMA-Pro: {n} new blocks among {len(blocks) - n} (at {', '.join(map(str, trained))} of {len(blocks)}) "
             "train" + (f", and {', '.join(peft['extra_modules'])}" if peft["extra_modules"] else "")]
    return Prepared(model=model, method="llama_pro", peft=peft, notes=notes)


def block_period(peft: dict[str, Any]) -> int:
    """LLaMA-Pro's slices keep its N groups (L/N frozen blocks + 1 new one each) and vary the frozen blocks per group:
    the estimator slices the expanded stack at multiples of N."""
    n = peft.get("num_new_blocks")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


LLAMA_PRO = register_method(
    MethodSpec(
        id="llama_pro",
        name="LLaMA-Pro (block expansion)",
        summary="Interleaves N copies of existing blocks (output projections zeroed) and trains only them: the "
                "original model is kept intact, the new blocks learn the new domain.",
        build=build_llama_pro,
        knobs={"num_new_blocks": 4, "extra_modules": []},
        kinds=("causal_lm",),
        full_weights=True,
        paper="LLaMA-Pro (Wu et al. 2024, arXiv:2401.02415); ms-swift train_type llamapro; LLaMA-Factory use_llama_pro",
        validate=validate_llama_pro,
        block_period=block_period,
    )
)
