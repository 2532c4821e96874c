"""The app-wide exception handlers: /v1 paths answer OpenAI's error shape, every other path TGI's."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.openai import errors as openai_errors
from server.api.tgi import errors as tgi_errors
from server.errors import ServeError


def install_error_handlers(app: FastAPI) -> None:
    for kind in (ServeError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, _respond)


async def _respond(request: Request, exc: Exception):
    # /v1 routes map their own errors (OpenAIRoute); what reaches here on /v1 matched no route (404, 405).
    shape = openai_errors if request.url.path.startswith("/v1/") else tgi_errors
    return shape.error_response(request, exc)
