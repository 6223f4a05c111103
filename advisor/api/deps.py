"""Typed dependencies shared by routes (FastAPI's `Annotated[..., Depends(...)]` aliases)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException


def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
    """When ADVISOR_API_TOKEN is set, the request needs `Authorization: Bearer <token>` (401 otherwise)."""
    from advisor.settings import get_settings

    token = get_settings().api_token
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(status_code=401, detail="this endpoint needs 'Authorization: Bearer <ADVISOR_API_TOKEN>'",
                            headers={"WWW-Authenticate": "Bearer"})


TokenDep = Annotated[None, Depends(require_token)]
