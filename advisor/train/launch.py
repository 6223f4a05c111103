"""More than one device: run the same `run_training` under `accelerate launch` with the strategy the estimator chose.

    files = write_launch_files(job, output_dir, strategy="zero3", num_processes=4)
    subprocess.run(launch_command(files, num_processes=4))        # runs advisor.train.entry on every process
    read_events(files)                                             # {rank: [event, ...]}

Strategy → accelerate configuration (advisor/estimator/fast.py STRATEGIES; never a home-made distribution layer):

    ddp            DistributedDataParallel (MULTI_GPU, or MULTI_CPU with gloo on a CPU-only host)
    zero2          DeepSpeed ZeRO-2 when deepspeed is installed, else FSDP SHARD_GRAD_OP
    zero3          DeepSpeed ZeRO-3 when deepspeed is installed, else FSDP FULL_SHARD
    zero2_offload, zero3_offload
                   DeepSpeed with the optimizer state on the CPU (offload_optimizer); without DeepSpeed, FSDP
                   FULL_SHARD with offload_params (FSDP cannot offload the optimizer state alone: it moves the
                   parameters too, which needs less GPU memory than estimated and is slower; the job says so)
    zero3_offload_params
                   DeepSpeed ZeRO-3 with offload_param + offload_optimizer, else FSDP FULL_SHARD + offload_params

The accelerate config is written as YAML next to the job JSON; each process writes its events as JSON lines to
`events-rank<r>.jsonl` (rank 0 streams everything, the others their `result`).
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from advisor.errors import AdvisorInputError

FSDP_SHARDING = {"zero2": "SHARD_GRAD_OP", "zero2_offload": "FULL_SHARD", "zero3": "FULL_SHARD",
                 "zero3_offload": "FULL_SHARD", "zero3_offload_params": "FULL_SHARD"}


@dataclass
class LaunchFiles:
    directory: Path
    job: Path
    accelerate_config: Path
    output_dir: Path
    events_dir: Path
    strategy: str
    backend: str  # "ddp" | "fsdp" | "deepspeed"
    note: str | None = None  # how the launch differs from the estimated strategy, if it does


def accelerate_config(strategy: str, num_processes: int, *, mixed_precision: str = "no", cpu: bool = False,
                      grad_accum: int = 1, deepspeed: bool | None = None) -> tuple[dict, str]:
    """(accelerate config dict, backend) for an estimator strategy."""
    from advisor.estimator.fast import STRATEGIES, STRATEGY_ALIASES

    strategy = STRATEGY_ALIASES.get(strategy, strategy)
    if strategy not in STRATEGIES:
        raise AdvisorInputError("strategy", f"unknown strategy {strategy!r}", allowed=[*STRATEGIES, *STRATEGY_ALIASES])
    base = {"compute_environment": "LOCAL_MACHINE", "num_machines": 1, "machine_rank": 0,
            "num_processes": num_processes, "mixed_precision": mixed_precision, "use_cpu": cpu,
            "main_training_function": "main", "rdzv_backend": "static", "same_network": True}
    if strategy == "ddp" or num_processes == 1:
        # accelerate's MULTI_CPU launcher needs mpirun; its torch.distributed.run launcher (MULTI_GPU) starts CPU
        # processes too, and the Accelerator inside picks gloo when the processes run on CPU
        return {**base, "distributed_type": "MULTI_GPU", "use_cpu": False}, "ddp"
    if cpu:
        raise AdvisorInputError("strategy", f"{strategy} shards over GPUs; on CPU processes only ddp is supported",
                                allowed=["ddp"])
    offload = STRATEGIES[strategy]["offload"]  # False | "optimizer" | "params"
    if deepspeed is None:
        deepspeed = importlib.util.find_spec("deepspeed") is not None
    if deepspeed:
        stage = 3 if strategy.startswith("zero3") else 2
        ds = {"zero_stage": stage, "gradient_accumulation_steps": grad_accum, "gradient_clipping": 1.0,
              "offload_optimizer_device": "cpu" if offload else "none",
              "offload_param_device": "cpu" if offload == "params" else "none",
              "zero3_init_flag": False, "zero3_save_16bit_model": stage == 3}
        return {**base, "distributed_type": "DEEPSPEED", "deepspeed_config": ds}, "deepspeed"
    # FSDP has no optimizer-only offload: its offload_params moves parameters, gradients and the step to the host
    fsdp = {"fsdp_sharding_strategy": FSDP_SHARDING[strategy], "fsdp_offload_params": bool(offload),
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_use_orig_params": True,  # frozen + trainable mixed
            "fsdp_sync_module_states": True, "fsdp_cpu_ram_efficient_loading": False, "fsdp_version": 1}
    return {**base, "distributed_type": "FSDP", "fsdp_config": fsdp}, "fsdp"


def write_launch_files(job: dict, output_dir: str | Path, *, strategy: str = "ddp", num_processes: int = 2,
                       cpu: bool = False, workdir: str | Path | None = None,
                       deepspeed: bool | None = None) -> LaunchFiles:
    """Write the job JSON and the accelerate config for `strategy`; returns their paths. `deepspeed`: use DeepSpeed
    for the sharded strategies (default: when it is installed)."""
    if num_processes < 1:
        raise AdvisorInputError("num_processes", "must be >= 1")
    output_dir = Path(output_dir)
    directory = Path(workdir) if workdir else output_dir / "launch"
    directory.mkdir(parents=True, exist_ok=True)
    t = job["config"]["training"]
    mixed = "bf16" if t.get("bf16") else "fp16" if t.get("fp16") else "no"
    if cpu and mixed == "fp16":
        mixed = "no"
    config, backend = accelerate_config(strategy, num_processes, mixed_precision=mixed, cpu=cpu,
                                        grad_accum=int(t.get("gradient_accumulation_steps", 1)), deepspeed=deepspeed)
    note = None
    from advisor.estimator.fast import STRATEGIES, STRATEGY_ALIASES

    name = STRATEGY_ALIASES.get(strategy, strategy)
    if backend == "fsdp" and STRATEGIES[name]["offload"] == "optimizer":
        note = (f"{name} keeps only the optimizer state on the CPU, which needs DeepSpeed (not installed): launched "
                "as FSDP FULL_SHARD with offload_params, which also moves the parameters to the CPU: less GPU "
                "memory than estimated, slower steps (pip install deepspeed for the estimated strategy)")
    job = {**job, "strategy": None if strategy == "ddp" else strategy, "num_processes": num_processes}
    job_path = directory / "job.json"
    job_path.write_text(json.dumps(job, indent=2))
    cfg_path = directory / "accelerate_config.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    events = directory / "events"
    events.mkdir(exist_ok=True)
    for old in events.glob("events-rank*.jsonl"):
        old.unlink()
    return LaunchFiles(directory, job_path, cfg_path, output_dir, events, strategy, backend, note)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(files: LaunchFiles, num_processes: int, *, resume: str = "latest", port: int | None = None,
                   python: str | None = None, stop_file: str | Path | None = None) -> list[str]:
    """`accelerate launch --config_file ... --num_processes N -m advisor.train.entry JOB OUTPUT_DIR ...`.

    `stop_file`: creating this file stops the run after the current step with a checkpoint (status cancelled)."""
    cmd = [python or sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(files.accelerate_config), "--num_processes", str(num_processes),
           "--main_process_port", str(port or _free_port()),
           "-m", "advisor.train.entry", str(files.job), str(files.output_dir),
           "--events-dir", str(files.events_dir), "--resume", resume]
    if stop_file is not None:
        cmd += ["--stop-file", str(stop_file)]
    return cmd


def read_events(files: LaunchFiles) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for path in sorted(files.events_dir.glob("events-rank*.jsonl")):
        rank = int(path.stem.removeprefix("events-rank"))
        out[rank] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out
