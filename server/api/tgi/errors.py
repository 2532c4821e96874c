"""TGI's error shape, `{"error", "error_type", "param"}`: every route outside /v1 answers it."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from server.api.errors import STATUS_MEANINGS, as_serve_error
from server.api.tgi.schemas import ErrorBody
from server.errors import ServeError


def error_body(error: ServeError) -> dict:
    """The body, also sent in-band as the last event of a stream that fails after its first byte."""
    return {"error": error.message, "error_type": error.code, "param": error.param}


def error_response(request: Request, exc: Exception) -> JSONResponse:
    error = as_serve_error(exc)
    return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)


def declared(*statuses: int) -> dict:
    """A route's `responses=` for the error statuses it can answer, in this shape (for the spec)."""
    return {status: {"model": ErrorBody, "description": STATUS_MEANINGS[status]} for status in statuses}
