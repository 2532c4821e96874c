"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, for the /v1 routes only.

A route class maps every error of its own routes (dependencies and body validation included) before
the app-wide handlers see it, so the native routes keep TGI's shape. Validation errors are 400 here,
as OpenAI answers them (its clients raise BadRequestError), not FastAPI's 422.
"""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.errors import describe_validation
from server.errors import Invalid, ServeError

log = logging.getLogger("loraserve.api")

# The service names the native fields; a /v1 client knows OpenAI's. A route whose request names them
# otherwise (chat: `messages`, maybe `max_completion_tokens`) puts its own in `request.state.openai_params`.
OPENAI_PARAMS = {"inputs": "prompt", "max_new_tokens": "max_tokens", "adapter_id": "model"}
CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


class OpenAIRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request):
            try:
                return await handler(request)
            except Exception as exc:
                return openai_error_response(exc, getattr(request.state, "openai_params", OPENAI_PARAMS))

        return handle


def openai_error_response(exc: Exception, params: dict[str, str] = OPENAI_PARAMS) -> JSONResponse:
    error = as_serve_error(exc)
    status = 400 if error.status == 422 else error.status
    return JSONResponse(openai_error_body(error, params), status_code=status, headers=error.headers)


def openai_error_body(error: ServeError, params: dict[str, str] = OPENAI_PARAMS) -> dict:
    """The body, also sent in-band as the last event of a stream that fails after its first byte."""
    param = params.get(error.param, error.param)
    message = error.message.replace("'inputs'", f"'{params['inputs']}'")
    message = message.replace("max_new_tokens", params["max_new_tokens"])
    code = "model_not_found" if error.status == 404 and param == "model" else CODES.get(error.status, error.code)
    kind = "server_error" if error.status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def as_serve_error(exc: Exception) -> ServeError:
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, RequestValidationError):
        message, _ = describe_validation(exc)
        return Invalid(message, param=_top_field(exc))
    if isinstance(exc, StarletteHTTPException):
        error = ServeError(str(exc.detail), headers=dict(exc.headers or {}))
        error.status, error.code = exc.status_code, "http_error"
        return error
    log.exception("unhandled error on a /v1 route")
    return ServeError("internal error")


def _top_field(exc: RequestValidationError) -> str | None:
    """OpenAI's `param` is the request's own field (`prompt`), not a path into a union (`prompt.list[str].0`)."""
    loc = exc.errors()[0].get("loc", ()) if exc.errors() else ()
    fields = [part for part in loc if isinstance(part, str) and part != "body"]  # ints: JSON offsets, list items
    return fields[0] if fields else None
