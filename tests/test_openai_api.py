"""The OpenAI-compatible API (/v1) driven by the official `openai` client against a live server.

Expected answers come from the training data, as in test_server_generation.py: each fixture adapter
memorized its rows, so greedy generation (temperature=0) on the adapter's template prompt returns
exactly the row's output. Chat requests reach the same prompt with the input as the system message.
"""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest

from contract.manifest import read_manifest
from tests.live import LiveServer
from tests.test_server_generation import EN, ENDLESS, TIMEOUT, ZH, admin_load, generate, rows_of, template_of

pytestmark = pytest.mark.slow


def chat_of(row: dict) -> list[dict]:
    """The conversation whose rendering is the row's training prompt."""
    system = [{"role": "system", "content": row["input"]}] if row["input"] else []
    return system + [{"role": "user", "content": row["instruction"]}]


def client_for(server: LiveServer, api_key: str = "x") -> openai.OpenAI:
    # No retries: a test that expects a 429 must see it, not a retry after Retry-After.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def server(tiny_model_dir, trained_adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("live-openai") / "server.log"
    with LiveServer(tiny_model_dir, trained_adapters.root, adapters={EN: EN, ZH: ZH}, log_path=log) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return client_for(server)


@pytest.fixture(scope="module")
def base_id(server) -> str:
    return httpx.get(server.url + "/info", timeout=10).json()["model_id"]


# -- models ---------------------------------------------------------------------------------------------------


def test_models_list_the_base_and_every_adapter(client, base_id):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {base_id, EN, ZH}
    assert models[base_id].owned_by == "loraserve" and getattr(models[base_id], "parent", None) is None
    for name in (EN, ZH):
        assert models[name].parent == base_id and models[name].owned_by == "loraserve"
        assert isinstance(models[name].created, int) and models[name].created > 0
    assert client.models.retrieve(EN).parent == base_id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_models_follow_hot_load_and_unload(server, client, trained_adapters):
    response = admin_load(server, "facts-en-copy", EN)
    assert response.status_code == 200, response.text
    try:
        assert client.models.retrieve("facts-en-copy").parent in {m.id for m in client.models.list()}
        row = rows_of(EN)[2]
        out = client.chat.completions.create(model="facts-en-copy", messages=chat_of(row), temperature=0, max_tokens=64)
        assert out.choices[0].message.content == row["output"]
    finally:
        unloaded = httpx.delete(
            f"{server.url}/admin/adapters/facts-en-copy", headers=server.admin_headers(), timeout=30
        )
        assert unloaded.status_code == 200, unloaded.text
    assert "facts-en-copy" not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="facts-en-copy", prompt="hi", max_tokens=4)


# -- answers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", [EN, ZH])
def test_completions_return_trained_answers(client, trained_adapters, adapter):
    template = template_of(trained_adapters.dirs[adapter])
    for row in rows_of(adapter)[::3]:  # with and without an input
        prompt = template.prompt(row["instruction"], row["input"])
        out = client.completions.create(model=adapter, prompt=prompt, temperature=0, max_tokens=64)
        assert out.object == "text_completion" and out.model == adapter
        assert out.choices[0].text == row["output"] and out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens > 0
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

        chunks = list(
            client.completions.create(model=adapter, prompt=[prompt], temperature=0, max_tokens=64, stream=True)
        )
        assert "".join(c.choices[0].text for c in chunks) == row["output"]
        assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


