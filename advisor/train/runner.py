"""The embedded trainer: one explicit loop (setup → fit check → train → evaluate → save) for all 12 methods.

The method is built by the same registry the rules and the estimator use (`advisor.engine.load_base_model`,
`prepare`, `make_optimizer`), so what was estimated is what trains. `accelerate.Accelerator` does device placement,
mixed precision and DDP gradient synchronisation (`no_sync` on accumulation micro-steps), so the same code runs
single-process or under `accelerate launch`.

Losses are token-weighted across the micro-batches of an optimizer step (each micro-batch's mean loss times its
share of the step's label tokens), so halving the micro-batch and doubling accumulation after an OOM computes the
same update.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated`. Elsewhere the first `COUNTED_STEPS` optimizer steps of
each attempt run under the live-bytes counter (`advisor.memory.counter.LiveBytes`, the instrument the CPU
calibration probes use), so the job's measured peak is tensor bytes like the estimate, not the process's RSS
(which is reported beside it); those steps are left out of tokens/s.

Fault injection for tests: ``ADVISOR_INJECT_OOM_AT_STEP=N`` raises a real ``torch.OutOfMemoryError`` while running
optimizer step N (1-based), once per `run_training` call (the first attempt only).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from advisor.engine import training_forward
from advisor.train import checkpoint as ckpt
from advisor.train.data import TrainData, collate, label_tokens, load_dataset, real_tokens, to_device

GIB = 2**30
COUNTED_STEPS = 2  # the first step creates the optimizer state, the second runs with it
INJECT_ENV = "ADVISOR_INJECT_OOM_AT_STEP"


class TrainingRefused(ValueError):
    """The plan cannot fit the device even at micro-batch 1 with gradient checkpointing; `.details` has the numbers."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}


@dataclass
class Plan:
    """What one attempt trains with (changes between attempts after an OOM)."""

    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    resume_from: Path | None = None


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # rows of the current epoch's order already consumed
    tokens_seen: int = 0
    train_seconds: float = 0.0
    # steps run under the live-bytes counter (CPU): slower, so left out of tokens/s
    counted_tokens: int = 0
    counted_seconds: float = 0.0
    last_loss: float | None = None
    eval_loss: float | None = None
    eval_loss_before: float | None = None
    oom_retries: list = field(default_factory=list)


