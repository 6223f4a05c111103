"""The five reference documents ("seeds") as sections, so a rule's citation can be checked.

A citation is ``"<file> § <heading>"``. ``<heading>`` is the exact text of a Markdown heading in that file
(``{#anchor}`` suffixes and trailing spaces dropped); where the same heading text occurs more than once
(``When to Use``), it is written as an ancestor path, ``"LoRA (Low-Rank Adaptation) > When to Use"``: each
part an exact heading, each one nested under the one before. A rule's ``quote`` must be an exact substring of
the text of the cited section (from its heading line to the next heading of the same or a higher level).

Lines inside fenced code blocks (```) are never headings (the seeds have ``# comments`` in Python code).
The seed files are copied beside this module (``advisor/rules/seeds/``) so citations can be checked where the
package is installed; ``ADVISOR_SEEDS_DIR`` points elsewhere.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

SEEDS_ENV = "ADVISOR_SEEDS_DIR"
_HEADING_RE = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_ANCHOR_RE = re.compile(r"\s*\{#[^}]*\}\s*$")


def seeds_dir() -> Path:
    override = os.environ.get(SEEDS_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().with_name("seeds")


@dataclass(frozen=True)
class Section:
    title: str
    level: int
    path: tuple[str, ...]  # ancestor titles, outermost first, ending with this title
    start: int  # character offset of the heading line
    end: int  # character offset where the section ends


@dataclass(frozen=True)
class SeedDoc:
    name: str
    text: str
    sections: tuple[Section, ...]

    def find(self, heading: str) -> list[Section]:
        """Sections matching a heading reference (a title, or 'A > B' ancestor path)."""
        split = [p.strip() for p in heading.split(" > ")]
        titles = {s.title for s in self.sections}
        parts = split
        for k in range(len(split), 0, -1):  # a title may itself contain " > " ("Data Quality > Quantity")
            leaf = " > ".join(split[-k:])
            if leaf in titles:
                parts = [*split[:-k], leaf]
                break
        out = []
        for s in self.sections:
            if s.title != parts[-1]:
                continue
            ancestors = list(s.path[:-1])
            i = 0
            for a in ancestors:  # parts[:-1] must appear in order among the ancestors
                if i < len(parts) - 1 and a == parts[i]:
                    i += 1
            if i == len(parts) - 1:
                out.append(s)
        return out

    def section_text(self, s: Section) -> str:
        return self.text[s.start:s.end]

    def titles(self) -> list[str]:
        return [s.title for s in self.sections]


def parse_sections(text: str) -> tuple[Section, ...]:
    heads: list[tuple[int, int, str]] = []  # (offset, level, title)
    offset = 0
    in_fence = False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_fence = not in_fence
        elif not in_fence:
            m = _HEADING_RE.match(line.rstrip("\n"))
            if m:
                title = _ANCHOR_RE.sub("", m.group(2)).strip()
                if title:
                    heads.append((offset, len(m.group(1)), title))
        offset += len(line)
    sections = []
    stack: list[tuple[int, str]] = []
    for i, (start, level, title) in enumerate(heads):
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        end = len(text)
        for start2, level2, _ in heads[i + 1:]:
            if level2 <= level:
                end = start2
                break
        sections.append(Section(title, level, tuple(t for _, t in stack), start, end))
    return tuple(sections)


@functools.lru_cache(maxsize=16)
def load_seed(directory: str, name: str) -> SeedDoc:
    text = (Path(directory) / name).read_text(encoding="utf-8")
    return SeedDoc(name, text, parse_sections(text))


def split_source(source: str) -> tuple[str, str]:
    """'<file> § <heading>' -> (file, heading); ValueError if the shape is wrong."""
    if " § " not in source:
        raise ValueError(f"source {source!r} must look like '<seed file> § <section heading>'")
    name, heading = source.split(" § ", 1)
    name, heading = name.strip(), heading.strip()
    if not name or not heading:
        raise ValueError(f"source {source!r} must look like '<seed file> § <section heading>'")
    return name, heading


def check_citation(source: str, quote: str | None, directory: Path | None = None) -> Section:
    """Return the cited section; raise ValueError saying what is wrong (file, heading, ambiguity, quote)."""
    directory = directory or seeds_dir()
    name, heading = split_source(source)
    path = directory / name
    if "/" in name or "\\" in name or not path.is_file():
        raise ValueError(f"cites {name!r}, which is not a seed file in {directory}")
    doc = load_seed(str(directory), name)
    matches = doc.find(heading)
    if not matches:
        raise ValueError(f"cites section {heading!r}, which is not a heading of {name}")
    if len(matches) > 1 and " > " not in heading:
        paths = sorted({" > ".join(m.path[-2:]) for m in matches})
        raise ValueError(f"section {heading!r} occurs {len(matches)} times in {name}; write one of {paths}")
    if quote is None:
        return matches[0]
    if quote not in doc.text:
        raise ValueError(f"quote {quote!r} is not in {name}")
    for m in matches:
        if quote in doc.section_text(m):
            return m
    raise ValueError(f"quote {quote!r} is in {name} but not under section {heading!r}")