@pytest.mark.parametrize("adapter", [EN, ZH])
def test_chat_completions_return_trained_answers(client, adapter):
    for row in rows_of(adapter)[::3]:
        out = client.chat.completions.create(model=adapter, messages=chat_of(row), temperature=0, max_tokens=64)
        assert out.object == "chat.completion"
        assert out.choices[0].message.role == "assistant"
        assert out.choices[0].message.content == row["output"] and out.choices[0].finish_reason == "stop"

        chunks = list(
            client.chat.completions.create(
                model=adapter, messages=chat_of(row), temperature=0, max_completion_tokens=64, stream=True
            )
        )
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == row["output"]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_model_picks_the_adapter(client, base_id, trained_adapters):
    en, zh = rows_of(EN)[0], rows_of(ZH)[0]
    out = client.chat.completions.create(model=ZH, messages=chat_of(zh), temperature=0, max_tokens=64)
    assert out.choices[0].message.content == zh["output"]
    assert out.system_fingerprint == read_manifest(trained_adapters.zh).version  # the adapter version answering
    base = client.chat.completions.create(model=base_id, messages=chat_of(en), temperature=0, max_tokens=40)
    assert base.choices[0].message.content != en["output"]  # the random base never learned the facts
    assert base.system_fingerprint is None


def test_chat_turns_render_as_documented(server, client):
    """System message(s), then earlier turns as User:/Assistant: paragraphs, form the Alpaca input."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Which animal "}, {"type": "text", "text": "guards the north gate?"}],
        },
    ]
    out = client.chat.completions.create(model=EN, messages=messages, temperature=0, max_tokens=24)
    native = generate(
        server,
        {
            "instruction": "Which animal guards the north gate?",
            "input": "Be brief.\n\nUser: Hi\n\nAssistant: Hello.",
            "adapter": EN,
            "parameters": {"max_new_tokens": 24, "details": True},
        },
    )
    assert out.usage.prompt_tokens == native["details"]["prompt_tokens"]
    assert out.choices[0].message.content == native["generated_text"]


def test_chat_system_message_is_the_input(server, client):
    row = next(r for r in rows_of(EN) if r["input"])
    out = client.chat.completions.create(model=EN, messages=chat_of(row), temperature=0, max_tokens=64)
    native = generate(
        server,
        {
            "instruction": row["instruction"],
            "input": row["input"],
            "adapter": EN,
            "parameters": {"max_new_tokens": 64, "details": True},
        },
    )
    assert out.usage.prompt_tokens == native["details"]["prompt_tokens"]
    assert out.choices[0].message.content == row["output"]


# -- parameters -----------------------------------------------------------------------------------------------


def test_n_choices(client):
    row = rows_of(EN)[1]
    out = client.chat.completions.create(model=EN, messages=chat_of(row), temperature=0, max_tokens=64, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.message.content for c in out.choices] == [row["output"]] * 2
    single = client.chat.completions.create(model=EN, messages=chat_of(row), temperature=0, max_tokens=64)
    assert out.usage.prompt_tokens == single.usage.prompt_tokens  # counted once
    assert out.usage.completion_tokens == 2 * single.usage.completion_tokens

    chunks = list(client.completions.create(model=EN, prompt=ENDLESS, temperature=0, max_tokens=5, n=3, stream=True))
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(3)}
    assert len(set(texts.values())) == 1 and texts[0]
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason == "length") == [0, 1, 2]


def test_default_temperature_samples_and_seed_reproduces(client):
    """OpenAI's default temperature is 1, which samples; choice i uses seed + i."""

    def ask(seed: int, n: int = 2) -> list[str]:
        out = client.completions.create(model=EN, prompt=ENDLESS, max_tokens=12, seed=seed, n=n)
        return [c.text for c in out.choices]

    first = ask(7)
    assert ask(7) == first
    assert first[0] != first[1]  # different seeds per choice
    assert ask(8, n=1) == [first[1]]  # seed 7's second choice used seed 8
    greedy = {
        client.completions.create(model=EN, prompt=ENDLESS, max_tokens=12, temperature=0, seed=s).choices[0].text
        for s in (1, 2)
    }
    assert len(greedy) == 1 and greedy != {first[0]}


