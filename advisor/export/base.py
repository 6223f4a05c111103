"""What every export starts from: the recommendation narrowed to one method, resolved against the model.

    ctx = build_context(recommendation, fmt, method=None, dataset=None, ...)

`ExportContext` holds the method's validated config (the method registry re-validates what the recommendation
carries), the estimate, the model reference a training tool can load (hub id or local directory), the model's
architecture facts the tools need (kind, model_type, decoder layer class, target module names that exist in it),
the multi-GPU strategy the estimator chose, the dataset (path and format), and the "why" of each knob: the rule
that set it (the recommendation's `config_sources`), else the method's seed citation (methods/defaults.yaml),
else the estimator when the recommender changed a default to make the run fit.

Formats register once (`register_format`); each declares the tool, the methods it can express and why not the
others, and a `render(ctx) -> Rendered`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.errors import AdvisorInputError

DATA_FORMATS = ("alpaca", "chat", "completion", "text")
PLACEHOLDER_DATA = "data/train.jsonl"
DEFAULT_VAL_SPLIT = 0.1


# ------------------------------------------------------------------------------------------- the registry
@dataclass
class Rendered:
    content: str
    files: dict[str, str] = field(default_factory=dict)  # companion files (name -> content), e.g. dataset_info.json
    command: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExportFormat:
    id: str
    tool: str  # the tool's name, as users know it
    filename: str  # default file name
    methods: tuple[str, ...]  # methods the tool can express
    refusals: dict[str, str]  # method -> why the tool cannot express it
    render: Callable[[ExportContext], Rendered]
    kinds: tuple[str, ...] = ("causal_lm",)  # model kinds the tool trains
    kind_refusal: str = ""
    summary: str = ""

    def check_method(self, method: str, available: list[str]) -> None:
        """Refuse a method the tool cannot express, naming the tool, the method and what it supports."""
        if method in self.methods:
            return
        why = self.refusals.get(method, f"{self.tool} has no equivalent of {method}")
        others = [f.id for f in all_formats() if method in f.methods and f.id != self.id]
        raise AdvisorInputError(
            "method",
            f"{self.tool} cannot express method {method!r} ({why}); formats that can: {', '.join(others) or 'none'}; "
            f"alternatives in this recommendation (--method): {', '.join(available)}; methods {self.tool} can express "
            "are listed as allowed",
            allowed=list(self.methods),
        )

    def check_kind(self, ctx: ExportContext) -> None:
        if ctx.kind not in self.kinds:
            raise AdvisorInputError(
                "model", f"{self.tool} cannot train {ctx.model_id} ({ctx.kind}): {self.kind_refusal}",
                allowed=list(self.kinds))


_FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> ExportFormat:
    if not re.match(r"^[a-z][a-z0-9_]*$", fmt.id):
        raise ValueError(f"bad export format id {fmt.id!r}")
    if fmt.id in _FORMATS:
        raise ValueError(f"export format {fmt.id!r} is already registered")
    _FORMATS[fmt.id] = fmt
    return fmt


def all_formats() -> list[ExportFormat]:
    return list(_FORMATS.values())


def get_format(name: str | None) -> ExportFormat:
    key = (name or "").strip().lower()
    if key not in _FORMATS:
        raise AdvisorInputError("format", f"unknown export format {name!r}", allowed=list(_FORMATS))
    return _FORMATS[key]


# ------------------------------------------------------------------------------------------- the context
@dataclass
class ExportContext:
    format: str
    method: str
    chosen: bool  # the recommended method (False: an alternative)
    config: Any  # advisor.config.MethodConfig, validated by the method registry
    spec: Any  # advisor.methods.MethodSpec
    estimate: dict
    model_ref: str  # what a tool loads: hub id or local directory
    model_id: str
    kind: str  # causal_lm | seq2seq
    model_type: str
    layer_class: str | None  # the decoder block class (FSDP wrapping), from the model class' _no_split_modules
    targets: Any  # target module names resolved for this architecture (list, "all-linear" or None)
    ia3_feedforward: list[str] | None
    gpu_name: str | None
    gpu_count: int
    strategy: str  # single | ddp | zero2 | zero3 | zero2_offload | zero3_offload
    dataset_path: str
    dataset_format: str
    dataset_given: bool
    num_examples: int | None
    val_split: float
    output_dir: str
    reasons: list[dict]
    why_not_first: str | None
    sources: dict[str, dict]  # knob -> {"rule", "source"} from the recommendation (chosen method only)
    available_methods: list[str]
    notes: list[str] = field(default_factory=list)
    filename: str = ""
    companion_dir: str | None = None  # where companion files (dataset_info.json) are written beside the export
    backend: str = "auto"  # accelerate: auto | fsdp | deepspeed

    # ---- convenience ------------------------------------------------------------------------------
    @property
    def training(self):
        return self.config.training

    @property
    def peft(self) -> dict:
        return dict(self.config.peft)

    @property
    def quantization(self):
        return self.config.quantization

    @property
    def multi_gpu(self) -> bool:
        return self.gpu_count > 1

    @property
    def precision(self) -> str:
        t = self.training
        return "bf16" if t.bf16 else "fp16" if t.fp16 else "no"

    def total_steps(self) -> int | None:
        """Optimizer steps of the whole run: the estimate's, else from the dataset size."""
        steps = self.estimate.get("total_steps")
        if isinstance(steps, int) and steps > 0:
            return steps
        if not self.num_examples:
            return None
        t = self.training
        per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * max(1, self.gpu_count)
        train_rows = max(1, int(self.num_examples * (1 - self.val_split)))
        return max(1, math.ceil(train_rows / per_step)) * math.ceil(t.num_train_epochs)

    def warmup_steps(self) -> int | None:
        steps = self.total_steps()
        return None if steps is None else max(0, round(self.training.warmup_ratio * steps))

    # ---- "why" comments ---------------------------------------------------------------------------
    def why(self, knob: str, value: Any = None) -> str | None:
        """A short reason for a knob's value: the rule that set it, the seed default's source, or the estimator."""
        src = self.sources.get(knob)
        if src and (value is None or _same(src.get("value"), value)):
            return f"{src.get('rule')} ({short_source(src.get('source', ''))})"
        t = self.training
        est = self.estimate
        steps_src = self.sources.get("warmup_steps")
        if knob == "warmup_ratio" and steps_src and self.total_steps():
            return (f"{steps_src.get('value')} warmup steps of {self.total_steps()}: {steps_src.get('rule')} "
                    f"({short_source(steps_src.get('source', ''))})")
        if knob == "per_device_train_batch_size":
            seed = self.spec.default_training().get(knob)
            mmb = est.get("max_micro_batch")
            if seed is not None and seed != t.per_device_train_batch_size:
                return f"estimator: the seeds' {seed} lowered to fit{f' (max {mmb})' if mmb else ''}"
            if mmb:
                return f"fits: largest micro-batch that fits is {mmb} (estimator)"
        if knob == "gradient_accumulation_steps":
            eff = t.per_device_train_batch_size * t.gradient_accumulation_steps * max(1, self.gpu_count)
            return f"effective batch {eff}" + (f" over {self.gpu_count} GPUs" if self.multi_gpu else "")
        if knob == "gradient_checkpointing":
            return ("on: needed to fit (estimator)" if t.gradient_checkpointing
                    else "off: fits without recomputation (estimator)")
        if knob == "max_seq_length":
            return "longest example, capped at the model's positions" if est.get("seq_len") else None
        if knob == "bf16":
            return "bfloat16 mixed precision" if t.bf16 else None
        if knob == "fp16":
            return f"fp16 with loss scaling: {self.gpu_name or 'this GPU'} has no bfloat16" if t.fp16 else None
        cite = self.spec.citations().get(knob)
        default = {**self.spec.default_peft(), **self.spec.default_training()}.get(knob)
        if cite and (value is None or default is None or _same(default, value)):
            short = short_source(cite)
            return f"from {short}" if short.startswith("seed ") else short
        return None

    def header_lines(self, tool_line: str, run: list[str]) -> list[str]:
        """The comment header every format starts with: provenance, the command, the estimate, why this method."""
        est = self.estimate
        which = "recommended" if self.chosen else "alternative"
        hw = f"{self.gpu_count}× {self.gpu_name}" if self.gpu_name else "no GPU given"
        lines = [tool_line, "Exported by the fine-tuning advisor (advisor export); edit freely.", ""]
        lines += ["Run:"] + [f"  {c}" for c in run] + [""]
        lines.append(f"Model {self.model_id} · method {self.method} ({which}) · {hw}"
                     + (f" · {self.strategy}" if self.multi_gpu else ""))
        if est.get("peak_vram_gib") is not None:
            part = f"Estimate: peak {est['peak_vram_gib']:.1f} GiB per GPU"
            hwd = est.get("hardware") or {}
            if hwd.get("usable_memory_gib"):
                part += f" of {hwd['usable_memory_gib']:.1f} GiB usable"
            if est.get("train_hours") is not None:
                part += f", ~{est['train_hours']:.2f} h"
            if est.get("cost_usd") is not None:
                part += f", ${est['cost_usd']:,.2f}"
            lines.append(part + " (advisor estimator)")
        if not self.chosen and self.why_not_first:
            lines.append(f"Not the first choice: {self.why_not_first}")
        if self.reasons:
            lines.append(f"Why {self.method}:")
            for r in self.reasons[:6]:
                lines.append(f"  - {r.get('says', '')} [{short_source(r.get('source', ''))}]")
        if not self.dataset_given:
            lines.append(f"Dataset: {self.dataset_path} is a placeholder; pass --dataset to export with your file.")
        for n in self.notes:
            lines.append(f"Note: {n}")
        return lines


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def short_source(source: str) -> str:
    """'000_369b0fe7524e8611.txt § A > B' -> 'seed 000 § A > B'; other sources unchanged (trimmed)."""
    m = re.match(r"^(\d{3})_[0-9a-f]{16}\.txt\s*§\s*(.*)$", source or "")
    text = f"seed {m.group(1)} § {m.group(2)}" if m else (source or "")
    return text if len(text) <= 110 else text[:107] + "..."


