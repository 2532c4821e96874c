"""Serving edge cases a code review found (each test failed before its fix): a streaming client that
hangs up while queued, OpenAI's optional max_tokens near the context, chat templates that refuse a
conversation, the seed of a sampled answer, logprobs when EOS releases held text, and a generation
that ends inside a multi-byte character.

The app runs in-process on the tiny random Llama (no adapters needed): its state is built by hand
instead of through the lifespan, so a test can drive the ASGI app directly and decide exactly when
a client disconnects. Waits are on events (tokens of another stream), never on sleeps.
"""

from __future__ import annotations

import asyncio
import json

import pytest

pytestmark = pytest.mark.slow

ENDLESS = "hello hello hello hello"  # the base model does not emit EOS on it within 1,000 greedy tokens


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    from server.api.app import create_app
    from server.settings import ServerSettings

    settings = ServerSettings(
        base_model=str(tiny_model_dir), backend="transformers", max_running=1, max_queue=1, max_new_tokens_cap=2000
    )
    app = create_app(settings)
    state = app.state.loraserve
    state.load_model()
    state.engine.start()
    state.ready = True
    yield app
    state.engine.stop()


def _scope(method: str, path: str, body: bytes) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"test"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("test", 80),
        "state": {},
    }


class Call:
    """One HTTP request to the ASGI app whose client can hang up at a moment the test picks."""

    def __init__(self, app, path: str, body: dict) -> None:
        self.body = json.dumps(body).encode()
        self.hang_up = asyncio.Event()
        self.messages: list[dict] = []
        self._pending = [{"type": "http.request", "body": self.body, "more_body": False}]
        self.task = asyncio.ensure_future(app(_scope("POST", path, self.body), self._receive, self._send))

    async def _receive(self) -> dict:
        if self._pending:
            return self._pending.pop(0)
        await self.hang_up.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict) -> None:
        if self.hang_up.is_set():
            raise OSError("the client is gone")
        self.messages.append(message)

    @property
    def status(self) -> int | None:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        return starts[0]["status"] if starts else None

    def body_text(self) -> str:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body").decode()

    async def finish(self) -> None:
        self.hang_up.set()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def _tokens(events, count: int) -> None:
    """Read `count` more token events of a running stream (the test's clock: one per engine step)."""
    from server.engine.events import TokenEvent

    for _ in range(count):
        event = await anext(events)
        assert isinstance(event, TokenEvent), event


async def _until(predicate, events) -> None:
    """Read tokens of the running stream `events` until `predicate()` holds (bounded by that stream)."""
    while not predicate():
        await _tokens(events, 1)


# -- 1. a client that hangs up while its stream request waits in the queue keeps its place ------------------


STREAM_BODIES = {
    "/generate_stream": {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 8}},
    "/v1/completions": {"model": "tiny-model", "prompt": "Once upon a time", "max_tokens": 8, "stream": True},
}


@pytest.mark.parametrize("path", list(STREAM_BODIES))
def test_stream_client_that_disconnects_while_queued_is_dropped_at_once(app, path):
    """max_running=1, max_queue=1. A runs a long generation; B asks for a stream and waits in the queue;
    B's client hangs up. B must leave the queue (within a few of A's steps), freeing its place: else
    it would count against the capacity (new clients get 429) until A ends, then be prefilled for nobody."""
    from server.service import GenerationRequest

    state = app.state.loraserve
    engine, service = state.engine, state.service
    body = dict(STREAM_BODIES[path])
    if path.startswith("/v1"):
        body["model"] = state.settings.public_base_name

    async def scenario():
        a = service.stream(service.prepare(GenerationRequest(inputs=ENDLESS, max_new_tokens=1900, ignore_eos=True)))
        try:
            await _tokens(a, 1)  # A holds the only running slot
            b = Call(app, path, body)
            await _until(lambda: engine.stats.waiting == 1, a)  # B is admitted and waits for A's slot
            assert engine.in_flight == 2
            b.hang_up.set()  # B's client goes away before it got a byte
            await _tokens(a, 100)  # 100 more engine steps of A: far more than it takes to drop B
            still_waiting, in_flight = engine.stats.waiting, engine.in_flight
            await b.finish()
            return still_waiting, in_flight
        finally:
            await a.aclose()

    still_waiting, in_flight = asyncio.run(scenario())
    assert (still_waiting, in_flight) == (0, 1), (
        f"the disconnected client's request is still queued ({still_waiting} waiting, {in_flight} in flight)"
    )


async def _post(app, path: str, body: dict) -> tuple[int, dict]:
    call = Call(app, path, body)
    await call.task
    return call.status, json.loads(call.body_text())


def post(app, path: str, body: dict) -> tuple[int, dict]:
    return asyncio.run(_post(app, path, body))


