"""The Scenario of CONTRACT.md ("what should I use?"), validated with errors that name the field.

Defaults (CONTRACT.md: only `model`, `hardware` and `dataset.num_examples` are required):

- `task`: ``instruction_following`` — supervised instruction/response tuning is what most fine-tuning requests
  are (001 lists it first among "most fine-tuning tasks"; 002 sizes datasets for it as the "Medium" case).
- `priority`: ``balanced``.
- `budget`: no limits.
- `context`: every flag ``null`` = "not stated". Rules only fire on a flag the user actually stated, so an
  unstated `prompting_tried` does not turn every request into "try prompting first". `num_domains` and
  `num_tasks` default to 1.
- `dataset.num_examples` may be left out only when `dataset.path` is given (the service profiles the file and
  fills the count in before the rules run); ``0`` is allowed (nothing to train on: few-shot prompting).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from advisor.schemas import Hardware, parse

TASKS = (
    "domain_adaptation", "instruction_following", "chat", "classification", "math", "code", "long_context",
    "multi_domain", "generation", "summarization", "translation", "style", "knowledge_injection",
)
PRIORITIES = ("balanced", "quality", "cost", "speed", "min_params")
DECISIONS = ("fine_tune", "few_shot_prompting", "rag", "managed_finetune_api", "continued_pretraining")
# Problems seen in an earlier training run; the seeds' "common issues" tables say what to change.
SYMPTOMS = (
    "out_of_memory", "loss_not_decreasing", "overfitting", "underfitting", "slow_training",
    "catastrophic_forgetting", "slow_convergence", "mode_collapse",
)
DEFAULT_TASK = "instruction_following"
DEFAULT_PRIORITY = "balanced"

Task = Literal[
    "domain_adaptation", "instruction_following", "chat", "classification", "math", "code", "long_context",
    "multi_domain", "generation", "summarization", "translation", "style", "knowledge_injection",
]
Priority = Literal["balanced", "quality", "cost", "speed", "min_params"]
Symptom = Literal[
    "out_of_memory", "loss_not_decreasing", "overfitting", "underfitting", "slow_training",
    "catastrophic_forgetting", "slow_convergence", "mode_collapse",
]


def _lower(v: Any) -> Any:
    return v.strip().lower() if isinstance(v, str) else v


class ScenarioDataset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="A JSONL file the service profiles (rows, token lengths).")
    format: str = "auto"
    num_examples: int | None = Field(
        None, ge=0, le=10**10, validate_default=True, description="Training examples (rows)."
    )
    max_tokens: int | None = Field(None, ge=1, le=2_097_152, description="Tokens in the longest example.")
    avg_tokens: float | None = Field(None, gt=0, le=2_097_152, description="Mean tokens per example.")

    @field_validator("num_examples")
    @classmethod
    def _count_or_path(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is None and not info.data.get("path"):
            raise ValueError("required (or give dataset.path for the service to count the rows)")
        return v

    @field_validator("avg_tokens")
    @classmethod
    def _avg_not_above_max(cls, v: float | None, info: ValidationInfo) -> float | None:
        mx = info.data.get("max_tokens")
        if v is not None and mx is not None and v > mx:
            raise ValueError(f"avg_tokens ({v:g}) cannot exceed max_tokens ({mx})")
        return v


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_usd: float | None = Field(None, ge=0)
    max_hours: float | None = Field(None, gt=0)


class Context(BaseModel):
    """What the user knows about the problem; ``null`` = not stated (no rule fires on it)."""

    model_config = ConfigDict(extra="forbid")

    prompting_tried: bool | None = Field(None, description="Zero/few-shot prompting has been tried.")
    prompting_sufficient: bool | None = Field(None, description="Prompting already reaches the target quality.")
    knowledge_changes_often: bool | None = Field(None, description="The facts the model must know change (weekly).")
    needs_external_knowledge: bool | None = Field(None, description="Answers need documents/data outside the model.")
    new_language_or_domain: bool | None = Field(None, description="A language or domain far from pre-training.")
    managed_api_ok: bool | None = Field(None, description="A hosted fine-tuning API (OpenAI etc.) is acceptable.")
    num_domains: int = Field(1, ge=1, le=10_000, description="Distinct domains / data clusters.")
    num_tasks: int = Field(1, ge=1, le=100_000, description="Distinct tasks to serve.")
    first_finetune: bool | None = Field(None, description="First fine-tuning project of this team.")
    latency_critical: bool | None = Field(None, description="Serving latency is critical.")
    evaluation_defined: bool | None = Field(None, description="Success metrics / a test set exist.")
    can_maintain_model: bool | None = Field(None, description="The team can retrain and maintain a model.")
    requirements_change_often: bool | None = Field(None, description="The required behaviour changes often.")
    frontier_model_handles_task: bool | None = Field(None, description="A general model (GPT-4 class) already does it.")
    needs_behavior_change: bool | None = Field(None, description="The model's behaviour (not knowledge) must change.")
    reduce_prompt_length: bool | None = Field(None, description="Goal: bake a long system prompt into the weights.")
    examples_exceed_context: bool | None = Field(None, description="The task needs more examples than fit in context.")
    needs_modular_adapters: bool | None = Field(None, description="Modular / stackable task adapters needed.")
    production_deployment: bool | None = Field(None, description="A production model worth extra optimisation.")
    research_project: bool | None = Field(None, description="Research / method comparison.")
    preserve_general_capabilities: bool | None = Field(
        None, description="General abilities must survive the fine-tune (catastrophic forgetting is a concern)."
    )
    symptoms: list[Symptom] = Field(default_factory=list, description="Problems seen in an earlier run.")

    @field_validator("symptoms", mode="before")
    @classmethod
    def _lower_symptoms(cls, v: Any) -> Any:
        return [_lower(s) for s in v] if isinstance(v, list) else v


class Scenario(BaseModel):
    """CONTRACT.md's Scenario. `model`: catalog name / HF id / local dir / architecture object."""

    model_config = ConfigDict(extra="forbid")

    model: str | dict[str, Any]
    hardware: Hardware
    dataset: ScenarioDataset
    task: Task = DEFAULT_TASK
    priority: Priority = DEFAULT_PRIORITY
    budget: Budget = Field(default_factory=Budget)
    context: Context = Field(default_factory=Context)

    @field_validator("task", "priority", mode="before")
    @classmethod
    def _lower_enum(cls, v: Any) -> Any:
        return _lower(v)

    @field_validator("model")
    @classmethod
    def _model_given(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            raise ValueError("give a catalog name, Hugging Face id, local directory or architecture object")
        return v


def parse_scenario(data: Any) -> Scenario:
    """Validate a Scenario dict; the first problem becomes ``AdvisorInputError(field, message)``."""
    if isinstance(data, Scenario):
        return data
    return parse(Scenario, data)  # type: ignore[return-value]