# ------------------------------------------------------------------------------------------- building it
def load_recommendation(data: Any, field: str = "recommendation") -> dict:
    if not isinstance(data, dict):
        raise AdvisorInputError(field, f"expected a Recommendation JSON object, got {type(data).__name__}")
    if "decision" not in data:
        raise AdvisorInputError(f"{field}.decision", "required (a Recommendation from advisor recommend --json)")
    if data["decision"] != "fine_tune":
        raise AdvisorInputError(
            f"{field}.decision",
            f"the recommendation is {data['decision']!r}, not fine-tuning: there is no training config to export",
            allowed=["fine_tune"],
        )
    if not data.get("method") or not isinstance(data.get("config"), dict):
        raise AdvisorInputError(f"{field}.config", "a fine_tune recommendation needs method and config")
    return data


def select_method(rec: dict, method: str | None) -> tuple[str, dict, dict, bool, str | None]:
    """(method, config, estimate, chosen, why_not_first) for the recommended method or one of its alternatives."""
    chosen = rec["method"]
    available = [chosen] + [a.get("method") for a in rec.get("alternatives") or [] if isinstance(a, dict)]
    if method is None or method.strip().lower() == chosen:
        return chosen, rec["config"], rec.get("estimate") or {}, True, None
    want = method.strip().lower()
    for alt in rec.get("alternatives") or []:
        if isinstance(alt, dict) and alt.get("method") == want:
            if not isinstance(alt.get("config"), dict):
                raise AdvisorInputError("method", f"alternative {want!r} carries no config")
            return want, alt["config"], alt.get("estimate") or {}, False, alt.get("why_not_first")
    raise AdvisorInputError("method", f"{method!r} is neither the recommended method nor one of its alternatives",
                            allowed=available)


