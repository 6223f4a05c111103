"""The estimator's multi-GPU strategy as the settings each launcher understands.

The estimator (advisor/estimator/fast.py, STRATEGIES) decides what is sharded:

    strategy        sharded across GPUs                              on CPU        DeepSpeed           FSDP
    ddp             nothing (replicas)                               -             -                   -
    zero2           gradients + optimizer state                      -             stage 2             SHARD_GRAD_OP
    zero3           + weights                                        -             stage 3             FULL_SHARD
    zero2_offload   gradients                                        optimizer     stage 2 + offload   (DeepSpeed only)
    zero3_offload   weights + gradients                              optimizer     stage 3 + offload   (DeepSpeed only)
    zero3_offload_params   -                     weights, gradients, optimizer     stage 3 + offload   FULL_SHARD +
                                                                                    of both             offload_params

FSDP's `offload_params` moves parameters *and* their gradients and optimizer step, which is zero3_offload_params; the
optimizer-only offload strategies map to DeepSpeed, whose `offload_optimizer` moves exactly the optimizer state.

`deepspeed_json` writes a DeepSpeed config in the shape the Hugging Face integration fills in ("auto" values come
from the training arguments); Axolotl and LLaMA-Factory both accept it inline as a mapping under `deepspeed:`.
"""

from __future__ import annotations

from typing import Any

ZERO_STAGE = {"zero2": 2, "zero3": 3, "zero2_offload": 2, "zero3_offload": 3, "zero3_offload_params": 3}
OFFLOADS_OPTIMIZER = {"zero2_offload", "zero3_offload", "zero3_offload_params"}
OFFLOADS_PARAMS = {"zero3_offload_params"}
# FSDP2 reshard_after_forward: False = SHARD_GRAD_OP, True = FULL_SHARD
FSDP_RESHARD = {"zero2": False, "zero3": True, "zero3_offload_params": True}
FSDP1_NAME = {"zero2": "SHARD_GRAD_OP", "zero3": "FULL_SHARD", "zero3_offload_params": "FULL_SHARD"}
WORDS = {
    "single": "one GPU", "ddp": "DDP: every GPU holds a full replica",
    "zero2": "ZeRO-2: gradients and optimizer state sharded",
    "zero3": "ZeRO-3: weights, gradients and optimizer state sharded",
    "zero2_offload": "ZeRO-2 with the optimizer state offloaded to CPU",
    "zero3_offload": "ZeRO-3 with the optimizer state offloaded to CPU",
    "zero3_offload_params": "ZeRO-3 with the parameters, gradients and optimizer state offloaded to CPU",
}


def uses_deepspeed(strategy: str) -> bool:
    return strategy in ZERO_STAGE


def deepspeed_json(strategy: str) -> dict[str, Any]:
    """A DeepSpeed config for the Hugging Face integration (batch sizes, clipping and precision left on "auto")."""
    stage = ZERO_STAGE[strategy]
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if strategy in OFFLOADS_OPTIMIZER:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if strategy in OFFLOADS_PARAMS:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "reduce_bucket_size": "auto",
                     "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"})
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
    }


def put_multi_gpu(doc, ctx, default_mode: str) -> None:
    """The multi-GPU section of a tool's YAML: the DeepSpeed config the estimator's strategy needs, or a comment
    saying the tool's own default (`default_mode`) already is that strategy."""
    if not ctx.multi_gpu:
        return
    doc.section(f"multi-GPU: {ctx.gpu_count} GPUs, {ctx.strategy}")
    if uses_deepspeed(ctx.strategy):
        doc.put("deepspeed", deepspeed_json(ctx.strategy), WORDS[ctx.strategy] + " (estimator's choice)")
    else:
        doc.comment(f"{WORDS[ctx.strategy]}: {default_mode}, nothing to set")
