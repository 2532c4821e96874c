"""Any exception a route can raise → one ServeError, whatever wire format answers it.

The shapes live with their wire formats (`tgi/errors.py`, `openai/errors.py`); this module is what
both use, and imports neither.
"""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import Invalid, ServeError

log = logging.getLogger("loraserve.api")

# What each error status means, whichever route answers it: the spec's descriptions (`declared()` of
# each wire format's errors module).
STATUS_MEANINGS = {
    400: "Malformed request: a body that is not JSON or not UTF-8, or (/v1) an invalid parameter",
    401: "Missing or invalid API key (or admin token)",
    403: "Admin API disabled, wrong admin token, or a path leaving the adapter root",
    404: "Unknown adapter or model",
    408: "The request body did not arrive in time",
    409: "Conflict: an adapter for another base model, or the adapter limit reached",
    413: "Request body (or adapter) too large",
    422: "Invalid parameter (the error names it)",
    429: "At capacity: retry after the Retry-After header's seconds",
    500: "The model failed while working on this request (e.g. out of memory); the server stays up",
    503: "The model is still loading, or the server is shutting down",
}


def as_serve_error(exc: Exception) -> ServeError:
    """Ours as is; request validation → Invalid naming the field; routing (404, 405) with its status;
    anything else → a logged internal error that shows the client nothing of the server."""
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, RequestValidationError):
        return BadBody(describe_validation(exc), loc=_field_path(exc))
    if isinstance(exc, StarletteHTTPException):
        error = ServeError(str(exc.detail), headers=dict(exc.headers or {}))
        error.status, error.code = exc.status_code, "http"
        return error
    log.error("unhandled error", exc_info=exc)
    error = ServeError("internal error")
    error.code = "internal"
    return error


class BadBody(Invalid):
    """The body failed its schema. `loc` is pydantic's path to the first problem (body prefix dropped)."""

    code = "validation"

    def __init__(self, message: str, *, loc: tuple) -> None:
        super().__init__(message, param=_last(loc))
        self.loc = loc

    @property
    def top_field(self) -> str | None:
        """The request's own field at fault (`prompt`, not a union's branch `prompt.list[str].0`)."""
        names = [part for part in self.loc if isinstance(part, str)]  # ints: JSON offsets, list items
        return names[0] if names else None


def describe_validation(exc: RequestValidationError) -> str:
    """`where: what`, from the first problem pydantic found (`parameters.top_p: ...`)."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return f"{where}: {first.get('msg', 'invalid request')}"


def _field_path(exc: RequestValidationError) -> tuple:
    first = exc.errors()[0] if exc.errors() else {}
    return tuple(part for part in first.get("loc", ()) if part != "body")


def _last(loc: tuple) -> str | None:
    return str(loc[-1]) if loc else None