def test_stream_include_usage(client):
    row = rows_of(ZH)[4]
    blocking = client.chat.completions.create(model=ZH, messages=chat_of(row), temperature=0, max_tokens=64)
    chunks = list(
        client.chat.completions.create(
            model=ZH,
            messages=chat_of(row),
            temperature=0,
            max_tokens=64,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, last = chunks
    assert last.choices == [] and last.usage == blocking.usage
    assert all(c.usage is None for c in content)
    chunks = list(
        client.completions.create(
            model=EN, prompt="hi", max_tokens=3, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_stop_string_and_length(client):
    row = rows_of(EN)[0]  # "The code of the red door is 4821."
    out = client.chat.completions.create(model=EN, messages=chat_of(row), temperature=0, max_tokens=64, stop="door")
    assert out.choices[0].message.content == row["output"][: row["output"].index("door")]
    assert out.choices[0].finish_reason == "stop"
    out = client.chat.completions.create(
        model=EN, messages=chat_of(row), temperature=0, max_tokens=3, stop=["never", "seen"]
    )
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    assert row["output"].startswith(out.choices[0].message.content)


def test_ignore_eos_extension(client):
    row = rows_of(EN)[0]
    plain = client.chat.completions.create(model=EN, messages=chat_of(row), temperature=0, max_tokens=60)
    assert plain.choices[0].finish_reason == "stop"
    out = client.chat.completions.create(
        model=EN, messages=chat_of(row), temperature=0, max_tokens=40, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 40


def test_logprobs_of_chosen_tokens(client, trained_adapters):
    row = rows_of(ZH)[0]  # Chinese: some tokens release no text alone (half a character)
    out = client.chat.completions.create(model=ZH, messages=chat_of(row), temperature=0, max_tokens=64, logprobs=True)
    tokens = out.choices[0].logprobs.content
    assert "".join(t.token for t in tokens) == row["output"]
    assert all(t.logprob <= 0 and t.top_logprobs == [] and bytes(t.bytes) == t.token.encode() for t in tokens)
    assert len(tokens) == out.usage.completion_tokens - 1  # every token but EOS

    prompt = template_of(trained_adapters.en).prompt(rows_of(EN)[0]["instruction"])
    out = client.completions.create(model=EN, prompt=prompt, temperature=0, max_tokens=64, logprobs=0)
    logprobs = out.choices[0].logprobs
    assert "".join(logprobs.tokens) == out.choices[0].text
    assert logprobs.text_offset[1] == len(logprobs.tokens[0]) and all(lp <= 0 for lp in logprobs.token_logprobs)


def test_user_and_neutral_values_are_accepted(client):
    out = client.chat.completions.create(
        model=EN,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        temperature=0,
        user="someone",
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        top_logprobs=0,
        response_format={"type": "text"},
        extra_body={"metadata": None, "some_future_field": None},
    )
    assert out.choices[0].finish_reason == "length"


# -- errors ---------------------------------------------------------------------------------------------------


def test_unknown_model_is_not_found(client):
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], stream=stream)
        assert caught.value.code == "model_not_found" and caught.value.param == "model"
        assert "nope" in caught.value.message


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(presence_penalty=1), "presence_penalty"),
        (dict(frequency_penalty=0.5), "frequency_penalty"),
        (dict(logprobs=True, top_logprobs=2), "top_logprobs"),
        (dict(n=100), "n"),
        (dict(logit_bias={"42": 5}), "logit_bias"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
        (dict(response_format={"type": "json_object"}), "response_format"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(extra_body={"mirostat": 2}), "mirostat"),
        (dict(messages=[{"role": "assistant", "content": "hi"}]), "messages"),
        (
            dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]),
            "messages",
        ),
        (dict(messages=[]), "messages"),
    ],
)
def test_unsupported_or_invalid_chat_parameters_are_bad_requests(client, kwargs, param):
    request = {"model": EN, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kwargs}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**request, stream=stream)
        assert caught.value.param == param, caught.value.body
        assert caught.value.type == "invalid_request_error" and caught.value.message


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt=["a", "b"]), "prompt"),
        (dict(prompt=[1, 2, 3]), "prompt"),
        (dict(logprobs=2), "logprobs"),
        (dict(echo=True), "echo"),
        (dict(best_of=2), "best_of"),
        (dict(max_tokens=10**6), "max_tokens"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_invalid_completion_parameters_are_bad_requests(client, kwargs, param):
    request = {"model": EN, "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**request)
    assert caught.value.param == param, caught.value.body
    assert "max_new_tokens" not in caught.value.message and "'inputs'" not in caught.value.message


def test_native_routes_keep_their_error_shape(server):
    response = httpx.post(
        server.url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "nope"}}, timeout=TIMEOUT
    )
    assert response.status_code == 404 and isinstance(response.json()["error"], str)
    response = httpx.post(server.url + "/v1/completions", json={"model": EN}, timeout=TIMEOUT)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


