"""FastAPI application: thin routes over the core; the core never imports FastAPI."""

from __future__ import annotations

import importlib
import importlib.util

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from advisor import __version__
from advisor.errors import AdvisorInputError


ROUTE_MODULES = ("advisor.api.routes.recommend", "advisor.api.routes.export", "advisor.api.routes.jobs",
                 "advisor.api.routes.datasets")


def create_app() -> FastAPI:
    from advisor.api.routes import calibrations, catalog, estimate

    app = FastAPI(
        title="Fine-tuning advisor",
        version=__version__,
        description="Which fine-tuning method, what config, how much memory, time and money.",
    )

    @app.exception_handler(AdvisorInputError)
    async def _input_error(_request: Request, err: AdvisorInputError):
        return JSONResponse(status_code=422, content={"detail": err.message, "field": err.field, "allowed": err.allowed})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": ("body",), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # its loc is ("body", character offset), not a field
            why = (first.get("ctx") or {}).get("error") or first["msg"]
            return JSONResponse(status_code=422, content={
                "detail": f"body: not valid JSON ({why} at character {first['loc'][-1]})", "field": "body",
                "allowed": None})
        loc = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return JSONResponse(status_code=422, content={"detail": f"{loc}: {first['msg']}", "field": loc, "allowed": None})

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, err: Exception):
        # a fault of the service, not of the input: JSON that a client can show (the traceback goes to the server's
        # log, since Starlette raises the error again after this answer); the next request is served as usual
        return JSONResponse(status_code=500, content={
            "detail": f"internal error ({type(err).__name__}: {str(err)[:500]}); the request was not completed",
            "field": None, "allowed": None})

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        return {"status": "ok", "version": __version__}

    app.include_router(catalog.router)
    app.include_router(estimate.router)
    app.include_router(calibrations.router)
    for name in ROUTE_MODULES:  # feature routers (each module has `router`)
        try:
            present = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            present = False
        if present:
            app.include_router(importlib.import_module(name).router)
    return app
