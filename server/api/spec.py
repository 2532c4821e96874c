"""The OpenAPI document: FastAPI's, less the validation error it declares on its own.

FastAPI adds a 422 with its `{"detail": [...]}` body to every route with parameters. This server never
sends that body: native routes answer 422 in TGI's shape and /v1 routes answer 400 in OpenAI's (each
route declares its own errors), so a client or fuzzer reading the spec would expect the wrong answer.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

FASTAPI_VALIDATION_ERROR = "#/components/schemas/HTTPValidationError"


def install(app: FastAPI) -> None:
    app.openapi = lambda: _cached(app)


def _cached(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        app.openapi_schema = _without_fastapi_validation_errors(spec)
    return app.openapi_schema


def _without_fastapi_validation_errors(spec: dict) -> dict:
    for operations in spec["paths"].values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if _schema_ref(responses.get("422")) == FASTAPI_VALIDATION_ERROR:
                del responses["422"]
    schemas = spec.get("components", {}).get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return spec


def _schema_ref(response: dict | None) -> str | None:
    return (response or {}).get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
