"""Public request and response shapes (CONTRACT.md), validated once, with errors that name the field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from advisor.errors import AdvisorInputError

BREAKDOWN_KEYS = ("weights", "trainable", "gradients", "optimizer", "activations", "logits", "overhead")


class Hardware(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpu: str | None = Field(None, description="Catalog name or alias, 'none' (no local GPU) or 'auto' (this machine).")
    count: int = Field(1, ge=1, le=1024, description="GPUs of this kind.")
    vram_gib: float | None = Field(None, gt=0, le=4096, description="Memory per GPU, instead of a catalog name.")

    @model_validator(mode="after")
    def _one_of(self) -> Hardware:
        if self.gpu is None and self.vram_gib is None:
            raise ValueError("give hardware.gpu (a catalog name, 'none' or 'auto') or hardware.vram_gib")
        return self


class Dataset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_examples: int | None = Field(None, ge=1, le=10**10)
    avg_tokens: float | None = Field(None, gt=0, le=2_097_152)
    max_tokens: int | None = Field(None, ge=1, le=2_097_152)
    path: str | None = None
    format: str = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> Dataset:
        if self.avg_tokens is not None and self.max_tokens is not None and self.avg_tokens > self.max_tokens:
            raise ValueError(f"avg_tokens ({self.avg_tokens}) cannot exceed max_tokens ({self.max_tokens})")
        return self


class EstimateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | dict[str, Any]
    hardware: Hardware
    method: str = Field(description="One of the twelve method ids (GET /v1/methods), or \"peft\" for any other PEFT "
                                    "adapter type, with config.peft = its adapter_config.json; \"freeze\", "
                                    "\"llama_pro\"; or a name that is one of these with settings (\"dora\", "
                                    "\"qdora\", \"rslora\", \"lora-fa\", \"lisa\", \"loha\", \"vera\", ...: "
                                    "advisor.methods.METHOD_ALIASES, said in the answer's notes)")
    config: dict[str, Any] | None = Field(None, description="{method, peft, quantization, training}; left-out knobs "
                                                            "take the method's defaults")
    dataset: Dataset | None = None
    exact: bool = Field(False, description="Run the fake-tensor simulation instead of the fast closed-form model.")


def parse(model_cls: type[BaseModel], data: Any, prefix: str = "") -> BaseModel:
    """Validate `data`, turning the first problem into an AdvisorInputError with a dotted field name."""
    if not isinstance(data, dict):
        raise AdvisorInputError(prefix or "request", f"expected a JSON object, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
        field = ".".join(p for p in (prefix, loc) if p) or "request"
        allowed = None
        if first["type"] == "extra_forbidden":
            parent = _sub_model(model_cls, first["loc"][:-1])
            allowed = sorted(parent.model_fields) if parent else None
            raise AdvisorInputError(field, "unknown field", allowed=allowed) from None
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            msg = "required"
        raise AdvisorInputError(field, msg) from None


def _sub_model(model_cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    cls = model_cls
    for part in loc:
        field = cls.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        for candidate in (ann, *getattr(ann, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                cls = candidate
                break
        else:
            return None
    return cls
