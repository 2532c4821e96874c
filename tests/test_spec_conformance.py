"""Every answer the server gives is one the checked-in spec declares: its status, and a body that fits.

The cases are the ones schemathesis found (bench/schema_fuzz.py): a first run against the spec saw 14
status codes it did not declare (404 for unknown adapters and models, 400 for bodies that are not JSON or
not UTF-8 and for /v1 validation errors) and declared error bodies the server never sends (FastAPI's
`{"detail": [...]}`). Each request runs against the app in-process on the tiny model; its response is
checked against openapi/openapi.json itself, so a spec that drifts from the server fails here.
"""

from __future__ import annotations

import asyncio

import httpx
import jsonschema
import pytest

from bench.spec_check import Operation, Spec

pytestmark = pytest.mark.slow

SPEC = Spec.load()
ADMIN = {"Authorization": "Bearer spec-admin"}
NOT_UTF8 = {"content": b"\xff\xfe{", "headers": {"content-type": "application/json"}}

# (method, path as requested, the spec's path template, request keywords, status the server answers)
CASES = {
    "unknown-adapter-listing": ("GET", "/adapters/nope", "/adapters/{name}", {}, 404),
    "unknown-adapter-unload": ("DELETE", "/admin/adapters/nope", "/admin/adapters/{name}", {"headers": ADMIN}, 404),
    "unknown-adapter-generate": (
        "POST",
        "/generate",
        "/generate",
        {"json": {"inputs": "hi", "parameters": {"adapter_id": "nope"}}},
        404,
    ),
    "unknown-adapter-stream": (
        "POST",
        "/generate_stream",
        "/generate_stream",
        {"json": {"inputs": "hi", "parameters": {"adapter_id": "nope"}}},
        404,
    ),
    "unknown-adapter-compat": ("POST", "/", "/", {"json": {"inputs": "hi", "adapter": "nope"}}, 404),
    "not-utf8-stream": ("POST", "/generate_stream", "/generate_stream", NOT_UTF8, 400),
    "not-utf8-compat": ("POST", "/", "/", NOT_UTF8, 400),
    "not-utf8-admin": (
        "POST",
        "/admin/adapters",
        "/admin/adapters",
        {**NOT_UTF8, "headers": {**ADMIN, **NOT_UTF8["headers"]}},
        400,
    ),
    "invalid-parameter-native": (
        "POST",
        "/generate",
        "/generate",
        {"json": {"inputs": "hi", "parameters": {"max_new_tokens": 0}}},
        422,
    ),
    "no-body-completions": ("POST", "/v1/completions", "/v1/completions", {}, 400),
    "no-body-chat": ("POST", "/v1/chat/completions", "/v1/chat/completions", {}, 400),
    "unknown-model-completions": (
        "POST",
        "/v1/completions",
        "/v1/completions",
        {"json": {"model": "0", "prompt": "hi"}},
        404,
    ),
    "unknown-model-chat": (
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        {"json": {"model": "0", "messages": [{"role": "user", "content": "hi"}]}},
        404,
    ),
    "unknown-model-retrieve": ("GET", "/v1/models/0", "/v1/models/{model}", {}, 404),
    "path-component-over-the-name-limit": (
        "POST",
        "/admin/adapters",
        "/admin/adapters",
        {"json": {"name": "a", "path": "0" * 300}, "headers": ADMIN},
        400,
    ),
}


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    from server.api.app import create_app
    from server.settings import ServerSettings

    root = tmp_path_factory.mktemp("spec-adapter-root")
    settings = ServerSettings(
        base_model=str(tiny_model_dir), backend="transformers", admin_token="spec-admin", adapter_root=str(root)
    )
    app = create_app(settings)
    state = app.state.loraserve
    state.load_model()
    state.engine.start()
    state.ready = True
    yield app
    state.engine.stop()


def send(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def assert_fits(response: httpx.Response, method: str, template: str) -> None:
    problems = SPEC.problems(
        Operation(method.lower(), template), response.status_code, response.headers["content-type"], response.text
    )
    assert not problems, problems


@pytest.mark.parametrize("method,path,template,kwargs,status", CASES.values(), ids=CASES.keys())
def test_errors_are_declared_with_the_body_sent(app, method, path, template, kwargs, status):
    response = send(app, method, path, **kwargs)
    assert response.status_code == status, response.text
    assert_fits(response, method, template)


def test_no_path_of_the_server_in_an_error(app, tmp_path):
    """The fuzzer's one 500: a path component over the file system's limit raised OSError, and its
    message showed the client the adapter root's absolute path."""
    root = str(app.state.loraserve.settings.adapter_root)
    response = send(app, "POST", "/admin/adapters", json={"name": "a", "path": "0" * 300}, headers=ADMIN)
    assert response.status_code == 400 and root not in response.text and "/" not in response.json()["error"]


def test_a_failed_load_names_no_server_path(app, monkeypatch):
    """Whatever fails inside a load (here an OSError as the file system words it), the 500 says what
    kind of failure it was and never repeats the exception's text, which names server-side paths."""
    secret = "/srv/private/adapters/a/adapter_model.safetensors"

    async def fail(name, path):
        raise OSError(5, "Input/output error", secret)

    monkeypatch.setattr(app.state.loraserve.registry, "load", fail)
    response = send(app, "POST", "/admin/adapters", json={"name": "a", "path": "a"}, headers=ADMIN)
    assert response.status_code == 500 and "OSError" in response.json()["error"]
    assert secret not in response.text and "/srv" not in response.text
    assert_fits(response, "POST", "/admin/adapters")


def test_success_bodies_fit_the_spec(app):
    """The positive control: without it, a schema that accepts anything would pass the cases above."""
    answer = send(app, "POST", "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    assert answer.status_code == 200
    assert_fits(answer, "POST", "/generate")
    with pytest.raises(jsonschema.ValidationError):
        SPEC.validate({"detail": [{"msg": "x"}]}, SPEC.declared_schema("/generate", "POST", 422))


def test_metrics_declare_the_prometheus_text_format(app):
    response = send(app, "GET", "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert_fits(response, "GET", "/metrics")


def test_no_route_declares_fastapis_validation_body():
    assert "HTTPValidationError" not in SPEC.document["components"]["schemas"]
    for path, operations in SPEC.document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                ref = response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
                assert not ref.endswith("/HTTPValidationError"), (method, path, status)