def detect_data_format(path: str | Path, field: str = "dataset") -> str:
    """The format of a JSONL/JSON file from its first row's fields."""
    p = Path(path)
    try:
        with p.open(encoding="utf-8") as f:
            head = f.read(1 << 20)
    except OSError as err:
        raise AdvisorInputError(field, f"cannot read {str(p)!r}: {err.strerror or err}") from None
    row = None
    text = head.lstrip()
    try:
        if text.startswith("["):
            rows = json.loads(text if len(head) < (1 << 20) else p.read_text(encoding="utf-8"))
            row = rows[0] if rows else None
        else:
            first = text.splitlines()[0] if text else ""
            row = json.loads(first) if first else None
    except (ValueError, IndexError):
        raise AdvisorInputError(field, f"{p.name}: the first row is not JSON (expected JSONL or a JSON list)") from None
    if not isinstance(row, dict):
        raise AdvisorInputError(field, f"{p.name}: the first row is not a JSON object")
    return format_of_row(row, field)


def format_of_row(row: dict, field: str = "dataset") -> str:
    keys = set(row)
    if "messages" in keys:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "completion"
    if "text" in keys:
        return "text"
    raise AdvisorInputError(
        field, f"cannot tell the data format from the first row's fields {sorted(keys)}; expected alpaca "
               "(instruction/input/output), chat (messages), completion (prompt/completion) or text",
        allowed=list(DATA_FORMATS))


