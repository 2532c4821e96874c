"""Exceptions → HTTP responses, in one place. Native routes answer TGI's error shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import ServeError

log = logging.getLogger("loraserve.api")


def error_body(message: str, error_type: str, param: str | None = None) -> dict:
    return {"error": message, "error_type": error_type, "param": param}


def describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = loc[-1] if loc else None
    where = ".".join(loc) or "body"
    return f"{where}: {first.get('msg', 'invalid request')}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.code, exc.param), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(exc)
        return JSONResponse(error_body(message, "validation", param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if request.url.path.startswith("/v1/"):  # no /v1 route matched (404, 405): still OpenAI's error shape
            # (imported here: openai_errors imports this module)
            from server.api.openai_errors import openai_error_response

            return openai_error_response(exc)
        return JSONResponse(error_body(str(exc.detail), "http"), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal error", "internal"), status_code=500)
