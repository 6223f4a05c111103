"""A YAML document written line by line, so each knob can carry a short "why" comment.

    doc = YamlDoc(header=["Run: axolotl train config.yml"])
    doc.section("model")
    doc.put("base_model", "meta-llama/Llama-2-7b-hf")
    doc.put("lora_r", 16, "seed default: seed 000 § LoRA > Key Hyperparameters")
    text = doc.render()          # yaml.safe_load(text) gives back exactly the values put

Values are serialised by PyYAML (so the file parses back to the same values); scalars and short lists of scalars
go on the key's line, mappings and lists of mappings as indented blocks under it.
"""

from __future__ import annotations

from typing import Any

import yaml


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text.removesuffix("...").strip()


def _is_inline(value: Any) -> bool:
    if isinstance(value, dict):
        return not value
    if isinstance(value, (list, tuple)):
        return all(not isinstance(v, (dict, list, tuple)) for v in value) and len(_flow(list(value))) <= 100
    return True


def comment_block(lines: list[str]) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in lines)


class YamlDoc:
    def __init__(self, header: list[str] | None = None):
        self._lines: list[str] = []
        self._values: dict[str, Any] = {}
        if header:
            self._lines.append(comment_block(header).rstrip("\n"))

    def section(self, title: str) -> None:
        self._lines.append("")
        self._lines.append(f"### {title}")

    def comment(self, text: str) -> None:
        self._lines.append(f"# {text}")

    def put(self, key: str, value: Any, why: str | None = None) -> None:
        if key in self._values:
            raise ValueError(f"duplicate key {key!r}")
        if isinstance(value, tuple):
            value = list(value)
        self._values[key] = value
        note = f"  # {why}" if why else ""
        if _is_inline(value):
            self._lines.append(f"{key}: {_flow(value)}{note}")
            return
        block = yaml.safe_dump({key: value}, default_flow_style=False, sort_keys=False, width=10_000).rstrip("\n")
        first, _, rest = block.partition("\n")
        self._lines.append(first + note + ("\n" + rest if rest else ""))

    @property
    def values(self) -> dict[str, Any]:
        return dict(self._values)

    def render(self) -> str:
        return "\n".join(self._lines).lstrip("\n") + "\n"
