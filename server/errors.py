"""The server's exceptions. Each carries its HTTP status; the api layer maps them in one place."""

from __future__ import annotations


class ServeError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class BadRequest(ServeError):
    status, code = 400, "bad_request"


class Unauthorized(ServeError):
    status, code = 401, "unauthorized"


class Forbidden(ServeError):
    status, code = 403, "forbidden"


class NotFound(ServeError):
    status, code = 404, "not_found"


class Conflict(ServeError):
    status, code = 409, "conflict"


class PayloadTooLarge(ServeError):
    status, code = 413, "payload_too_large"


class RequestTimeout(ServeError):
    status, code = 408, "request_timeout"


class Invalid(ServeError):
    status, code = 422, "invalid_parameter"


class ClientGone(ServeError):
    """The client disconnected before its answer was ready (nginx's 499); nobody reads this response."""

    status, code = 499, "client_closed_request"


class Overloaded(ServeError):
    status, code = 429, "overloaded"


class Unavailable(ServeError):
    status, code = 503, "unavailable"


class GenerationFailed(ServeError):
    """The model failed mid-generation (e.g. out of memory); only that request is affected."""

    status, code = 500, "generation_failed"
