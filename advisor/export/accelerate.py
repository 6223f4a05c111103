"""An accelerate config YAML for launching the exported script on several GPUs
(`accelerate launch --config_file accelerate_config.yaml train.py`).

The estimator's strategy (`estimate.strategy`) picks the backend (see multigpu.py for what each shards):

    strategy        backend (auto)      accelerate settings
    single          none                distributed_type: 'NO', one process
    ddp             MULTI_GPU           one replica per GPU
    zero2           FSDP (v2)           fsdp_reshard_after_forward: false  (= SHARD_GRAD_OP)
    zero3           FSDP (v2)           fsdp_reshard_after_forward: true   (= FULL_SHARD)
    zero2_offload   DEEPSPEED           zero_stage 2, offload_optimizer_device: cpu
    zero3_offload   DEEPSPEED           zero_stage 3, offload_optimizer_device: cpu
    zero3_offload_params FSDP (v2)      fsdp_reshard_after_forward: true, fsdp_offload_params: true

`backend="deepspeed"` uses DeepSpeed ZeRO-2/3 for zero2/zero3 too (zero3_offload_params: offload_param_device and
offload_optimizer_device cpu); `backend="fsdp"` refuses the optimizer-only offload strategies (FSDP's offload moves
the parameters as well: that is zero3_offload_params). FSDP wraps each decoder block: the
class named in the model class' `_no_split_modules` (LlamaDecoderLayer, ...). Checkpointing under FSDP uses FSDP's
own activation checkpointing (the exported script turns the Trainer's off when it sees it). num_processes is the
GPU count; mixed_precision follows the config (bf16 / fp16 / no). Key names are accelerate's own (the
`accelerate config` file: accelerate/commands/config/config_args.py ClusterConfig, fsdp_* and deepspeed_config keys
read by accelerate/commands/launch.py); the tests load the file with accelerate's classes.
"""

from __future__ import annotations

import math

from advisor.errors import AdvisorInputError
from advisor.export.base import ExportContext, ExportFormat, Rendered, register_format
from advisor.export.multigpu import FSDP1_NAME, FSDP_RESHARD, OFFLOADS_OPTIMIZER, OFFLOADS_PARAMS, WORDS, ZERO_STAGE
from advisor.export.script import METHODS as SCRIPT_METHODS
from advisor.export.script import REFUSALS as SCRIPT_REFUSALS
from advisor.export.yamldoc import YamlDoc

BACKENDS = ("auto", "fsdp", "deepspeed")
GPUS_PER_NODE = 8


def backend_for(strategy: str, backend: str) -> str:
    """'none' | 'ddp' | 'fsdp' | 'deepspeed'."""
    if strategy == "single":
        return "none"
    if strategy == "ddp":
        return "ddp"
    if backend == "deepspeed" or strategy in OFFLOADS_OPTIMIZER - OFFLOADS_PARAMS:
        if backend == "fsdp":
            raise AdvisorInputError(
                "backend", f"{strategy} keeps the optimizer state on the CPU, which FSDP cannot do alone (its offload "
                           "moves the parameters too); use the deepspeed backend", allowed=["auto", "deepspeed"])
        return "deepspeed"
    return "fsdp"


def render(ctx: ExportContext) -> Rendered:
    if ctx.backend not in BACKENDS:
        raise AdvisorInputError("backend", f"unknown backend {ctx.backend!r}", allowed=list(BACKENDS))
    t = ctx.training
    kind = backend_for(ctx.strategy, ctx.backend)
    script = "train.py"
    count = max(1, ctx.gpu_count)
    machines = max(1, math.ceil(count / GPUS_PER_NODE))
    run = [f"advisor export --format script ... --out {script}   # the training script this launches",
           f"accelerate launch --config_file {ctx.filename} {script}"]
    if kind == "deepspeed":
        run.insert(0, "pip install deepspeed")
    if machines > 1:
        run.append(f"(on each of the {machines} nodes, with --machine_rank 0..{machines - 1} and "
                   "--main_process_ip of node 0)")
    header = ctx.header_lines(f"accelerate config: {count}× {ctx.gpu_name or 'GPU'}, {WORDS[ctx.strategy]}", run)
    doc = YamlDoc(header=header)
    doc.put("compute_environment", "LOCAL_MACHINE")
    doc.put("debug", False)
    distributed = {"none": "NO", "ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[kind]
    doc.put("distributed_type", distributed, f"estimator strategy {ctx.strategy}")
    doc.put("mixed_precision", ctx.precision, ctx.why("bf16", t.bf16) if ctx.precision != "no" else "float32")
    doc.put("num_machines", machines, f"{GPUS_PER_NODE} GPUs per node assumed" if machines > 1 else None)
    doc.put("num_processes", count, "one process per GPU")
    doc.put("machine_rank", 0)
    if machines > 1:
        doc.put("main_process_ip", None, "set: the address of node 0")
        doc.put("main_process_port", 29500)
    doc.put("gpu_ids", "all")
    doc.put("main_training_function", "main")
    doc.put("rdzv_backend", "static")
    doc.put("same_network", True)
    doc.put("use_cpu", False)
    doc.put("downcast_bf16", "no")
    if kind == "fsdp":
        if not ctx.layer_class:
            raise AdvisorInputError("model", f"no decoder block class known for {ctx.model_id} to wrap with FSDP; "
                                             "use the deepspeed backend", allowed=["deepspeed"])
        fsdp = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": ctx.layer_class,
            "fsdp_reshard_after_forward": FSDP_RESHARD[ctx.strategy],
            "fsdp_offload_params": ctx.strategy in OFFLOADS_PARAMS,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_activation_checkpointing": bool(t.gradient_checkpointing),
        }
        doc.put("fsdp_config", fsdp, f"{FSDP1_NAME[ctx.strategy]} equivalent, wrapping each {ctx.layer_class}")
    elif kind == "deepspeed":
        ds = {
            "zero_stage": ZERO_STAGE[ctx.strategy],
            "offload_optimizer_device": "cpu" if ctx.strategy in OFFLOADS_OPTIMIZER else "none",
            "offload_param_device": "cpu" if ctx.strategy in OFFLOADS_PARAMS else "none",
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "gradient_clipping": t.max_grad_norm,
            "zero3_init_flag": ZERO_STAGE[ctx.strategy] == 3,
        }
        if ZERO_STAGE[ctx.strategy] == 3:
            ds["zero3_save_16bit_model"] = True
        doc.put("deepspeed_config", ds, WORDS[ctx.strategy])
    return Rendered(content=doc.render(), command=run[-1] if machines == 1 else run[-2], notes=[])


FORMAT = register_format(ExportFormat(
    id="accelerate", tool="accelerate (launching the exported script)", filename="accelerate_config.yaml",
    methods=SCRIPT_METHODS, refusals=SCRIPT_REFUSALS, render=render, kinds=("causal_lm", "seq2seq"),
    summary="accelerate config for multi-GPU (FSDP or DeepSpeed): accelerate launch --config_file ... train.py",
))