# ============================================================================================ events
class Events:
    """Calls on_event and records every event in metrics.jsonl and TensorBoard (main process only)."""

    def __init__(self, on_event: Callable[[dict], None] | None, output_dir: Path, main: bool):
        self.on_event, self.main = on_event, main
        self.metrics_path = output_dir / "metrics.jsonl"
        self.writer = None
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(output_dir / "runs"))
            except Exception:  # tensorboard missing or unwritable: the metrics file still has everything
                self.writer = None

    def __call__(self, kind: str, **payload) -> dict:
        event = {"type": kind, **payload}
        if not self.main:
            return event
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps({**event, "time": round(time.time(), 3)}, default=_jsonable) + "\n")
        if self.writer is not None:
            step = payload.get("step", 0) or 0
            if kind == "step":
                for key in ("loss", "learning_rate", "tokens_per_s", "peak_memory_gib"):
                    if payload.get(key) is not None:
                        self.writer.add_scalar(f"train/{key}", payload[key], step)
            elif kind == "eval":
                for key in ("eval_loss", "perplexity"):
                    if payload.get(key) is not None:
                        self.writer.add_scalar(f"eval/{key}", payload[key], step)
        if self.on_event is not None:
            self.on_event(json.loads(json.dumps(event, default=_jsonable)))
        return event

    def log(self, message: str) -> None:
        self("log", message=message)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _jsonable(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


# ============================================================================================ entry point
def run_training(
    job: dict,
    *,
    output_dir: str | os.PathLike,
    on_event: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: str | os.PathLike | None = "latest",
    device: str | None = None,
) -> dict:
    """Train `job` (normalize_job's output) into `output_dir`; see advisor/train/__init__.py for the contract."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from advisor.methods import get_method

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    spec = get_method(job["method"])
    cfg = spec.resolve_config(job["config"])
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:  # one process may run many jobs (tests, a worker): a fresh accelerate state each time
        AcceleratorState._reset_state(reset_partial_state=True)
    device_type = _device_type(device)
    notes: list[str] = []
    cfg, mixed = _precision(cfg, device_type, notes)
    accelerator = Accelerator(cpu=device_type == "cpu", mixed_precision=mixed)
    events = Events(on_event, output_dir, accelerator.is_main_process)
    try:
        return _Trainer(job, spec, cfg, accelerator, events, output_dir, should_stop, notes).run(resume)
    finally:
        events.close()
        accelerator.free_memory()


def _device_type(device: str | None) -> str:
    if device:
        return torch.device(device).type
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _precision(cfg, device_type: str, notes: list[str]):
    """(config adjusted for this device, accelerate mixed_precision)."""
    t = cfg.training
    if device_type != "cuda" and t.fp16:
        notes.append(f"fp16 needs a GPU with loss scaling; on {device_type} training runs in float32 instead")
        t = t.model_copy(update={"fp16": False, "torch_dtype": "float32" if t.torch_dtype == "float16" else t.torch_dtype})
    if device_type == "cpu" and t.bf16:
        notes.append("bf16 on CPU: PyTorch's CPU autocast supports it (often slower than float32 on CPUs without AMX)")
    if device_type == "cuda" and t.bf16 and not torch.cuda.is_bf16_supported():
        notes.append("this GPU has no bf16: training in fp16 with loss scaling instead")
        t = t.model_copy(update={"bf16": False, "fp16": True,
                                 "torch_dtype": "float16" if t.torch_dtype == "bfloat16" else t.torch_dtype})
    if t.attn_implementation == "flash_attention_2" and device_type != "cuda":
        notes.append("flash_attention_2 needs CUDA: using sdpa")
        t = t.model_copy(update={"attn_implementation": "sdpa"})
    quant = cfg.quantization
    if quant is not None and quant.load_in_8bit and device_type == "cpu" and (cfg.peft or {}).get("use_dora"):
        from advisor.errors import AdvisorInputError

        # PEFT dequantizes an 8-bit layer for DoRA with `module.weight.to(device)` on CPU, which drops the layer's row
        # scales: the first forward then fails inside bitsandbytes (state.SCB is None)
        raise AdvisorInputError("config.peft.use_dora", "DoRA over an 8-bit base does not train on CPU (PEFT drops "
                                "the int8 layer's row scales there); use a GPU, a 4-bit base or plain LoRA")
    if quant is not None and device_type == "cpu" and quant.bnb_4bit_compute_dtype == "float16":
        notes.append("4-bit compute in float16 is GPU-only: computing in bfloat16 on CPU")
        quant = quant.model_copy(update={"bnb_4bit_compute_dtype": "bfloat16"})
    mixed = "bf16" if t.bf16 else "fp16" if t.fp16 else "no"
    return cfg.model_copy(update={"training": t, "quantization": quant}), mixed


# ============================================================================================ the trainer
class _Trainer:
    def __init__(self, job, spec, cfg, accelerator, events, output_dir, should_stop, notes):
        self.job, self.spec, self.cfg = job, spec, cfg
        self.acc, self.emit, self.out = accelerator, events, output_dir
        self.should_stop = should_stop
        self.notes = notes
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.main = accelerator.is_main_process
        self.device = accelerator.device
        self.inject_at = _int_env(INJECT_ENV)
        self.injected = False
        self._live, self.tensor_peak, self._counted_shape = None, None, {}
        self.backend = str(accelerator.distributed_type).rsplit(".", 1)[-1]  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
        self.sharded = self.backend in ("FSDP", "DEEPSPEED")
        self.initial_checksum = self.final_checksum = None

    # ---------------------------------------------------------------------------- orchestration
    def run(self, resume) -> dict:
        from transformers import AutoTokenizer

        from advisor.catalog.models import resolve_model

        t = self.cfg.training
        self.resolved = resolve_model(self.job["model"])
        source = self.resolved.path or self.resolved.id
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.notes.append("the tokenizer has no pad token: padding with EOS (padding is never in the loss)")
        packing = t.packing
        if packing and self.spec.id in ("prompt_tuning", "prefix_tuning"):
            packing = False
            self.notes.append(f"packing is off for {self.spec.id}: virtual tokens break per-example position ids")
        ds = self.job["dataset"]
        self.data: TrainData = load_dataset(
            ds["path"], ds.get("format", "auto"), self.tokenizer, kind=self.resolved.kind,
            max_seq_length=t.max_seq_length, validation_split=ds.get("validation_split", 0.1), seed=t.seed,
            packing=packing, fixed_rows=self.spec.id == "longlora", max_target_length=t.max_target_length,
        )
        self.notes += self.data.notes

        resume_path = self._resume_path(resume)
        state_at_resume = ckpt.read_trainer_state(resume_path) if resume_path else None
        plan = Plan(
            micro_batch=(state_at_resume or {}).get("micro_batch", t.per_device_train_batch_size),
            grad_accum=(state_at_resume or {}).get("grad_accum", t.gradient_accumulation_steps),
            gradient_checkpointing=(state_at_resume or {}).get("gradient_checkpointing", t.gradient_checkpointing),
            resume_from=resume_path,
        )
        self.effective_rows = plan.micro_batch * plan.grad_accum  # per process, kept across adjustments
        predicted, adjusted = self._fit_check(plan)
        self.predicted = predicted
        self.total_steps = self._total_steps(plan)
        self.oom_retries: list[dict] = list((state_at_resume or {}).get("oom_retries", []))
        self.emit("start", total_steps=self.total_steps, num_train=self.data.num_examples, num_val=len(self.data.val),
                  truncated=self.data.truncated, format=self.data.format, device=str(self.device),
                  micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                  effective_batch=plan.micro_batch * plan.grad_accum * self.world, predicted=predicted,
                  adjusted=adjusted, resumed_from=(state_at_resume or {}).get("step"), packed=self.data.packed,
                  num_rows=len(self.data.train), dropped=self.data.dropped, world_size=self.world,
                  method=self.spec.id, precision=self._precision_label())
        for note in self.notes:
            self.emit.log(note)
        if self.main and not (self.out / "plan.json").exists():
            self._write_plan(plan, predicted, adjusted)

        while True:
            message = None
            try:
                result = self._attempt(plan)
                break
            except torch.OutOfMemoryError as err:
                if plan.micro_batch <= 1:
                    self._release()
                    self.emit.log(f"out of memory at micro-batch 1: giving up ({str(err).splitlines()[0][:200]})")
                    raise
                message = str(err).splitlines()[0][:300]
            # outside the except block: the traceback (and the frames holding the model) is gone
            self._release()
            latest = ckpt.latest_checkpoint(self.out)
            retry = {"step": ckpt.read_trainer_state(latest)["step"] if latest else 0,
                     "micro_batch": plan.micro_batch // 2, "grad_accum": self._retry_accum(plan),
                     "previous_micro_batch": plan.micro_batch, "error": message}
            self.oom_retries.append(retry)
            self.emit("oom_retry", **{k: v for k, v in retry.items() if k != "error"})
            plan = Plan(plan.micro_batch // 2, self._retry_accum(plan), plan.gradient_checkpointing, latest)
        if self.main:
            self._write_plan(plan, predicted, adjusted, result)
        return result

    def _retry_accum(self, plan: Plan) -> int:
        """Accumulation after an OOM halves the micro-batch: doubled, keeping the effective batch, except with the
        optimizer step in backward, which cannot accumulate (the effective batch halves)."""
        return 1 if self.cfg.training.optimizer_in_backward else plan.grad_accum * 2

    def _resume_path(self, resume) -> Path | None:
        if resume is None or resume is False:
            return None
        if resume == "latest":
            return ckpt.latest_checkpoint(self.out)
        p = Path(resume)
        if not (p / "trainer_state.json").is_file():
            from advisor.errors import AdvisorInputError

            raise AdvisorInputError("resume", f"{p} is not a checkpoint directory (no trainer_state.json)")
        return p

    def _total_steps(self, plan: Plan) -> int:
        rows = self._epoch_rows()
        per_epoch = math.ceil(rows / (self.effective_rows * self.world))
        if self.job.get("max_steps"):
            return int(self.job["max_steps"])
        return max(1, math.ceil(self.cfg.training.num_train_epochs * per_epoch))

    def _epoch_rows(self) -> int:
        n = len(self.data.train)
        if self.world > 1:  # every process gets the same number of micro-batches (DistributedSampler's padding)
            unit = self.world
            n = math.ceil(n / unit) * unit
        return n

    def _precision_label(self) -> str:
        t = self.cfg.training
        return f"weights {t.torch_dtype}, compute {'bf16' if t.bf16 else 'fp16' if t.fp16 else 'fp32'}"

    # ---------------------------------------------------------------------------- fit check
    def _fit_check(self, plan: Plan) -> tuple[dict | None, dict | None]:
        """Estimate this plan on the device present; adjust micro-batch/accumulation or refuse."""
        if not self.job.get("estimate", True):
            return None, None
        try:
            est, mm, plan_obj = self._estimate(plan.micro_batch, plan.gradient_checkpointing)
        except Exception as err:  # the estimator never fails a job
            self.notes.append(f"estimator could not handle this plan ({type(err).__name__}: {str(err)[:200]}); "
                              "training without a prediction")
            return None, None
        memory_gib = plan_obj.hardware.memory_gib if self.device.type == "cuda" else None
        device_name = plan_obj.hardware.name
        limit = self.job.get("memory_limit_gib")
        if limit is not None and (memory_gib is None or limit < memory_gib):
            memory_gib, device_name = float(limit), f"{device_name} limited to {limit:g} GiB (memory_limit_gib)"
        if memory_gib is None:
            self.notes.append(f"fit is not judged on {self.device.type}: the estimate is recorded for comparison only")
            return est, None
        memory = memory_gib * GIB
        # a paged optimizer's state pages to CPU RAM when the GPU is full: it does not have to fit
        if est["peak_bytes"] - est.get("paged_optimizer_gib", 0.0) * GIB <= memory:
            return est, None
        strategy = self.job.get("strategy") or "ddp"
        old = {"micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
               "gradient_checkpointing": plan.gradient_checkpointing}
        best = mm.max_micro_batch(memory, strategy, self.world)
        if best < 1 and not plan.gradient_checkpointing and self.spec.id != "prefix_tuning":
            est2, mm2, _ = self._estimate(1, True)
            best2 = mm2.max_micro_batch(memory, strategy, self.world)
            if best2 >= 1:
                plan.gradient_checkpointing = True
            est, mm, best = est2, mm2, best2  # refused or not, the numbers are those with checkpointing
        if best < 1:
            peak1 = mm.fit_bytes(1, strategy, self.world)[1]
            details = {"peak_gib_at_micro_batch_1": round(peak1 / GIB, 3), "device_memory_gib": memory_gib,
                       "device": device_name, "gradient_checkpointing": plan.gradient_checkpointing or
                       self.spec.id != "prefix_tuning", "method": self.spec.id, "model": self.job["model"],
                       "seq_len": plan_obj.seq_len, "breakdown_gib": est.get("breakdown_gib")}
            raise TrainingRefused(
                f"{self.spec.id} on {self.resolved.id} does not fit {device_name}: it needs "
                f"{peak1 / GIB:.2f} GiB at micro-batch 1 with gradient checkpointing "
                f"(sequence {plan_obj.seq_len} tokens); the device has {memory_gib:.2f} GiB usable. "
                "Use a smaller model, a shorter max_seq_length, or qlora.", details)
        # the largest micro-batch that fits and divides the effective batch, so the effective batch is unchanged
        micro = max(d for d in range(1, min(best, plan.micro_batch) + 1) if self.effective_rows % d == 0)
        accum = self.effective_rows // micro
        if self.cfg.training.optimizer_in_backward:  # nothing to accumulate: the effective batch shrinks instead
            micro, accum = min(best, plan.micro_batch), 1
        plan.micro_batch, plan.grad_accum = micro, accum
        est, _, _ = self._estimate(micro, plan.gradient_checkpointing)
        adjusted = {"reason": f"the plan needs {old['micro_batch']} rows per micro-batch; the estimator allows at most "
                              f"{best} on {device_name} ({memory_gib:.3g} GiB)",
                    "from": old, "to": {"micro_batch": micro, "grad_accum": accum,
                                        "gradient_checkpointing": plan.gradient_checkpointing},
                    "effective_batch_before": old["micro_batch"] * old["grad_accum"],
                    "effective_batch_after": micro * accum}
        return est, adjusted

    def _estimate(self, micro: int, checkpointing: bool, seq_len: int | None = None):
        from advisor.estimator.fast import estimate_plan, memory_model
        from advisor.estimator.plan import build_plan
        from advisor.schemas import EstimateRequest

        config = self.cfg.model_dump(mode="json")
        config["training"].update(per_device_train_batch_size=micro, gradient_checkpointing=checkpointing)
        if seq_len is not None:
            config["training"]["max_seq_length"] = int(seq_len)
        lengths = [len(r.input_ids) for r in self.data.train]
        if self.resolved.kind == "seq2seq":  # the decoder runs over the longest target, not the source length
            config["training"]["max_target_length"] = max(len(r.labels) for r in self.data.train)
        dataset = {"num_examples": max(1, len(self.data.train)), "avg_tokens": sum(lengths) / len(lengths),
                   "max_tokens": max(lengths)}
        hardware = {"gpu": "auto"} if self.device.type == "cuda" else {"gpu": "none"}
        req = EstimateRequest.model_validate({"model": self.job["model"], "hardware": hardware,
                                              "method": self.spec.id, "config": config, "dataset": dataset})
        plan = build_plan(req)
        plan.hardware.count = self.world
        mm = memory_model(plan)
        return estimate_plan(plan, strategy=self.job.get("strategy"), mm=mm), mm, plan

    # ---------------------------------------------------------------------------- one attempt
    def _build(self, plan: Plan):
        from transformers import get_scheduler

        from advisor.engine import load_base_model, make_optimizer, prepare

        t = self.cfg.training.model_copy(update={"gradient_checkpointing": plan.gradient_checkpointing,
                                                 "per_device_train_batch_size": plan.micro_batch,
                                                 "gradient_accumulation_steps": plan.grad_accum})
        cfg = self.cfg.model_copy(update={"training": t})
        torch.manual_seed(t.seed)
        model = load_base_model(self.resolved, cfg, on_meta=False, device=self.device)
        prepared = prepare(model, self.resolved, cfg, on_meta=False, total_steps=self.total_steps)
        for note in prepared.notes:
            self.emit.log(note)
        if t.fp16:  # loss scaling cannot unscale fp16 gradients: keep trainable tensors in fp32
            for p in prepared.trainable_parameters():
                if p.dtype == torch.float16:
                    p.data = p.data.float()
        from advisor.engine import check_optimizer_in_backward

        check_optimizer_in_backward(t, self.spec.id, self.world)
        optimizer = make_optimizer(prepared, t)
        warmup = math.ceil(t.warmup_ratio * self.total_steps)
        scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=self.total_steps)
        if self.backend == "DEEPSPEED":  # no DataLoader goes through prepare: tell DeepSpeed the micro-batch
            ds = self.acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = plan.micro_batch
            ds["gradient_accumulation_steps"] = 1  # accumulation is this loop's (no_sync on micro-steps)
        model_p, optimizer_p = self.acc.prepare(prepared.model, optimizer)
        return prepared, model_p, optimizer_p, scheduler

    def _release(self) -> None:
        self._close_counter()
        for name in ("_model", "_optimizer", "_prepared", "_scheduler"):
            if hasattr(self, name):
                delattr(self, name)
        self.acc.free_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _attempt(self, plan: Plan) -> dict:
        prepared, model, optimizer, scheduler = self._build(plan)
        self._prepared, self._model, self._optimizer, self._scheduler = prepared, model, optimizer, scheduler
        inner = self.acc.unwrap_model(model)
        st = RunState(oom_retries=self.oom_retries)
        if plan.resume_from is not None:
            if self.sharded:  # model/optimizer shards written by accelerate's save_state
                self.acc.load_state(str(plan.resume_from / "accelerate_state"))
                scheduler.load_state_dict(torch.load(plan.resume_from / "scheduler.pt", weights_only=False))
                saved = ckpt.read_trainer_state(plan.resume_from)
            else:
                saved = ckpt.load_checkpoint(plan.resume_from, model=inner, optimizer=optimizer, scheduler=scheduler,
                                             prepared=prepared, rank=self.rank)
            st.step, st.epoch, st.position = saved["step"], saved["epoch_index"], saved["position"]
            st.tokens_seen, st.train_seconds = saved.get("tokens_seen", 0), saved.get("train_seconds", 0.0)
            st.last_loss, st.eval_loss_before = saved.get("loss"), saved.get("eval_loss_before")
            if saved.get("total_steps") and saved["total_steps"] != self.total_steps:
                self.emit.log(f"checkpoint planned {saved['total_steps']} steps; this run plans {self.total_steps}")
            self.emit.log(f"resumed from {plan.resume_from.name} (step {st.step})")
        else:
            st.eval_loss_before = self._evaluate(model)
            if st.eval_loss_before is not None:
                self.emit("eval", step=0, eval_loss=st.eval_loss_before, perplexity=_ppl(st.eval_loss_before))
        if torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.world > 1:
            self.initial_checksum = _checksum(self._trainable_tensors(model))
        if plan.resume_from is not None:
            ckpt.restore_rng(plan.resume_from, self.rank)
        return self._loop(plan, st, prepared, model, optimizer, scheduler)

    # ---------------------------------------------------------------------------- the loop
    def _order(self, epoch: int) -> list[int]:
        n = len(self.data.train)
        g = torch.Generator().manual_seed(self.cfg.training.seed * 1000 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        total = self._epoch_rows()
        return order + order[: total - n]

    def _loop(self, plan: Plan, st: RunState, prepared, model, optimizer, scheduler) -> dict:
        t = self.cfg.training
        rows_per_step = plan.micro_batch * plan.grad_accum * self.world
        trainable = prepared.trainable_parameters()
        pad_id = self.tokenizer.pad_token_id
        session_start, session_steps = time.perf_counter(), 0
        status = "succeeded"
        while st.step < self.total_steps:
            order = self._order(st.epoch)
            while st.position < len(order) and st.step < self.total_steps:
                chunk = order[st.position: st.position + rows_per_step]
                micro = [chunk[(j * self.world + self.rank) * plan.micro_batch:
                               (j * self.world + self.rank + 1) * plan.micro_batch] for j in range(plan.grad_accum)]
                micro = [m for m in micro if m]
                counter = self._counter(prepared, optimizer, session_steps)
                t0 = time.perf_counter()
                loss, tokens = self._step(st.step + 1, micro, prepared, model, optimizer, scheduler, trainable, pad_id,
                                          counter)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                if counter is not None:
                    st.counted_tokens += tokens
                    st.counted_seconds += dt
                st.step += 1
                st.position += len(chunk)
                st.tokens_seen += tokens
                st.train_seconds += dt
                st.last_loss = loss
                session_steps += 1
                epoch_float = st.epoch + st.position / len(order)
                if st.position >= len(order):
                    st.epoch, st.position = st.epoch + 1, 0
                elapsed = time.perf_counter() - session_start
                self.emit("step", step=st.step, total_steps=self.total_steps, epoch=round(epoch_float, 4), loss=loss,
                          learning_rate=scheduler.get_last_lr()[0], tokens_per_s=round(tokens * self.world / dt, 1),
                          peak_memory_gib=round(self._peak_bytes() / GIB, 4),
                          eta_s=round(elapsed / session_steps * (self.total_steps - st.step), 1))
                last = st.step >= self.total_steps
                if st.step % t.eval_steps == 0 and not last:
                    self._eval_event(model, st)
                stop = self._stop_requested() and not last
                if stop or (st.step % t.save_steps == 0 and not last):
                    self._checkpoint(plan, st, prepared, model, optimizer, scheduler)
                if stop:
                    status = "cancelled"
                    break
            if status == "cancelled":
                break
        self._close_counter()
        if status == "succeeded":
            self._eval_event(model, st)
            from advisor.train.artifacts import save_outputs

            state_dict = self.acc.get_state_dict(model) if self.sharded else None  # collective: every rank
            if self.main:
                inner = self.acc.unwrap_model(model)
                save_outputs(inner, prepared, self.spec, self.cfg, self.job, self.out, self.tokenizer,
                             state_dict=state_dict)
            self.acc.wait_for_everyone()
        self.final_checksum = _checksum(self._trainable_tensors(model)) if self.world > 1 else None
        return self._result(status, st, plan)

    # ---------------------------------------------------------------------------- tensor peak off CUDA
    def _counter(self, prepared, optimizer, session_steps: int):
        """The live-bytes counter for this step, or None: off CUDA, single process, the first COUNTED_STEPS steps
        of an attempt (the model, optimizer and their state registered once)."""
        if self.device.type == "cuda" or self.world > 1 or session_steps >= COUNTED_STEPS:
            self._close_counter()
            return None
        if getattr(self, "_live", None) is None:
            from advisor.memory.counter import LiveBytes

            self._live = LiveBytes()
            self._live.register_model(self.acc.unwrap_model(prepared.model))
            self._live.register_optimizer(optimizer)
        return self._live

    def _close_counter(self) -> None:
        live = getattr(self, "_live", None)
        if live is not None:
            live.close()
            report = live.report()
            if report.peak_bytes > (self.tensor_peak or {}).get("peak_bytes", 0):
                self.tensor_peak = {"peak_bytes": report.peak_bytes, "peak_phase": report.peak_phase,
                                    "breakdown_bytes": dict(report.breakdown_at_peak), **self._counted_shape}
            self._live = None

    def _step(self, step_no, micro, prepared, model, optimizer, scheduler, trainable, pad_id,
              counter=None) -> tuple[float, int]:
        """One optimizer step over the micro-batches; returns (token-weighted loss, real tokens). With a live-bytes
        `counter` the step runs under it, phase by phase."""
        if counter is None:
            return self._step_inner(step_no, micro, prepared, model, optimizer, scheduler, trainable, pad_id, None)
        with counter:
            return self._step_inner(step_no, micro, prepared, model, optimizer, scheduler, trainable, pad_id, counter)

    def _step_inner(self, step_no, micro, prepared, model, optimizer, scheduler, trainable, pad_id,
                    counter) -> tuple[float, int]:
        phase = counter.phase if counter is not None else (lambda _name: contextlib.nullcontext())
        t = self.cfg.training
        model.train()
        batches = [collate([self.data.train[i] for i in idx], pad_id, self.data.kind) for idx in micro]
        n_label = sum(label_tokens(b) for b in batches)
        tokens = sum(real_tokens([self.data.train[i] for i in idx]) for idx in micro)
        if self.inject_at is not None and step_no == self.inject_at and not self.injected:
            self.injected = True
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {INJECT_ENV}={self.inject_at} at step {step_no})")
        total = torch.zeros((), device=self.device)
        for j, batch in enumerate(batches):
            batch = to_device(batch, self.device)
            if counter is not None:
                counter.register_batch(batch)
                shape = self._counted_shape
                shape["micro_batch"] = max(shape.get("micro_batch", 0), int(batch["input_ids"].shape[0]))
                shape["seq_len"] = max(shape.get("seq_len", 0), int(batch["input_ids"].shape[-1]))
            share = label_tokens(batch) / max(n_label, 1)
            sync = contextlib.nullcontext() if j == len(batches) - 1 else self.acc.no_sync(model)
            with sync:
                with phase("forward"), training_forward(self.acc.unwrap_model(model)):
                    out = model(**batch, **prepared.forward_kwargs)
                    loss = out.loss.float() * share
                    # the outputs go before backward: under mixed precision accelerate returns an fp32 copy of the
                    # logits (4 bytes × tokens × vocabulary) that backward does not need
                    del out
                    extra = prepared.extra_loss() if prepared.extra_loss else None
                    objective = loss + extra / len(batches) if extra is not None else loss
                with phase("backward"):
                    self.acc.backward(objective)
            total += loss.detach()
            del loss, objective
        with phase("optimizer"):
            if t.max_grad_norm:
                self.acc.clip_grad_norm_(trainable, t.max_grad_norm)
            optimizer.step()
            if prepared.after_optimizer_step is not None:
                prepared.after_optimizer_step(step_no - 1)
            if not getattr(optimizer, "step_was_skipped", False):
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            total = self.acc.reduce(total, reduction="mean")
        return float(total), tokens

    def _trainable_tensors(self, model) -> dict[str, torch.Tensor]:
        if self.sharded:
            full = self.acc.get_state_dict(model)
            names = {n for n, p in self.acc.unwrap_model(model).named_parameters() if p.requires_grad}
            return {k: v for k, v in (full or {}).items() if k in names}
        return ckpt.trainable_state(self.acc.unwrap_model(model))

    def _stop_requested(self) -> bool:
        flag = bool(self.should_stop()) if (self.should_stop is not None and self.main) else False
        if self.world > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            flag = float(self.acc.reduce(t, reduction="sum")) > 0
        return flag

    def _peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB

    # ---------------------------------------------------------------------------- eval, checkpoints, results
    @torch.no_grad()
    def _evaluate(self, model) -> float | None:
        if not self.data.val:
            return None
        model.eval()
        pad_id = self.tokenizer.pad_token_id
        b = max(1, self.cfg.training.per_device_train_batch_size)
        rows = self.data.val[self.rank::self.world]
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        count = torch.zeros((), device=self.device, dtype=torch.float64)
        for i in range(0, len(rows), b):
            batch = to_device(collate(rows[i:i + b], pad_id, self.data.kind), self.device)
            loss, n = _eval_loss_sum(model, batch, self.data.kind)
            loss_sum += loss
            count += n
        if self.world > 1:
            loss_sum, count = self.acc.reduce(loss_sum, "sum"), self.acc.reduce(count, "sum")
        model.train()
        return float(loss_sum / count) if float(count) > 0 else None

    def _eval_event(self, model, st: RunState) -> None:
        st.eval_loss = self._evaluate(model)
        if st.eval_loss is not None:
            self.emit("eval", step=st.step, eval_loss=st.eval_loss, perplexity=_ppl(st.eval_loss))

    def _checkpoint(self, plan, st: RunState, prepared, model, optimizer, scheduler) -> None:
        state = {"step": st.step, "total_steps": self.total_steps, "epoch_index": st.epoch, "position": st.position,
                 "epoch": round(st.epoch + st.position / max(1, self._epoch_rows()), 4),
                 "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
                 "gradient_checkpointing": plan.gradient_checkpointing, "world_size": self.world,
                 "tokens_seen": st.tokens_seen, "train_seconds": st.train_seconds, "loss": st.last_loss,
                 "eval_loss_before": st.eval_loss_before, "oom_retries": self.oom_retries,
                 "method": self.spec.id, "seed": self.cfg.training.seed}
        path = self.out / f"checkpoint-{st.step}"
        if self.sharded:  # every process writes its shard through accelerate, then rank 0 adds our files
            self.acc.save_state(str(path / "accelerate_state"))
            if self.main:
                torch.save(scheduler.state_dict(), path / "scheduler.pt")
                torch.save(ckpt.rng_state(), path / "rng_state_0.pt")
                (path / "trainer_state.json").write_text(json.dumps(state, indent=2))
                ckpt.prune(self.out, int(self.job.get("save_total_limit") or 2))
        elif self.main:
            path = ckpt.save_checkpoint(self.out, st.step, model=self.acc.unwrap_model(model), optimizer=optimizer,
                                        scheduler=scheduler, prepared=prepared, trainer_state=state,
                                        keep=int(self.job.get("save_total_limit") or 2))
        self.acc.wait_for_everyone()
        if self.rank != 0:
            ckpt.save_rank_rng(path, self.rank)
        self.acc.wait_for_everyone()
        self.emit("checkpoint", step=st.step, path=str(path))

    def _result(self, status: str, st: RunState, plan: Plan) -> dict:
        rss = None if self.device.type == "cuda" else self._peak_bytes()
        peak = self.tensor_peak["peak_bytes"] if self.tensor_peak else self._peak_bytes()
        kind = ("cuda_max_allocated" if self.device.type == "cuda"
                else "tensor_live_bytes" if self.tensor_peak else "process_max_rss")
        timed_tokens, timed_seconds = st.tokens_seen - st.counted_tokens, st.train_seconds - st.counted_seconds
        if timed_tokens <= 0 or timed_seconds <= 0:  # every step was counted: the slower figure is all there is
            timed_tokens, timed_seconds = st.tokens_seen, st.train_seconds
        tps = timed_tokens * self.world / timed_seconds if timed_seconds else None
        metrics = {
            "loss": st.last_loss,
            "eval_loss": st.eval_loss if status == "succeeded" else None,
            "perplexity": _ppl(st.eval_loss) if status == "succeeded" else None,
            "eval_loss_before": st.eval_loss_before,
            "perplexity_before": _ppl(st.eval_loss_before),
            "tokens_per_s": round(tps, 1) if tps else None,
            "peak_memory_gib": round(peak / GIB, 4),
            "train_seconds": round(st.train_seconds, 3),
            "train_tokens": st.tokens_seen,
        }
        measured = {"peak_memory_bytes": peak, "peak_memory_kind": kind, "tokens_per_s": metrics["tokens_per_s"],
                    "device": str(self.device), "device_name": _device_name(self.device),
                    "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum, "world_size": self.world}
        if self.device.type == "cuda":  # what calibrate --from-jobs fits: the allocator's reserve + the context
            from advisor.memory.counter import cuda_memory_stats

            stats = cuda_memory_stats(self.device) or {}
            measured.update(cuda_max_reserved_bytes=stats.get("max_reserved_bytes"),
                            cuda_context_bytes=stats.get("context_bytes"))
        if rss is not None:
            metrics["process_rss_gib"] = round(rss / GIB, 4)
            measured["process_max_rss_bytes"] = rss
        if self.tensor_peak:
            measured.update(tensor_peak=self.tensor_peak, counted_steps=COUNTED_STEPS,
                            predicted_at_measured_shape=self._predict_at(self.tensor_peak, plan))
        return {
            "status": status,
            "step": st.step,
            "total_steps": self.total_steps,
            "output_dir": str(self.out),
            "metrics": metrics,
            "predicted": self.predicted,
            "measured": measured,
            "oom_retries": self.oom_retries,
            "truncated": self.data.truncated,
            "distributed": None if self.world == 1 else {
                "rank": self.rank, "world_size": self.world, "backend": self.backend,
                "initial_checksum": self.initial_checksum, "trainable_checksum": self.final_checksum},
        }

    def _predict_at(self, shape: dict, plan: Plan) -> dict | None:
        """The estimate at the shape the counted steps actually had (micro-batch × the longest padded row): the
        prediction at the plan's longest example would compare a peak that these steps never reached."""
        if not self.job.get("estimate", True) or not shape.get("seq_len"):
            return None
        try:
            est, _, _ = self._estimate(shape["micro_batch"], plan.gradient_checkpointing, seq_len=shape["seq_len"])
        except Exception as err:  # the comparison is informative; it never fails a job
            return {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        return {"peak_bytes": est["peak_bytes"], "peak_vram_gib": est["peak_vram_gib"],
                "micro_batch": shape["micro_batch"], "seq_len": shape["seq_len"]}

    def _write_plan(self, plan: Plan, predicted, adjusted, result: dict | None = None) -> None:
        doc = {"job": self.job, "config": self.cfg.model_dump(mode="json"), "method": self.spec.id,
               "model": self.job["model"], "kind": self.resolved.kind, "format": self.data.format,
               "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
               "gradient_checkpointing": plan.gradient_checkpointing, "total_steps": self.total_steps,
               "world_size": self.world, "predicted": predicted, "adjusted": adjusted, "packed": self.data.packed,
               "oom_retries": self.oom_retries}
        if result is not None:
            doc["result"] = result
        tmp = self.out / "plan.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2, default=_jsonable))
        tmp.replace(self.out / "plan.json")


def _eval_loss_sum(model, batch: dict, kind: str) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label tokens, from the logits: the language-model loss alone (AdaLoRA
    adds its orthogonality penalty to `outputs.loss`, MoLoRA its balance loss to the objective)."""
    labels = batch["labels"]
    if kind == "seq2seq":
        logits = model(**batch).logits
        target = labels
    else:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        extra = logits.shape[1] - labels.shape[1]  # prompt tuning prepends virtual-token positions
        logits = logits[:, extra:-1] if extra > 0 else logits[:, :-1]
        target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss.double(), int((target != -100).sum())


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the trainable tensors' names and bytes (identical replicas give identical sums)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _ppl(loss: float | None) -> float | None:
    if loss is None:
        return None
    return float(math.exp(min(loss, 700.0)))


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"