def resolve_dataset(rec: dict, dataset: Any, *, read_files: Callable[[Path], bool]) -> tuple[str, str, bool]:
    """(path, format, given) from the --dataset option (str or {"path", "format"}), else the scenario's dataset."""
    fmt = "auto"
    path = None
    if isinstance(dataset, dict):
        unknown = set(dataset) - {"path", "format"}
        if unknown:
            raise AdvisorInputError(f"dataset.{sorted(unknown)[0]}", "unknown field", allowed=["path", "format"])
        path, fmt = dataset.get("path"), dataset.get("format") or "auto"
    elif isinstance(dataset, str):
        path = dataset
    elif dataset is not None:
        raise AdvisorInputError("dataset", "expected a path or {\"path\": ..., \"format\": ...}")
    if path is None:
        sc_ds = ((rec.get("scenario") or {}).get("dataset") or {})
        path = sc_ds.get("path")
        if fmt == "auto" and sc_ds.get("format") not in (None, "auto"):
            fmt = sc_ds["format"]
    if fmt not in ("auto", *DATA_FORMATS):
        raise AdvisorInputError("dataset.format", f"unknown data format {fmt!r}", allowed=["auto", *DATA_FORMATS])
    if not path:
        return PLACEHOLDER_DATA, (fmt if fmt != "auto" else "alpaca"), False
    if not isinstance(path, str) or "\n" in path:
        raise AdvisorInputError("dataset.path", "expected a file path")
    p = Path(path).expanduser()
    if fmt == "auto":
        fmt = detect_data_format(p, "dataset.path") if p.is_file() and read_files(p) else "alpaca"
    shown = str(p.resolve()) if p.exists() else str(p)
    return shown, fmt, True


def _model_facts(model_ref: Any) -> dict:
    """Architecture facts the tools need, from the resolved model (no weights are read)."""
    from advisor.catalog.models import resolve_model

    rm = resolve_model(model_ref)
    if rm.origin == "dict":
        raise AdvisorInputError(
            "model", f"{rm.id} is an architecture description, not a loadable checkpoint; export needs a Hub id, "
                     "a catalog name or a local directory")
    source = rm.path if rm.origin == "local" else rm.id
    layer = None
    try:
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        auto = AutoModelForSeq2SeqLM if rm.kind == "seq2seq" else AutoModelForCausalLM
        cls = auto._model_mapping[type(rm.config)]
        layers = [n for n in (getattr(cls, "_no_split_modules", None) or []) if "Layer" in n or "Block" in n]
        layer = layers[0] if layers else None
    except (KeyError, AttributeError, ImportError):
        layer = None
    return {"resolved": rm, "source": source, "layer": layer}


def _targets(rm, spec, peft: dict) -> tuple[Any, list[str] | None]:
    """Target module names that exist in this architecture (the same resolution the trainer uses)."""
    from advisor.methods._targets import ATTENTION_MODULES, ia3_modules, resolve_targets

    method = spec.id
    if method in ("lora", "qlora", "adalora", "molora"):
        model = rm.build_meta()
        return resolve_targets(model, peft.get("target_modules"), rm.config.model_type,
                               "config.peft.target_modules"), None
    if method == "longlora":
        targets = peft.get("target_modules") or ATTENTION_MODULES.get(rm.config.model_type)
        if not targets:
            raise AdvisorInputError("config.peft.target_modules",
                                    f"no attention module names known for {rm.config.model_type!r}; name them")
        return list(targets), None
    if method == "ia3":
        model = rm.build_meta()
        targets, ff = ia3_modules(model, peft, rm.config.model_type)
        return targets, ff
    return peft.get("target_modules"), None