# -- 2. OpenAI requests without max_tokens are refused when the prompt is long -------------------------------


def test_openai_completion_without_max_tokens_fits_the_context_left(app):
    """OpenAI's `max_tokens` is optional and means "up to the context". A prompt that fits the context
    (here 100 tokens short of it) but not prompt + the server's default of 256 new tokens must be
    answered with what the context leaves, not refused for a `max_tokens` the client never sent."""
    state = app.state.loraserve
    tokenizer, context = state.runner.tokenizer, state.max_context
    prompt = ""
    while len(tokenizer(prompt + "hello ").input_ids) <= context - 100:
        prompt += "hello "
    prompt_tokens = len(tokenizer(prompt).input_ids)
    assert prompt_tokens + state.settings.default_max_new_tokens > context > prompt_tokens + 50
    status, body = post(
        app, "/v1/completions", {"model": state.settings.public_base_name, "prompt": prompt, "temperature": 0}
    )
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= context


# -- 3. a chat template that refuses the conversation turns into a 500 -----------------------------------------

# Mistral-7B-Instruct-v0.1's chat template (abridged): it raises on a system message or on turns that do
# not alternate, as Llama-2's and many others do.
STRICT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token + ' ' }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}],
    ],
    ids=["system-message", "two-user-turns"],
)
def test_a_conversation_the_chat_template_refuses_is_a_400_not_a_500(app, monkeypatch, messages):
    """The base model's tokenizer ships a chat template that raises (jinja `raise_exception`) on some
    conversations. The client sent a well-formed request the template cannot render: that is its error
    (400 naming `messages`), not an internal server error."""
    state = app.state.loraserve
    monkeypatch.setattr(state.runner.tokenizer, "chat_template", STRICT_CHAT_TEMPLATE)
    status, body = post(
        app, "/v1/chat/completions", {"model": state.settings.public_base_name, "messages": messages, "max_tokens": 4}
    )
    assert status == 400, body
    assert body["error"]["param"] == "messages", body


# -- 4. a sampled generation without a seed does not say which seed it used -----------------------------------


def test_sampling_without_a_seed_reports_the_seed_it_used(app):
    """TGI answers `details.seed` with the seed actually drawn when the client sent none, so a sampled
    answer can be reproduced; a null seed would mean the text can never be generated again."""
    request = {
        "inputs": ENDLESS,
        "parameters": {"do_sample": True, "temperature": 1.5, "max_new_tokens": 12, "details": True},
    }
    status, first = post(app, "/generate", request)
    assert status == 200, first
    seed = first["details"].get("seed")  # absent when null (the route omits nulls)
    assert isinstance(seed, int), f"details.seed is {seed!r} for a sampled generation"
    replay = {**request, "parameters": {**request["parameters"], "seed": seed}}
    status, again = post(app, "/generate", replay)
    assert status == 200, again
    assert again["generated_text"] == first["generated_text"]


# -- 5. text held back for a stop string and released with EOS is missing from the logprobs tokens -----------

EOS_PROMPT = "is is"  # greedy on the tiny base model: "]", " question", " Hello", "]", then EOS


def test_openai_logprob_tokens_add_up_to_the_text_when_eos_releases_held_text(app):
    """A stop string's prefix ("]" of "]X") is held back until the next token decides; when that next
    token is EOS, the held text is released on the EOS token event. The formatter must list that event
    in `logprobs` although it is special, or the tokens no longer add up to the returned text."""
    state = app.state.loraserve
    status, body = post(
        app,
        "/v1/completions",
        {
            "model": state.settings.public_base_name,
            "prompt": EOS_PROMPT,
            "temperature": 0,
            "max_tokens": 12,
            "logprobs": 0,
            "stop": ["]X"],
        },
    )
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"].endswith("]"), f"precondition (model output): {choice}"
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"], choice["logprobs"]


# -- 6. the last complete characters are lost when the generation ends inside a multi-byte character ----------


@pytest.mark.parametrize("prompt, max_new_tokens", [("hello the fox", 20), ("a", 5)])
def test_generation_ending_mid_character_keeps_its_complete_characters(app, prompt, max_new_tokens):
    """The detokenizer holds back every token since the last release while the decoded tail ends in an
    incomplete UTF-8 sequence. When the generation ends there (here: max_new_tokens), the complete
    characters decoded before the incomplete tail ("世", "上" here) must still reach `generated_text`;
    only the partial character is dropped."""
    state = app.state.loraserve
    status, body = post(
        app,
        "/generate",
        {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True, "details": True}},
    )
    assert status == 200, body
    ids = [token["id"] for token in body["details"]["tokens"]]
    decoded = state.runner.tokenizer.decode(ids, skip_special_tokens=True)
    assert body["generated_text"] == decoded.rstrip("\ufffd"), (body["generated_text"], decoded)
