"""Exports: a recommendation as a config for the tool that will train it.

    from advisor.export import export
    out = export("axolotl", recommendation=rec)            # or scenario=..., method="qlora", dataset="data.jsonl"
    out["content"]                                         # the file; out["files"]: companion files

Formats (one module each, registered in `base.register_format`):

    axolotl       Axolotl YAML                      axolotl train axolotl_config.yml
    llamafactory  LLaMA-Factory YAML + dataset_info llamafactory-cli train llamafactory_config.yaml
    script        standalone Python (transformers + PEFT), runs as is: python train.py
    accelerate    accelerate config for the script on several GPUs (FSDP or DeepSpeed, from estimate.strategy)

Each module's docstring has the table of which methods its tool can express; a method it cannot is refused with
an AdvisorInputError on `method` naming the tool, the method and what the tool supports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from advisor.errors import AdvisorInputError
from advisor.export import accelerate, axolotl, llamafactory, script  # noqa: F401  (registration)
from advisor.export.base import ExportContext, ExportFormat, Rendered, all_formats, build_context, get_format

FORMAT_IDS = tuple(f.id for f in all_formats())


def export(
    fmt: str,
    *,
    recommendation: dict | None = None,
    scenario: dict | None = None,
    method: str | None = None,
    dataset: Any = None,
    output_dir: str | None = None,
    val_split: float | None = None,
    backend: str = "auto",
    filename: str | None = None,
    companion_dir: str | None = None,
    restrict_paths_to: Path | None = None,
) -> dict:
    """The export of one recommendation (or of the recommendation for `scenario`) in format `fmt`.

    Returns {"format", "filename", "content", "method", "chosen", "files", "command", "notes"}.
    `restrict_paths_to`: read dataset files (to detect their format) and profile scenario datasets only under this
    directory (the REST API passes the data root).
    """
    spec = get_format(fmt)
    if (recommendation is None) == (scenario is None):
        raise AdvisorInputError("recommendation", "give exactly one of recommendation (a Recommendation JSON) "
                                                  "or scenario (to recommend first)")
    if scenario is not None:
        recommendation = _recommend(scenario, restricted=restrict_paths_to is not None)

    def readable(path: Path) -> bool:
        if restrict_paths_to is None:
            return True
        root = Path(restrict_paths_to).resolve()
        full = path.resolve()
        return full == root or root in full.parents

    ctx = build_context(recommendation, spec, method=method, dataset=dataset, output_dir=output_dir,
                        val_split=val_split, read_files=readable)
    spec.check_kind(ctx)
    ctx.filename = filename or spec.filename
    ctx.companion_dir = companion_dir
    ctx.backend = (backend or "auto").strip().lower()
    rendered = spec.render(ctx)
    return {
        "format": spec.id, "filename": ctx.filename, "content": rendered.content, "method": ctx.method,
        "chosen": ctx.chosen, "files": rendered.files, "command": rendered.command, "notes": rendered.notes,
    }


def _recommend(scenario: Any, restricted: bool) -> dict:
    if not isinstance(scenario, dict):
        raise AdvisorInputError("scenario", f"expected a Scenario JSON object, got {type(scenario).__name__}")
    from advisor.recommend import recommend

    return recommend(scenario, allow_any_path=not restricted)


def formats_table() -> list[dict]:
    return [{"id": f.id, "tool": f.tool, "filename": f.filename, "methods": list(f.methods), "summary": f.summary}
            for f in all_formats()]


__all__ = ["FORMAT_IDS", "ExportContext", "ExportFormat", "Rendered", "export", "formats_table", "get_format"]
