"""One error type for bad user input, carrying the field it is about.

The API turns it into HTTP 422 and the CLI into exit code 2; the message always names the field and,
where there is a closed set, what is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable


class AdvisorInputError(ValueError):
    """Bad input: `field` is a dotted path such as ``hardware.gpu``; `allowed` lists valid values if known."""

    def __init__(self, field: str, message: str, allowed: Iterable[str] | None = None):
        self.field = field
        self.allowed = list(allowed) if allowed is not None else None
        text = f"{field}: {message}"
        if self.allowed:
            shown = ", ".join(self.allowed[:40])
            more = f" (+{len(self.allowed) - 40} more)" if len(self.allowed) > 40 else ""
            text += f"; allowed: {shown}{more}"
        self.message = text
        super().__init__(text)

    def to_dict(self) -> dict:
        return {"field": self.field, "message": self.message, "allowed": self.allowed}
