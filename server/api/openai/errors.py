"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, for the /v1 routes only.

A route class maps every error of its own routes (dependencies and body validation included) before
the app-wide handlers see it, so the native routes keep TGI's shape. Validation errors are 400 here,
as OpenAI answers them (its clients raise BadRequestError), not FastAPI's 422. Messages and `param`
already use this format's field names: its requests tell the service what they call each field.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from server.api.errors import STATUS_MEANINGS, BadBody, as_serve_error
from server.api.openai.schemas import ErrorResponse
from server.errors import ServeError

CODES = {401: "invalid_api_key", 422: "invalid_parameter", 429: "rate_limit_exceeded"}
RENAMED_CODES = {"http": "http_error", "internal": "internal_error"}


class OpenAIRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request):
            try:
                return await handler(request)
            except Exception as exc:
                return error_response(request, exc)

        return handle


def error_response(request: Request | None, exc: Exception) -> JSONResponse:
    error = as_serve_error(exc)
    status = 400 if error.status == 422 else error.status
    return JSONResponse(error_body(error), status_code=status, headers=error.headers)


def error_body(error: ServeError) -> dict:
    """The body, also sent in-band as the last event of a stream that fails after its first byte."""
    param = error.top_field if isinstance(error, BadBody) else error.param
    if error.status == 404 and param == "model":
        code = "model_not_found"
    else:
        code = CODES.get(error.status, RENAMED_CODES.get(error.code, error.code))
    kind = "server_error" if error.status >= 500 else "invalid_request_error"
    return {"error": {"message": error.message, "type": kind, "param": param, "code": code}}


def declared(*statuses: int) -> dict:
    """A route's `responses=` for the error statuses it can answer, in this shape (for the spec)."""
    return {status: {"model": ErrorResponse, "description": STATUS_MEANINGS[status]} for status in statuses}
