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
"""

from __future__ import annotations

from typing import Any

import torch

from advisor.errors import AdvisorInputError
from advisor.methods.base import MethodSpec, Prepared, freeze, register_method


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