# -- keys and capacity (own server) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir, tmp_path_factory):
    """API keys, and room for one sequence: one running, none queued, batches of one."""
    log = tmp_path_factory.mktemp("live-openai-keyed") / "server.log"
    with LiveServer(
        tiny_model_dir, admin_token=None, log_path=log, api_keys=["key-1"], max_running=1, max_queue=0
    ) as live:
        yield live


def test_api_keys_are_required(keyed_server, base_id):
    with pytest.raises(openai.AuthenticationError):
        client_for(keyed_server, api_key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(keyed_server, api_key="wrong").completions.create(model=base_id, prompt="hi", max_tokens=2)
    assert caught.value.code == "invalid_api_key"
    assert base_id in {m.id for m in client_for(keyed_server, api_key="key-1").models.list()}


def test_overload_is_a_rate_limit_error(keyed_server, base_id):
    client = openai.AsyncOpenAI(base_url=f"{keyed_server.url}/v1", api_key="key-1", max_retries=0, timeout=120)

    async def one(stream: bool):
        try:
            if stream:
                async for _ in await client.completions.create(
                    model=base_id, prompt=ENDLESS, max_tokens=200, temperature=0, stream=True
                ):
                    pass
            else:
                await client.completions.create(model=base_id, prompt=ENDLESS, max_tokens=200, temperature=0)
            return "ok"
        except openai.RateLimitError as exc:
            assert exc.code == "rate_limit_exceeded" and exc.response.headers.get("retry-after")
            return "429"

    async def burst():
        async with client:
            return await asyncio.gather(*(one(stream=i % 2 == 1) for i in range(6)))

    outcomes = asyncio.run(burst())
    assert "429" in outcomes and "ok" in outcomes, outcomes
    # Capacity is back once the burst is over.
    ok = client_for(keyed_server, api_key="key-1").completions.create(model=base_id, prompt="hi", max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_choices_over_capacity_free_the_ones_admitted(keyed_server, base_id, stream):
    """n=3 with room for one: a 429, and the choice already admitted is dropped at once, not left
    generating its 1,000 tokens for nobody (the next request would find the server full)."""
    client = client_for(keyed_server, api_key="key-1")
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=base_id, prompt=ENDLESS, max_tokens=1000, temperature=0, n=3, stream=stream)
    deadline = time.monotonic() + 1.0  # the engine drops a cancelled row within a step
    while True:
        try:
            assert client.completions.create(model=base_id, prompt="hi", max_tokens=2).choices[0].text is not None
            return
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the admitted choice still holds the only slot"
            time.sleep(0.05)


def test_stream_error_after_the_first_byte_is_in_band(tiny_model_dir, tmp_path, base_id):
    """SIGTERM mid-stream: after the drain window the stream ends with an error event the client raises."""
    with LiveServer(tiny_model_dir, admin_token=None, log_path=tmp_path / "server.log", drain_seconds=0.5) as server:
        stream = client_for(server).chat.completions.create(
            model=base_id, messages=[{"role": "user", "content": ENDLESS}], max_tokens=1000, temperature=0, stream=True
        )
        chunks = iter(stream)
        assert next(chunks).choices[0].delta.role == "assistant"
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down") as caught:
            for _ in chunks:
                pass
        assert caught.value.body["type"] == "server_error"
