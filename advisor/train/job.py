"""Validate a training job (CONTRACT.md `POST /v1/jobs` body) and fill every default from the method registry.

Accepted bodies::

    {"model", "method", "config": {peft, quantization, training}, "dataset": {...}, "output_dir": null}
    {"recommendation": <a whole Recommendation>, "model", "dataset", "output_dir": null}

Extra keys the executor understands (all optional): ``max_steps`` (stop after this many optimizer steps, e.g. a
smoke run), ``save_total_limit`` (checkpoints kept, default 2), ``estimate`` (run the fit check, default true),
``strategy`` (multi-GPU strategy from the estimator: ddp | zero2 | zero3 | *_offload), ``num_processes``,
``memory_limit_gib`` (judge the fit against this much memory per device instead of all of it, e.g. on a shared
GPU; on a CPU-only host it makes the fit check run against that budget).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from advisor.errors import AdvisorInputError
from advisor.train.data import FORMAT_CHOICES, check_readable, peek_format

JOB_KEYS = ("model", "method", "config", "dataset", "output_dir", "recommendation", "max_steps", "save_total_limit",
            "estimate", "strategy", "num_processes", "name", "memory_limit_gib")
DATASET_KEYS = ("path", "format", "validation_split")
DEFAULT_VALIDATION_SPLIT = 0.1


def normalize_job(body: dict) -> dict:
    """The job with method, full config (defaults filled), dataset (absolute path, format) — or AdvisorInputError."""
    if not isinstance(body, dict):
        raise AdvisorInputError("job", f"expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(JOB_KEYS))
    if unknown:
        raise AdvisorInputError(unknown[0], "unknown field", allowed=list(JOB_KEYS))
    body = copy.deepcopy(body)
    method, config = _method_and_config(body)

    from advisor.catalog.models import resolve_model
    from advisor.methods import get_method

    model_ref = body.get("model")
    if model_ref is None and isinstance(body.get("recommendation"), dict):
        model_ref = body["recommendation"].get("model")
    if not isinstance(model_ref, str) or not model_ref.strip():
        raise AdvisorInputError("model", "required: a local model directory or a Hugging Face model id")
    resolved = resolve_model(model_ref)
    spec = get_method(method)
    if resolved.kind not in spec.kinds:
        raise AdvisorInputError("method", f"{spec.id} does not apply to {resolved.kind} models ({resolved.id})",
                                allowed=[m.id for m in _all_methods() if resolved.kind in m.kinds])
    cfg = spec.resolve_config(config)
    if spec.validate is not None:
        from advisor.methods import BuildContext

        spec.validate(dict(cfg.peft), BuildContext(kind=resolved.kind, model_type=resolved.model_type, on_meta=True,
                                                   training=cfg.training, quantization=cfg.quantization))
    if cfg.quantization is not None and cfg.quantization.quant_method == "gptq":
        from advisor.engine import check_gptq_checkpoint

        check_gptq_checkpoint(resolved, cfg.quantization)
    if spec.id == "peft":
        from advisor.methods.peft_any import check_model

        check_model(cfg.peft, resolved.config)
    if spec.id == "prefix_tuning" and cfg.training.gradient_checkpointing:
        raise AdvisorInputError("config.training.gradient_checkpointing",
                                "prefix_tuning does not work with gradient checkpointing (PEFT refuses it); set it to false")

    dataset = _dataset(body.get("dataset"))
    job: dict[str, Any] = {
        "model": model_ref.strip() if resolved.path is None else resolved.path,
        "method": spec.id,
        "config": cfg.model_dump(mode="json"),
        "dataset": dataset,
        "output_dir": _output_dir(body.get("output_dir")),
        "max_steps": _positive_int(body.get("max_steps"), "max_steps"),
        "save_total_limit": _positive_int(body.get("save_total_limit"), "save_total_limit") or 2,
        "estimate": _bool(body.get("estimate", True), "estimate"),
        "strategy": _strategy(body.get("strategy")),
        "num_processes": _positive_int(body.get("num_processes"), "num_processes") or 1,
        "memory_limit_gib": _positive_float(body.get("memory_limit_gib"), "memory_limit_gib"),
    }
    if body.get("name") is not None:
        job["name"] = str(body["name"])[:200]
    return job


def _all_methods():
    from advisor.methods import all_methods

    return all_methods()


def _method_and_config(body: dict) -> tuple[str, dict]:
    rec = body.get("recommendation")
    if rec is not None:
        if not isinstance(rec, dict):
            raise AdvisorInputError("recommendation", "expected a Recommendation object")
        if rec.get("decision", "fine_tune") != "fine_tune" or not rec.get("method"):
            raise AdvisorInputError("recommendation.decision",
                                    f"the recommendation is {rec.get('decision')!r}, not fine_tune: there is nothing to train",
                                    allowed=["fine_tune"])
        if body.get("method") not in (None, rec["method"]):
            raise AdvisorInputError("method", f"{body['method']!r} contradicts the recommendation's {rec['method']!r}")
        config = rec.get("config") or {}
        if body.get("config"):
            raise AdvisorInputError("config", "give either a recommendation or method + config, not both")
        method = rec["method"]
    else:
        method = body.get("method")
        config = body.get("config") or {}
        if not isinstance(method, str) or not method:
            from advisor.methods import METHOD_IDS

            raise AdvisorInputError("method", "required (or post a whole `recommendation`)", allowed=list(METHOD_IDS))
    if not isinstance(config, dict):
        raise AdvisorInputError("config", "expected an object with peft, quantization, training")
    config = {k: v for k, v in config.items() if not (k == "quantization" and v is None)}
    if config.get("method") not in (None, method):
        raise AdvisorInputError("config.method", f"{config['method']!r} does not match method {method!r}")
    config.pop("method", None)
    from advisor.methods import resolve_method_alias

    method, config, _ = resolve_method_alias(method, config)  # "dora" → lora with peft.use_dora, ...
    return method.strip().lower(), config


def _dataset(ds: Any) -> dict:
    if ds is None:
        raise AdvisorInputError("dataset", "required: {\"path\": ..., \"format\": \"auto\"}")
    if isinstance(ds, str):
        ds = {"path": ds}
    if not isinstance(ds, dict):
        raise AdvisorInputError("dataset", "expected an object with path and format")
    unknown = sorted(set(ds) - set(DATASET_KEYS))
    if unknown:
        raise AdvisorInputError(f"dataset.{unknown[0]}", "unknown field", allowed=list(DATASET_KEYS))
    fmt = ds.get("format", "auto") or "auto"
    if fmt not in FORMAT_CHOICES:
        raise AdvisorInputError("dataset.format", f"unknown format {fmt!r}", allowed=list(FORMAT_CHOICES))
    split = ds.get("validation_split", DEFAULT_VALIDATION_SPLIT)
    if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 <= split < 1:
        raise AdvisorInputError("dataset.validation_split", f"must be a number in [0, 1), got {split!r}")
    path = ds.get("path")
    if not isinstance(path, str) or not path.strip():
        raise AdvisorInputError("dataset.path", "required: a JSONL, JSON, CSV or Parquet file")
    real = check_readable(_locate(path))
    detected = peek_format(real, fmt)
    return {"path": str(real), "format": fmt, "detected_format": detected, "validation_split": float(split)}


def _locate(path: str) -> Path:
    """As given (absolute, or relative to the working directory); else relative to the data root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    from advisor.settings import get_settings

    under_root = Path(get_settings().data_root).expanduser() / p
    return under_root if under_root.exists() else p


def _output_dir(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise AdvisorInputError("output_dir", "expected a directory path or null")
    return value


def _positive_int(value: Any, field_name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdvisorInputError(field_name, f"must be a positive integer, got {value!r}")
    return value


def _positive_float(value: Any, field_name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1e6:
        raise AdvisorInputError(field_name, f"must be a positive number of GiB, got {value!r}")
    return float(value)


def _bool(value: Any, field_name: str) -> bool:
    if not isinstance(value, bool):
        raise AdvisorInputError(field_name, f"must be true or false, got {value!r}")
    return value


def _strategy(value: Any) -> str | None:
    if value is None:
        return None
    from advisor.estimator.fast import STRATEGIES, STRATEGY_ALIASES

    value = STRATEGY_ALIASES.get(value, value)
    if value not in STRATEGIES:
        raise AdvisorInputError("strategy", f"unknown strategy {value!r}", allowed=[*STRATEGIES, *STRATEGY_ALIASES])
    return value