def build_context(
    rec: dict,
    fmt: ExportFormat,
    *,
    method: str | None = None,
    dataset: Any = None,
    output_dir: str | None = None,
    val_split: float | None = None,
    read_files: Callable[[Path], bool] = lambda _p: True,
) -> ExportContext:
    from advisor.methods import get_method

    rec = load_recommendation(rec)
    name, config, estimate, chosen, why_not = select_method(rec, method)
    available = [rec["method"]] + [a.get("method") for a in rec.get("alternatives") or [] if isinstance(a, dict)]
    fmt.check_method(name, available)
    spec = get_method(name)
    cfg = spec.resolve_config({k: v for k, v in config.items() if k in ("method", "peft", "quantization", "training")})
    scenario = rec.get("scenario") or {}
    model_ref = scenario.get("model") or rec.get("model")
    if not model_ref:
        raise AdvisorInputError("recommendation.model", "the recommendation names no model")
    facts = _model_facts(model_ref)
    rm = facts["resolved"]
    if rm.kind not in spec.kinds:
        raise AdvisorInputError("method", f"{name} does not apply to {rm.kind} models ({rm.id})",
                                allowed=list(spec.kinds))
    targets, ff = _targets(rm, spec, cfg.peft)
    if name == "bitfit" and cfg.peft.get("bias_source") == "existing":
        if not any(n.endswith("bias") for n, _ in rm.build_meta().named_parameters()):
            raise AdvisorInputError(
                "config.peft.bias_source",
                f"this {rm.config.model_type} model has no bias terms to train; set bias_source to 'add' "
                "(adds trainable biases to linear layers) or choose another method", allowed=["existing", "add"])

    hw_est = estimate.get("hardware") or rec.get("hardware") or {}
    hw_sc = scenario.get("hardware") or {}
    count = int(hw_est.get("count") or hw_sc.get("count") or 1)
    gpu_name = hw_est.get("name") or hw_sc.get("gpu")
    if isinstance(gpu_name, str) and gpu_name.lower() in ("none", "auto"):
        gpu_name = None if gpu_name.lower() == "none" else gpu_name
    strategy = estimate.get("strategy") or ("single" if count <= 1 else "ddp")
    from advisor.estimator.fast import STRATEGIES, STRATEGY_ALIASES

    strategy = STRATEGY_ALIASES.get(strategy, strategy)
    if strategy not in ("single", *STRATEGIES):
        raise AdvisorInputError("estimate.strategy", f"unknown strategy {strategy!r}", allowed=["single", *STRATEGIES])
    if count > 1 and strategy == "single":
        strategy = "ddp"

    path, data_fmt, given = resolve_dataset(rec, dataset, read_files=read_files)
    if val_split is None:
        val_split = DEFAULT_VAL_SPLIT
    if not isinstance(val_split, (int, float)) or not 0 <= float(val_split) < 0.5:
        raise AdvisorInputError("val_split", f"must be a fraction in [0, 0.5), got {val_split!r}")
    num_examples = (scenario.get("dataset") or {}).get("num_examples")
    short = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(rm.id).rstrip("/").split("/")[-1]) or "model"
    out_dir = output_dir or f"outputs/{short}-{name}"
    sources = (rec.get("config_sources") or {}) if chosen else {}
    reasons = (rec.get("reasons") or []) if chosen else []
    return ExportContext(
        format=fmt.id, method=name, chosen=chosen, config=cfg, spec=spec, estimate=estimate,
        model_ref=str(facts["source"]), model_id=str(rm.id), kind=rm.kind, model_type=rm.config.model_type,
        layer_class=facts["layer"], targets=targets, ia3_feedforward=ff, gpu_name=gpu_name, gpu_count=count,
        strategy=strategy, dataset_path=path, dataset_format=data_fmt, dataset_given=given,
        num_examples=num_examples if isinstance(num_examples, int) else None, val_split=float(val_split),
        output_dir=out_dir, reasons=[r for r in reasons if isinstance(r, dict)], why_not_first=why_not,
        sources={k: v for k, v in sources.items() if isinstance(v, dict)}, available_methods=available,
        filename=fmt.filename,
    )
