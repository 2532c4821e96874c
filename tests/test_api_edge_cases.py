"""HTTP API edge cases a review found: what a real client, a load balancer or an operator hits.

Each test failed on the code it was written against and passes once its bug is fixed. The app runs
in-process on the tiny random Llama (state built by hand, as in test_serving_edge_cases.py), except the
start-up test, which runs the real `serve()` (uvicorn) in a thread with the model load held on an event.
Waits are on events or bounded polls of a condition that cannot become true under the bug, never sleeps.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

BASE_NAME = "acme/tiny-llama"  # a hub-style public id, as users pick for OpenAI clients
KEY = "review-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 1_000_000  # the default


def _build_app(tiny_model_dir, **overrides):
    from server.api.app import create_app
    from server.settings import ServerSettings

    options = {
        "base_model": str(tiny_model_dir),
        "backend": "transformers",
        "max_running": 2,
        "max_queue": 2,
        "base_model_name": BASE_NAME,
        "api_keys": [KEY],
        "admin_token": "review-admin",
        **overrides,
    }
    app = create_app(ServerSettings(**options))
    state = app.state.loraserve
    state.load_model()
    state.engine.start()
    state.ready = True
    return app


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    app = _build_app(tiny_model_dir)
    yield app
    app.state.loraserve.engine.stop()


def request(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


# -- 1. /v1/models/{model} cannot retrieve a model whose id has a slash ------------------------------------------


def test_openai_model_id_with_a_slash_can_be_retrieved(app):
    """BASE_MODEL_NAME may be a hub-style id ("org/name"); /v1/models lists it, but the openai client's
    `models.retrieve(id)` requests /v1/models/org/name, which the `{model}` path parameter never matches."""
    listed = request(app, "GET", "/v1/models", headers=AUTH)
    assert listed.status_code == 200 and BASE_NAME in [m["id"] for m in listed.json()["data"]], listed.text
    one = request(app, "GET", f"/v1/models/{BASE_NAME}", headers=AUTH)
    assert one.status_code == 200, one.text
    assert one.json()["id"] == BASE_NAME


def test_openai_client_retrieves_a_model_id_with_a_slash(app):
    import openai

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key=KEY, http_client=http, max_retries=0)
            return await client.models.retrieve(BASE_NAME)

    assert asyncio.run(go()).id == BASE_NAME


# -- 2. /v1 errors raised outside the route handlers come in the native (TGI) shape, not OpenAI's -------------------


@pytest.mark.parametrize(
    "method, path, kwargs",
    [
        (
            "POST",
            "/v1/chat/completions",
            {"content": b"{" + b" " * (MAX_BODY + 10) + b"}", "headers": {**AUTH, "content-type": "application/json"}},
        ),
        ("GET", "/v1/chat/completions", {"headers": AUTH}),
        ("POST", "/v1/embeddings", {"json": {"model": BASE_NAME, "input": "hi"}, "headers": AUTH}),
    ],
    ids=["413-body-too-large", "405-wrong-method", "404-unknown-endpoint"],
)
def test_v1_errors_outside_route_handlers_take_openai_shape(app, method, path, kwargs):
    """README: /v1 errors take OpenAI's shape {"error": {"message", "type", "param", "code"}}. The body
    limit (middleware), a wrong method and an unknown /v1 endpoint answer {"error": "<str>", "error_type"}:
    OpenAI SDKs (JS `err.error.message`, Python `exc.body["message"]`) find no message in it."""
    response = request(app, method, path, **kwargs)
    assert response.status_code in (404, 405, 413), response.text
    error = response.json().get("error")
    assert isinstance(error, dict) and isinstance(error.get("message"), str) and error.get("type"), response.text


# -- 3. chat errors name fields a chat request does not have ---------------------------------------------------


def test_chat_max_completion_tokens_error_names_max_completion_tokens(app):
    """A chat client that sent only `max_completion_tokens` (the openai SDK's current parameter) is told
    the error is in `max_tokens`, a field it never sent."""
    response = request(
        app,
        "POST",
        "/v1/chat/completions",
        headers=AUTH,
        json={"model": BASE_NAME, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "max_completion_tokens", error
    assert "max_completion_tokens" in error["message"], error


def test_chat_prompt_too_long_for_the_context_names_messages(app):
    """A conversation that fills the whole context: the error names `prompt` (a completions field),
    not `messages`, in a chat completion request."""
    state = app.state.loraserve
    tokenizer, context = state.runner.tokenizer, state.max_context
    text = "hello " * 10
    while len(tokenizer(text).input_ids) <= context + 10:
        text += "hello " * 50
    assert len(text) < state.settings.max_input_chars
    response = request(
        app,
        "POST",
        "/v1/chat/completions",
        headers=AUTH,
        json={"model": BASE_NAME, "messages": [{"role": "user", "content": text}]},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages", response.json()


# -- 4. HEAD on the ops endpoints is 405 ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_head_on_probe_endpoints_is_answered(app, path):
    """RFC 9110 §9.1: every general-purpose server supports HEAD wherever it supports GET; load balancers
    and uptime checkers probe with HEAD. FastAPI routes registered with GET answer HEAD with a 405."""
    head = request(app, "HEAD", path)
    get = request(app, "GET", path)
    assert head.status_code == get.status_code == 200, (head.status_code, get.status_code)
    assert head.content == b""


# -- 5. concurrent admin loads of different names exceed MAX_ADAPTERS ---------------------------------------


def test_concurrent_loads_of_different_names_respect_max_adapters(tiny_model_dir, trained_adapters, tmp_path):
    """MAX_ADAPTERS bounds host and device memory. The limit is checked under the per-name lock, before
    the slow file read, and the name is published after it: two loads of different names that overlap
    both pass the check, so max_adapters=1 ends with 2 adapters loaded. (A barrier holds both reads until
    both loads are reading. Once fixed, either the second load never reads, and the first goes on alone
    when the barrier times out, or it is refused when it would publish: one 200 and one 409 either way.)"""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(trained_adapters.en, root / "en")
    shutil.copytree(trained_adapters.zh, root / "zh")
    app = _build_app(tiny_model_dir, adapter_root=str(root), max_adapters=1)
    state = app.state.loraserve
    registry = state.registry
    both_reading = threading.Barrier(2, timeout=10)
    original = registry._check_and_read

    def held_read(path):
        try:
            both_reading.wait()
        except threading.BrokenBarrierError:
            pass  # only one load got this far (the limit held): go on alone
        return original(path)

    registry._check_and_read = held_read
    admin = {"Authorization": "Bearer review-admin"}

    async def both():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60
        ) as client:
            return await asyncio.gather(
                client.post("/admin/adapters", json={"name": "one", "path": "en"}, headers=admin),
                client.post("/admin/adapters", json={"name": "two", "path": "zh"}, headers=admin),
            )

    try:
        responses = asyncio.run(both())
        loaded = registry.names()
    finally:
        state.engine.stop()
    assert sorted(r.status_code for r in responses) == [200, 409], [r.text for r in responses]
    assert len(loaded) <= 1, f"max_adapters=1 but {loaded} are loaded"


# -- 6. /info lists the adapters to clients without an API key ---------------------------------------------------


def test_info_does_not_list_adapters_to_clients_without_a_key(tiny_model_dir, trained_adapters, tmp_path):
    """With API_KEYS set, /adapters and /v1/models answer 401 without a key, yet /info (open, for probes)
    lists every loaded adapter's name to anyone."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(trained_adapters.en, root / "secret-customer-bot")
    app = _build_app(tiny_model_dir, adapter_root=str(root))
    state = app.state.loraserve
    try:
        asyncio.run(state.registry.load("secret-customer-bot", "secret-customer-bot"))
        assert request(app, "GET", "/adapters").status_code == 401
        assert request(app, "GET", "/v1/models").status_code == 401
        info = request(app, "GET", "/info")
    finally:
        state.engine.stop()
    assert info.status_code == 401 or "secret-customer-bot" not in info.text, info.text


# -- 7. /health is not answered while the model loads ---------------------------------------------------------


def test_health_answers_and_ready_says_loading_while_the_model_loads(tiny_model_dir, monkeypatch):
    """README: /health (alive) and /ready (model loaded) differ, and /ready has a "loading" answer with
    Retry-After. But the model loads in the lifespan startup, which uvicorn completes before it binds
    the port: during a (minutes-long) load both probes get connection refused, so a liveness probe
    restarts the pod before a big model ever finishes loading."""
    from server import serve as serve_module
    from server.settings import ServerSettings
    from server.state import ServerState
    from tests.live import free_port

    loading, release = threading.Event(), threading.Event()
    real_load = ServerState.load_model

    def held_load(self):
        loading.set()
        assert release.wait(60), "the test never released the load"
        real_load(self)

    monkeypatch.setattr(ServerState, "load_model", held_load)
    servers = []

    class Captured(serve_module.DrainingServer):
        def __init__(self, config, state):
            super().__init__(config, state)
            servers.append(self)

    monkeypatch.setattr(serve_module, "DrainingServer", Captured)
    port = free_port()
    settings = ServerSettings(base_model=str(tiny_model_dir), backend="transformers", port=port, max_running=1)
    switch = sys.getswitchinterval()
    thread = threading.Thread(target=serve_module.serve, args=(settings,), kwargs={"log_level": "warning"}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        assert loading.wait(60), "serve() never started loading the model"
        health = ready = None
        deadline = time.monotonic() + 10  # the load is held: under the bug nothing ever listens meanwhile
        while time.monotonic() < deadline and health is None:
            try:
                health = httpx.get(url + "/health", timeout=2)
                ready = httpx.get(url + "/ready", timeout=2)
            except httpx.TransportError:
                time.sleep(0.05)
        assert health is not None, "nothing answers /health while the model loads (the port is not even bound)"
        assert health.status_code == 200
        assert ready.status_code == 503 and ready.headers.get("retry-after"), ready.text
    finally:
        release.set()
        deadline = time.monotonic() + 60
        while not servers and time.monotonic() < deadline:
            time.sleep(0.05)
        for server in servers:
            while not server.started and thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            server.should_exit = True
        thread.join(30)
        sys.setswitchinterval(switch)


@pytest.mark.parametrize("placement", ["off", "on"], ids=["one-process", "engine-process"])
def test_a_model_that_fails_to_load_ends_the_server_with_status_3(tmp_path, placement):
    """The model loads behind an open port now; a load that fails must still end the process (as a failed
    start-up did), with the reason in the log, rather than leave a server that is never ready (also when it
    fails in the engine process)."""
    from tests.live import LiveServer

    broken = tmp_path / "broken-model"  # passes the CLI's checks (config.json, weights), fails to load
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors").write_bytes(b"")
    server = LiveServer(broken, log_path=tmp_path / "server.log", engine_process=placement)
    try:
        code = server.proc.wait(timeout=120)
        log = server.log()
    finally:
        server.stop()
    assert code == 3, log[-3000:]
    assert "loading failed" in log
