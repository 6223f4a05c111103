"""POST /v1/export: a recommendation (or a scenario, recommended first) as a training tool's config."""

from typing import Any, Literal

from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from advisor.schemas import parse

router = APIRouter(prefix="/v1", tags=["export"])


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = Field(..., description="axolotl | llamafactory | script | accelerate")
    recommendation: dict[str, Any] | None = Field(None, description="A Recommendation (POST /v1/recommend).")
    scenario: dict[str, Any] | None = Field(None, description="A Scenario: recommended first, then exported.")
    method: str | None = Field(None, description="Export this alternative instead of the recommended method.")
    dataset: str | dict[str, Any] | None = Field(
        None, description="Training data path, or {path, format}; files are only read under the data root.")
    output_dir: str | None = Field(None, description="Where the training run saves.")
    val_split: float | None = Field(None, description="Held-out fraction for evaluation (default 0.1).")
    backend: Literal["auto", "fsdp", "deepspeed"] = Field("auto", description="accelerate only.")


class ExportResponse(BaseModel):
    format: str
    filename: str
    content: str
    method: str
    chosen: bool = Field(description="True: the recommended method; False: one of its alternatives.")
    files: dict[str, str] = Field(description="Companion files to write beside it (LLaMA-Factory: dataset_info.json).")
    command: str = Field(description="The command that runs it.")
    notes: list[str]


EXAMPLE = {
    "format": "axolotl",
    "scenario": {"model": "meta-llama/Llama-2-7b-hf", "hardware": {"gpu": "RTX 4090"},
                 "dataset": {"num_examples": 2000, "avg_tokens": 512, "max_tokens": 1024}},
}


@router.post("/export", response_model=ExportResponse)
async def export(body: dict[str, Any] = Body(..., examples=[EXAMPLE])) -> dict:
    """The file (`content`, `filename`), its companion files and the command to run it; methods the tool cannot
    express are refused (422) naming the tool, the method and what the tool supports."""
    from advisor.export import export as run_export
    from advisor.settings import get_settings

    req = parse(ExportRequest, body)
    return await run_in_threadpool(
        run_export, req.format, recommendation=req.recommendation, scenario=req.scenario, method=req.method,
        dataset=req.dataset, output_dir=req.output_dir, val_split=req.val_split, backend=req.backend,
        restrict_paths_to=get_settings().data_root,
    )
