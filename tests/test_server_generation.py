"""Generation over HTTP against a live `loraserve serve` process (tier c of DESIGN.md).

One module-scoped server holds both trained fixture adapters and serves most tests; tests that need
other settings (overload limits, no admin token, a short drain window) start their own small server.
Expected answers come from the training data: each fixture adapter memorized its 16 rows, so greedy
generation on the adapter's template prompt must return exactly the row's output.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contract.manifest import read_manifest
from tests.live import LiveServer

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO_ROOT / "loraserve" / "demo_data"
EN, ZH = "facts-en", "facts-zh"
# A raw prompt on which the random base model does not emit EOS within 1,000 greedy tokens, so a
# generation on it keeps running for as long as a test needs (the overload test checks it still does).
ENDLESS = "hello hello hello hello"
TIMEOUT = httpx.Timeout(120.0)


def rows_of(adapter: str) -> list[dict]:
    path = DEMO_DATA / ("facts_en.jsonl" if adapter == EN else "facts_zh.jsonl")
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def template_of(adapter_dir: Path):
    from contract.templates import PromptTemplate

    manifest = read_manifest(adapter_dir)
    return PromptTemplate(name=manifest.template.name, text=manifest.template.text)


def ask(row: dict, adapter: str | None, **parameters) -> dict:
    body = {"instruction": row["instruction"], "input": row["input"], "parameters": parameters}
    if adapter:
        body["adapter"] = adapter
    return body


def post(server: LiveServer, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=TIMEOUT, **kwargs)


def generate(server: LiveServer, body: dict) -> dict:
    response = post(server, "/generate", body)
    assert response.status_code == 200, response.text
    return response.json()


def generate_all(server: LiveServer, bodies: list[dict]) -> list[dict]:
    """All bodies to /generate at once (they share batches); the answers in order."""

    async def send_all():
        limits = httpx.Limits(max_connections=len(bodies))
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT, limits=limits) as client:
            return await asyncio.gather(*(client.post("/generate", json=body) for body in bodies))

    responses = asyncio.run(send_all())
    for response in responses:
        assert response.status_code == 200, response.text
    return [response.json() for response in responses]


def parse_sse(lines) -> list[dict]:
    """`data:` payloads of an SSE stream as JSON (comments / pings skipped)."""
    return [json.loads(line[len("data:") :]) for line in lines if line.startswith("data:")]


def stream(server: LiveServer, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return parse_sse(response.iter_lines())


def metrics(server: LiveServer) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted label items): value}."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels) -> float:
    """Sum of `name` over samples whose labels include `labels` (0 when absent)."""
    want = set(labels.items())
    return sum(v for (n, items), v in samples.items() if n == name and want <= set(items))


def admin_load(server: LiveServer, name: str, path: str, token: str | None = None) -> httpx.Response:
    return post(server, "/admin/adapters", {"name": name, "path": path}, headers=server.admin_headers(token))


def assert_client_error(response: httpx.Response, status: int | tuple[int, ...], mentions: str | None = None) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"]
    if mentions:
        assert mentions in body["error"] or body.get("param") == mentions, body
    return body


# -- fixtures -------------------------------------------------------------------------------------------------


# Every test runs against both placements of the engine: in the server's process, and in a process of its own
# (server/engine_process, the default on a GPU): the same answers, errors, metrics and drain either way.
PLACEMENTS = pytest.mark.parametrize("placement", ["off", "on"], ids=["one-process", "engine-process"])


@pytest.fixture(scope="module", params=["off", "on"], ids=["one-process", "engine-process"])
def engine_process(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(tiny_model_dir, trained_adapters, tmp_path_factory, engine_process):
    log = tmp_path_factory.mktemp("live") / "server.log"
    with LiveServer(
        tiny_model_dir, trained_adapters.root, adapters={EN: EN, ZH: ZH}, log_path=log, engine_process=engine_process
    ) as live:
        yield live


@pytest.fixture(scope="module")
def versions(trained_adapters) -> dict[str, str]:
    return {name: read_manifest(path).version for name, path in trained_adapters.dirs.items()}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# -- 1. blocking generation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", [EN, ZH])
def test_generate_returns_each_trained_answer(server, trained_adapters, adapter):
    template = template_of(trained_adapters.dirs[adapter])
    rows = rows_of(adapter)
    for row in rows:  # one at a time: nothing else shares the batch
        assert generate(server, ask(row, adapter, max_new_tokens=64))["generated_text"] == row["output"], row
    # The other two ways to ask, all rows at once (batching is checked against single runs further down).
    by_parameter = [ask(row, None, max_new_tokens=64, adapter_id=adapter) for row in rows]
    raw = [
        {
            "inputs": template.prompt(row["instruction"], row["input"]),
            "parameters": {"max_new_tokens": 64, "adapter_id": adapter},
        }
        for row in rows
    ]
    answers = generate_all(server, by_parameter + raw)
    assert [a["generated_text"] for a in answers] == [row["output"] for row in rows] * 2


def test_zh_adapter_uses_its_own_template(server, trained_adapters):
    """The same instruction framed with the other template is a different prompt (proves the zh template is used)."""
    row = rows_of(ZH)[0]
    en_framed = template_of(trained_adapters.en).prompt(row["instruction"], row["input"])
    zh_framed = template_of(trained_adapters.zh).prompt(row["instruction"], row["input"])
    assert en_framed != zh_framed
    details = generate(server, ask(row, ZH, max_new_tokens=64, details=True))["details"]
    raw = generate(
        server, {"inputs": zh_framed, "parameters": {"adapter_id": ZH, "max_new_tokens": 64, "details": True}}
    )["details"]
    assert details["prompt_tokens"] == raw["prompt_tokens"]


def test_base_model_does_not_know_the_facts(server):
    for adapter in (EN, ZH):
        rows = rows_of(adapter)
        answers = generate_all(server, [ask(row, None, max_new_tokens=40) for row in rows])
        hits = sum(answer["generated_text"] == row["output"] for answer, row in zip(answers, rows))
        assert hits <= 1, f"the base model gives {hits} of the {adapter} answers: adapters are not applied per request"


# -- 2. streaming ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", [EN, ZH])
def test_stream_tokens_add_up_to_the_trained_answer(server, versions, adapter):
    for row in rows_of(adapter)[:6]:
        events = stream(server, ask(row, adapter, max_new_tokens=64))
        assert len(events) >= 2
        *tokens, last = events
        for event in tokens:
            assert event["generated_text"] is None and event["details"] is None, event
        text = "".join(event["token"]["text"] for event in events)
        assert text == last["generated_text"] == row["output"]
        details = last["details"]
        assert details["finish_reason"] == "eos_token"
        assert details["generated_tokens"] == len(events)
        assert details["adapter"] == adapter
        assert details["adapter_version"] == versions[adapter]
        assert last["token"]["special"] is True  # the EOS token closes the stream
        for event in events:
            assert "\ufffd" not in event["token"]["text"], event
            assert isinstance(event["token"]["id"], int) and event["token"]["logprob"] <= 0


def test_stream_matches_blocking_details(server):
    row = rows_of(EN)[3]
    blocking = generate(server, ask(row, EN, max_new_tokens=64, details=True))
    events = stream(server, ask(row, EN, max_new_tokens=64))
    assert [e["token"]["id"] for e in events] == [t["id"] for t in blocking["details"]["tokens"]]
    assert [e["token"]["text"] for e in events] == [t["text"] for t in blocking["details"]["tokens"]]


def test_stream_errors_before_the_first_byte_are_plain_http(server):
    for body, status in (
        ({"inputs": "hi", "parameters": {"adapter_id": "nope"}}, 404),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, 422),
        ({"inputs": "", "parameters": {}}, 422),
    ):
        with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=TIMEOUT) as response:
            response.read()
            assert response.status_code == status, response.text
            assert "event-stream" not in response.headers.get("content-type", "")
            assert "error" in response.json()


# -- 3. real clients ------------------------------------------------------------------------------------------


@pytest.fixture
def hub_client(server, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    # The session runs with HF_HUB_OFFLINE=1 (no hub downloads); huggingface_hub applies it to every URL,
    # loopback included, so lift it for this client only. The client code itself is used unchanged.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return InferenceClient(base_url=server.url, timeout=120)


@pytest.mark.parametrize("adapter", [EN, ZH])
def test_huggingface_hub_inference_client(hub_client, trained_adapters, versions, adapter):
    template = template_of(trained_adapters.dirs[adapter])
    for row in rows_of(adapter)[:3]:
        prompt = template.prompt(row["instruction"], row["input"])
        assert hub_client.text_generation(prompt, adapter_id=adapter, max_new_tokens=64) == row["output"]

        out = hub_client.text_generation(prompt, adapter_id=adapter, max_new_tokens=64, details=True)
        assert out.generated_text == row["output"]
        assert out.details.finish_reason == "eos_token"
        assert out.details.generated_tokens == len(out.details.tokens)
        assert all(t.logprob <= 0 for t in out.details.tokens)

        pieces = list(hub_client.text_generation(prompt, adapter_id=adapter, max_new_tokens=64, stream=True))
        assert "".join(pieces) == row["output"]

        chunks = list(
            hub_client.text_generation(prompt, adapter_id=adapter, max_new_tokens=64, stream=True, details=True)
        )
        assert chunks[-1].generated_text == row["output"]
        assert chunks[-1].details.finish_reason == "eos_token"
        assert all(c.generated_text is None for c in chunks[:-1])
        assert chunks[-1].details.adapter_version == versions[adapter]


def test_compat_root_route_dispatches_on_stream(server):
    row = rows_of(EN)[5]
    body = {**ask(row, EN, max_new_tokens=64), "stream": False}
    response = post(server, "/", body)
    assert response.status_code == 200, response.text
    assert response.json() == [{"generated_text": row["output"]}]  # TGI's shape: a list, no null fields
    body["parameters"]["details"] = True
    response = post(server, "/", body)
    assert response.json() == [generate(server, body)]
    assert response.json()[0]["details"]["adapter"] == EN
    body["parameters"]["details"] = False

    body["stream"] = True
    with httpx.stream("POST", server.url + "/", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        events = parse_sse(response.iter_lines())
    assert events[-1]["generated_text"] == row["output"]
    assert "".join(e["token"]["text"] for e in events) == row["output"]


# -- 4. adapter switching per request -------------------------------------------------------------------------


def test_concurrent_mixed_adapters_match_single_runs(server):
    en, zh = rows_of(EN), rows_of(ZH)
    bodies, expected = [], []
    for i in range(8):  # interleaved en / zh / base, different prompt lengths within each adapter's group
        bodies += [
            ask(en[i], EN, max_new_tokens=48, details=True),
            ask(zh[i], ZH, max_new_tokens=48, details=True),
            ask(en[8 + i] if i % 2 else zh[8 + i], None, max_new_tokens=24, details=True),
        ]
        expected += [en[i]["output"], zh[i]["output"], None]
    alone = [generate(server, body) for body in bodies]
    together = generate_all(server, bodies)
    for i, (single, mixed, answer) in enumerate(zip(alone, together, expected)):
        assert mixed["generated_text"] == single["generated_text"], (i, bodies[i])
        assert [t["id"] for t in mixed["details"]["tokens"]] == [t["id"] for t in single["details"]["tokens"]], i
        assert mixed["details"].get("adapter") == bodies[i].get("adapter")
        if answer is not None:
            assert mixed["generated_text"] == answer, (i, bodies[i])


# -- 5. parameters --------------------------------------------------------------------------------------------


def test_max_new_tokens_caps_with_finish_reason_length(server):
    row = rows_of(EN)[0]
    for n in (1, 5):
        out = generate(server, ask(row, EN, max_new_tokens=n, details=True))
        details = out["details"]
        assert details["finish_reason"] == "length"
        assert details["generated_tokens"] == n == len(details["tokens"])
        assert row["output"].startswith(out["generated_text"])
        events = stream(server, ask(row, EN, max_new_tokens=n))
        assert len(events) == n and events[-1]["details"]["finish_reason"] == "length"


def test_ignore_eos_generates_exactly_max_new_tokens(server, tokenizer):
    """The benchmark extension: EOS neither ends the generation nor goes missing from the tokens."""
    row = rows_of(EN)[0]
    plain = generate(server, ask(row, EN, max_new_tokens=60, details=True))
    assert plain["details"]["finish_reason"] == "eos_token" and plain["generated_text"] == row["output"]
    answer_tokens = plain["details"]["generated_tokens"]  # the answer, then EOS
    out = generate(server, ask(row, EN, max_new_tokens=answer_tokens + 5, ignore_eos=True, details=True))
    details = out["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == answer_tokens + 5
    assert details["tokens"][answer_tokens - 1]["id"] == tokenizer.eos_token_id  # it went on past EOS
    assert out["generated_text"].startswith(row["output"])


def test_stop_sequence_cuts_before_the_stop_string(server):
    row = rows_of(EN)[0]  # "The code of the red door is 4821."
    stop_at = row["output"].index("door")
    out = generate(server, ask(row, EN, max_new_tokens=64, stop=["door", "never-seen"], details=True))
    assert out["generated_text"] == row["output"][:stop_at]
    assert out["details"]["finish_reason"] == "stop_sequence"
    events = stream(server, ask(row, EN, max_new_tokens=64, stop=["door"]))
    assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"] == row["output"][:stop_at]
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    # A stop string that spans several tokens and starts mid-token.
    out = generate(server, ask(row, EN, max_new_tokens=64, stop=["ed do"], details=True))
    assert out["generated_text"] == row["output"][: row["output"].index("ed do")]
    assert out["details"]["finish_reason"] == "stop_sequence"


def test_seeded_sampling_is_reproducible_and_seeds_differ(server):
    def body(seed: int) -> dict:
        return {
            "inputs": ENDLESS,
            "parameters": {"do_sample": True, "temperature": 1.5, "seed": seed, "max_new_tokens": 16, "details": True},
        }

    first = generate(server, body(7))
    # The same seed again, this time batched with other sampling requests: the RNG is per request.
    again, *others = generate_all(server, [body(7)] + [body(seed) for seed in range(1, 6)])
    assert again["generated_text"] == first["generated_text"]
    assert [t["id"] for t in again["details"]["tokens"]] == [t["id"] for t in first["details"]["tokens"]]
    assert first["details"]["seed"] == 7
    texts = {first["generated_text"]} | {o["generated_text"] for o in others}
    assert len(texts) > 1, "six different seeds all gave the same text: the seed is ignored"
    for out in [first, again, *others]:
        for token in out["details"]["tokens"]:
            assert isinstance(token["id"], int) and -math.inf < token["logprob"] <= 0


def test_details_tokens_have_ids_and_logprobs(server, tokenizer):
    row = rows_of(ZH)[2]
    out = generate(server, ask(row, ZH, max_new_tokens=64, details=True))
    tokens = out["details"]["tokens"]
    assert out["details"]["generated_tokens"] == len(tokens)
    assert tokens[-1]["special"] and tokens[-1]["id"] == tokenizer.eos_token_id
    assert tokenizer.decode([t["id"] for t in tokens], skip_special_tokens=True) == row["output"]
    assert "".join(t["text"] for t in tokens) == row["output"]
    assert all(t["logprob"] <= 0 for t in tokens)
    assert out["details"]["prompt_tokens"] > 0


# -- 6. validation --------------------------------------------------------------------------------------------


BAD_PARAMETERS = [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": "ten"}, "max_new_tokens"),
    ({"max_new_tokens": 1.5}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"max_new_tokens": 1025}, "max_new_tokens"),  # the default cap is 1024
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),  # would turn logits into inf, then NaN
    ({"stop": ["a"] * 9}, "stop"),  # the default limit is 8
    ({"stop": [""]}, "stop"),
    ({"stop": ["x" * 65]}, "stop"),
    ({"best_of": 2}, "best_of"),
    ({"watermark": True}, "watermark"),
    ({"top_n_tokens": 3}, "top_n_tokens"),
    ({"decoder_input_details": True}, "decoder_input_details"),
    ({"response_format": {"type": "json_object"}}, "response_format"),  # LoRAX's
    ({"merged_adapters": {"ids": ["a", "b"], "merge_strategy": "linear"}}, "merged_adapters"),
    ({"return_k_alternatives": 2}, "return_k_alternatives"),
]


@pytest.mark.parametrize(("parameters", "field"), BAD_PARAMETERS, ids=[json.dumps(p)[:40] for p, _ in BAD_PARAMETERS])
def test_invalid_parameters_are_422_naming_the_field(server, parameters, field):
    for route in ("/generate", "/generate_stream"):
        response = post(server, route, {"inputs": "hello", "parameters": parameters})
        body = assert_client_error(response, 422)
        assert field in body["error"] or body.get("param") == field, body


def test_neutral_tgi_parameters_are_accepted(server):
    """What InferenceClient sends by default: every TGI field, mostly null or neutral."""
    parameters = {
        "best_of": None,
        "watermark": False,
        "typical_p": None,
        "truncate": None,
        "top_n_tokens": None,
        "grammar": None,
        "return_full_text": False,
        "decoder_input_details": False,
        "max_new_tokens": 4,
        "response_format": None,
        "adapter_parameters": None,
        "merged_adapters": None,
        "return_k_alternatives": None,
        "api_token": None,
    }  # and what lorax-client adds
    assert post(server, "/generate", {"inputs": "hello", "parameters": parameters}).status_code == 200


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_temperature_is_422(server, raw):
    for route in ("/generate", "/generate_stream"):
        content = f'{{"inputs": "hello", "parameters": {{"temperature": {raw}, "max_new_tokens": 4}}}}'
        response = httpx.post(
            server.url + route, content=content, headers={"content-type": "application/json"}, timeout=TIMEOUT
        )
        assert_client_error(response, 422, "temperature")


def test_prompt_plus_max_new_tokens_over_context_is_422_with_both_counts(server, tokenizer):
    info = httpx.get(server.url + "/info").json()
    context, cap = info["max_context"], info["max_new_tokens_cap"]
    inputs = " ".join(f"word{i}" for i in range(300))
    prompt_tokens = len(tokenizer(inputs, add_special_tokens=True).input_ids)
    assert prompt_tokens < context and prompt_tokens + cap > context  # each fits alone, not together
    max_new = context - prompt_tokens + 1
    response = post(server, "/generate", {"inputs": inputs, "parameters": {"max_new_tokens": max_new}})
    body = assert_client_error(response, 422)
    assert str(prompt_tokens) in body["error"] and str(max_new) in body["error"], body
    # One token less fits exactly; ask for a short answer to keep it quick, then check the bound is exact.
    fits = post(server, "/generate", {"inputs": inputs, "parameters": {"max_new_tokens": 2, "details": True}})
    assert fits.status_code == 200 and fits.json()["details"]["prompt_tokens"] == prompt_tokens
    # A prompt over the whole context, no max_new_tokens given: the prompt is at fault.
    huge = " ".join(f"word{i}" for i in range(6000))
    body = assert_client_error(post(server, "/generate", {"inputs": huge}), 422, "inputs")
    assert "leaves no room" in body["error"] and str(context) in body["error"], body


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": ""},
        {"inputs": "   \n\t "},
        {"instruction": ""},
        {"parameters": {"max_new_tokens": 4}},  # no prompt at all
        {"inputs": "hello", "instruction": "hello"},  # both forms at once
        {"inputs": None},
        {"inputs": 5},
        {"inputs": ["a", "b"]},
        {"inputs": "hello", "parameters": "max_new_tokens=4"},
        {"inputs": "hello", "parameters": {"stop": "door"}},
        {"inputs": "hello", "stream": "yes"},
    ],
    ids=lambda b: json.dumps(b)[:50],
)
def test_bad_prompts_are_4xx(server, body):
    for route in ("/generate", "/generate_stream", "/"):
        response = post(server, route, body)
        assert 400 <= response.status_code < 500, (route, response.status_code, response.text)
        assert "error" in response.json()


@pytest.mark.parametrize(
    "body", [{"inputs": "a\u0000b"}, {"instruction": "a\u0000b", "adapter": EN}], ids=["inputs", "instruction"]
)
def test_nul_in_prompt_text_is_text(server, body):
    """A prompt is text to tokenize: NUL is refused in adapter names and paths, not here (vLLM accepts it,
    and its benchmark client's random prompts contain it)."""
    response = post(server, "/generate", {**body, "parameters": {"max_new_tokens": 2}})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "content",
    [
        b'{"inputs": "hello", "parameters": {',  # truncated JSON
        b'{"inputs": "hello",}',
        b"not json at all",
        b"",
        b'{"inputs": "\xff\xfe bad utf-8"}',
        b'{"inputs": "hello \x00 raw nul"}',  # raw NUL byte inside a JSON string (invalid JSON)
        b"[1, 2, 3]",
        b'"just a string"',
        b'{"inputs": "\\ud800 lone surrogate"}',  # valid JSON, but not text any tokenizer can encode
        b'{"instruction": "ok \\udfff", "adapter": "facts-en"}',
        b'{"instruction": "ok", "input": "\\ud83d", "adapter": "facts-zh"}',
    ],
    ids=lambda c: repr(c[:24]),
)
def test_malformed_bodies_are_4xx(server, content):
    for route in ("/generate", "/generate_stream"):
        response = httpx.post(
            server.url + route, content=content, headers={"content-type": "application/json"}, timeout=TIMEOUT
        )
        assert 400 <= response.status_code < 500, (route, response.status_code, response.text)


@pytest.mark.parametrize(
    "content",
    [
        b'{"inputs": "hello", "parameters": {"max_new_tokens": 4, "stop": ["\\udfff"]}}',
        b'{"inputs": "hello", "parameters": {"max_new_tokens": 4, "adapter_id": "\\ud800"}}',
        b'{"inputs": "hello", "adapter": "\\ud800x"}',
        b'{"inputs": "hello", "parameters": {"max_new_tokens": 4, "seed": 99999999999999999999999}}',
        b'{"inputs": "hello", "parameters": {"max_new_tokens": 4, "temperature": 1e308, "do_sample": true}}',
        b'{"inputs": "hello", "parameters": {"max_new_tokens": 99999999999999999999999}}',
    ],
    ids=lambda c: repr(c[20:60]),
)
def test_odd_values_never_5xx(server, content):
    for route in ("/generate", "/generate_stream"):
        response = httpx.post(
            server.url + route, content=content, headers={"content-type": "application/json"}, timeout=TIMEOUT
        )
        assert response.status_code < 500, (route, response.status_code, response.text)


def test_oversized_body_is_413(server):
    limit = 1_000_000  # the default LORASERVE_MAX_BODY_BYTES
    body = json.dumps({"inputs": "a" * (limit + 10)}).encode()
    response = httpx.post(
        server.url + "/generate", content=body, headers={"content-type": "application/json"}, timeout=TIMEOUT
    )
    assert_client_error(response, 413)

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        yield b'{"inputs": "'
        for _ in range(limit // 50_000 + 2):
            yield b"a" * 50_000
        yield b'"}'

    response = httpx.post(
        server.url + "/generate", content=chunks(), headers={"content-type": "application/json"}, timeout=TIMEOUT
    )
    assert_client_error(response, 413)


def test_unknown_adapter_is_404_never_a_base_answer(server):
    row = rows_of(EN)[0]
    for body in (
        ask(row, "no-such-adapter"),
        ask(row, None, adapter_id="no-such-adapter"),
        {"inputs": "hello", "parameters": {"adapter_id": "facts-EN"}},  # names are case-sensitive
        {"inputs": "hello", "adapter": "../facts-en"},
    ):
        for route in ("/generate", "/generate_stream", "/"):
            response = post(server, route, body)
            assert_client_error(response, 404)
            assert "generated_text" not in response.text


def test_server_healthy_after_hostile_inputs(server):
    """Runs after the validation tests above (file order): no 5xx was counted and the server still works."""
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200
    row = rows_of(EN)[1]
    assert generate(server, ask(row, EN, max_new_tokens=64))["generated_text"] == row["output"]
    samples = metrics(server)
    # /ready answers 503 by design while the model loads (the fixture polled it then): not a server error.
    server_errors = {
        labels: v
        for (name, labels), v in samples.items()
        if name == "loraserve_requests_total"
        and dict(labels)["status"].startswith("5")
        and v
        and dict(labels)["route"] != "/ready"
    }
    assert not server_errors, server_errors
    assert "Traceback" not in server.log()


# -- 7. admin -------------------------------------------------------------------------------------------------


def test_admin_needs_the_token(server):
    no_token = post(server, "/admin/adapters", {"name": "adm", "path": EN})
    assert_client_error(no_token, 401)
    assert_client_error(admin_load(server, "adm", EN, token="wrong-token"), 403)
    assert_client_error(httpx.delete(server.url + f"/admin/adapters/{EN}"), 401)
    assert_client_error(httpx.delete(server.url + f"/admin/adapters/{EN}", headers=server.admin_headers("nope")), 403)
    assert httpx.get(server.url + "/adapters/adm").status_code == 404  # nothing was loaded
    assert generate(server, ask(rows_of(EN)[0], EN, max_new_tokens=64))["generated_text"] == rows_of(EN)[0]["output"]


def test_admin_load_list_and_unload(server, versions, tokenizer):
    response = admin_load(server, "adm", EN)
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["name"] == "adm" and info["version"] == versions[EN]
    assert info["base_model"] and info["rank"] == 16 and info["template"] == "alpaca"
    assert isinstance(info["load_seconds"], float) and info["load_seconds"] >= 0

    listed = {a["name"]: a for a in httpx.get(server.url + "/adapters").json()}
    assert {"adm", EN, ZH} <= set(listed)
    assert listed[ZH]["template"] == "alpaca-zh"
    one = httpx.get(server.url + "/adapters/adm").json()
    assert one["version"] == versions[EN]
    training = one["training"]
    assert training["template"] == "alpaca" and training["dataset_rows"] == 16 and training["final_loss"] is not None
    assert "adm" in httpx.get(server.url + "/info").json()["adapters"]

    row = rows_of(EN)[4]
    assert generate(server, ask(row, "adm", max_new_tokens=64))["generated_text"] == row["output"]

    deleted = httpx.delete(server.url + "/admin/adapters/adm", headers=server.admin_headers())
    assert deleted.status_code == 200 and deleted.json()["name"] == "adm"
    assert httpx.get(server.url + "/adapters/adm").status_code == 404
    assert "adm" not in {a["name"] for a in httpx.get(server.url + "/adapters").json()}
    assert_client_error(post(server, "/generate", ask(row, "adm", max_new_tokens=64)), 404)
    assert_client_error(httpx.delete(server.url + "/admin/adapters/adm", headers=server.admin_headers()), 404)
    # The other adapters are untouched.
    assert generate(server, ask(row, EN, max_new_tokens=64))["generated_text"] == row["output"]


def test_admin_reload_switches_version_and_answers(server, versions):
    first = admin_load(server, "x", EN)
    assert first.status_code == 200, first.text
    en_row, zh_row = rows_of(EN)[6], rows_of(ZH)[6]
    assert generate(server, ask(en_row, "x", max_new_tokens=64))["generated_text"] == en_row["output"]

    second = admin_load(server, "x", ZH)
    assert second.status_code == 200, second.text
    assert second.json()["version"] == versions[ZH] != first.json()["version"]
    assert second.json()["template"] == "alpaca-zh"
    out = generate(server, ask(zh_row, "x", max_new_tokens=64, details=True))
    assert out["generated_text"] == zh_row["output"]
    assert out["details"]["adapter_version"] == versions[ZH]
    assert httpx.get(server.url + "/adapters/x").json()["version"] == versions[ZH]
    # facts-en itself still answers in English.
    assert generate(server, ask(en_row, EN, max_new_tokens=64))["generated_text"] == en_row["output"]


# -- 8. reload under load -------------------------------------------------------------------------------------


async def _stream_one(client: httpx.AsyncClient, body: dict, started: asyncio.Event | None = None) -> dict:
    async with client.stream("POST", "/generate_stream", json=body) as response:
        if response.status_code != 200:
            return {"status": response.status_code, "body": (await response.aread()).decode()}
        events = []
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[len("data:") :]))
                if started is not None:
                    started.set()
    return {"status": 200, "events": events, "done_at": time.monotonic()}


def test_reload_under_concurrent_streams(server, versions):
    assert admin_load(server, "x", EN).status_code == 200
    old, new = versions[EN], versions[ZH]
    # Half English, half Chinese instructions: each version answers both, differently.
    bodies = [ask(rows_of(EN if i % 2 else ZH)[i % 16], "x", max_new_tokens=40) for i in range(20)]
    # Plus two raw-prompt streams of exactly 500 tokens (ignore_eos; against ~20 for the facts): old-version
    # streams are still running when the reload lands, on a fast machine and on a loaded one (with EOS they
    # ended after ~70 tokens, which a reload slowed by a busy 2-core box could outlast: the test flaked).
    bodies += [{"inputs": ENDLESS, "adapter": "x", "parameters": {"max_new_tokens": 500, "ignore_eos": True}}] * 2
    # What each version answers, request by request (facts-en / facts-zh are the same bytes as x's two versions).
    answers = generate_all(server, [{**b, "adapter": name} for name in (EN, ZH) for b in bodies])
    expected = {
        old: [a["generated_text"] for a in answers[: len(bodies)]],
        new: [a["generated_text"] for a in answers[len(bodies) :]],
    }
    assert expected[old] != expected[new]

    async def scenario():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT, limits=limits) as client:
            first_event = [asyncio.Event() for _ in bodies]
            wave1 = [asyncio.create_task(_stream_one(client, b, e)) for b, e in zip(bodies, first_event)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_event)), 60)  # all pinned to `old`
            reload = asyncio.create_task(
                client.post("/admin/adapters", json={"name": "x", "path": ZH}, headers=server.admin_headers())
            )
            racing = [asyncio.create_task(_stream_one(client, b)) for b in bodies]  # race the reload
            reloaded = await reload
            reloaded.done_at = time.monotonic()
            wave2 = [asyncio.create_task(_stream_one(client, b)) for b in bodies]
            return await asyncio.gather(*wave1), await asyncio.gather(*racing), reloaded, await asyncio.gather(*wave2)

    wave1, racing, reloaded, wave2 = asyncio.run(scenario())
    assert reloaded.status_code == 200 and reloaded.json()["version"] == new, reloaded.text
    overlapping = sum(r["done_at"] > reloaded.done_at for r in wave1)
    assert overlapping, "every old-version stream ended before the reload: nothing was tested under load"
    for wave, allowed in ((wave1, {old}), (racing, {old, new}), (wave2, {new})):
        for i, result in enumerate(wave):
            assert result["status"] == 200, result
            last = result["events"][-1]
            assert "error" not in last, last
            version = last["details"]["adapter_version"]
            assert version in allowed, (i, version, allowed)
            text = "".join(e["token"]["text"] for e in result["events"])
            assert text == last["generated_text"] == expected[version][i], (i, version)


# -- 9. disconnect cancels ------------------------------------------------------------------------------------


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_client_disconnect_stops_the_generation(server):
    before = metrics(server)
    assert metric(before, "loraserve_running_generations") == 0
    body = {"inputs": ENDLESS, "parameters": {"max_new_tokens": 1000}}
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        events = [e for e in (next(lines) for _ in range(8)) if e.startswith("data:")][:2]
        assert events
        assert metric(metrics(server), "loraserve_running_generations") == 1
    # The connection is closed; the engine must drop the row within a step or so.
    assert wait_for(lambda: metric(metrics(server), "loraserve_running_generations") == 0, timeout=2.0), (
        "the generation kept running after the client went away"
    )
    tokens = metric(metrics(server), "loraserve_generated_tokens_total", adapter="base")
    time.sleep(0.5)
    assert metric(metrics(server), "loraserve_generated_tokens_total", adapter="base") == tokens
    generated = tokens - metric(before, "loraserve_generated_tokens_total", adapter="base")
    assert 0 < generated < 500, generated  # far fewer than the 1,000 asked for
    # The slot is free: a new request runs at once.
    row = rows_of(ZH)[9]
    assert generate(server, ask(row, ZH, max_new_tokens=64))["generated_text"] == row["output"]


def test_blocking_client_timeout_stops_the_generation(server):
    """A blocking /generate whose client gives up must not keep generating for nobody."""
    before = metrics(server)
    body = {"inputs": ENDLESS, "parameters": {"max_new_tokens": 1000}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json=body, timeout=httpx.Timeout(10, read=0.5))
    assert wait_for(lambda: metric(metrics(server), "loraserve_running_generations") == 0, timeout=2.0), (
        "the generation kept running after the client went away"
    )
    after = metrics(server)
    generated = metric(after, "loraserve_generated_tokens_total", adapter="base") - metric(
        before, "loraserve_generated_tokens_total", adapter="base"
    )
    assert 0 < generated < 900, generated
    assert wait_for(
        lambda: (
            metric(metrics(server), "loraserve_requests_total", route="/generate", status="499")
            == 1 + metric(before, "loraserve_requests_total", route="/generate", status="499")
        ),
        timeout=2.0,
    )


# -- 11. metrics ----------------------------------------------------------------------------------------------


def test_metrics_move(server):
    before = metrics(server)
    row = rows_of(ZH)[11]
    out = generate(server, ask(row, ZH, max_new_tokens=64, details=True))
    stream(server, ask(row, ZH, max_new_tokens=64))
    post(server, "/generate", ask(row, "missing-adapter"))
    after = metrics(server)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("loraserve_requests_total", route="/generate", status="200", adapter=ZH) == 1
    assert delta("loraserve_requests_total", route="/generate_stream", status="200", adapter=ZH) == 1
    assert delta("loraserve_requests_total", route="/generate", status="404") == 1
    assert delta("loraserve_generated_tokens_total", adapter=ZH) == 2 * out["details"]["generated_tokens"]
    assert delta("loraserve_prompt_tokens_total", adapter=ZH) == 2 * out["details"]["prompt_tokens"]
    assert delta("loraserve_time_to_first_token_seconds_count", adapter=ZH) == 2
    assert delta("loraserve_inter_token_seconds_count", adapter=ZH) == 2 * (out["details"]["generated_tokens"] - 1)
    # The engine's own numbers: each request took one step per token (the first shares its prompt's step).
    assert delta("loraserve_engine_steps_total") >= out["details"]["generated_tokens"]
    assert delta("loraserve_engine_prefill_tokens_total") == 2 * out["details"]["prompt_tokens"]
    assert metric(after, "loraserve_kv_slots") == httpx.get(server.url + "/info").json()["kv_slots"] > 0
    assert metric(after, "loraserve_kv_slots_used") == 0
    assert metric(after, "loraserve_adapter_slots_resident") >= 1

    loads_before = metrics(server)
    assert admin_load(server, "metrics-probe", EN).status_code == 200
    assert admin_load(server, "metrics-probe", "no-such-dir").status_code in (400, 403, 404)
    loads_after = metrics(server)
    assert (
        metric(loads_after, "loraserve_adapter_loads_total", outcome="ok")
        == metric(loads_before, "loraserve_adapter_loads_total", outcome="ok") + 1
    )
    assert (
        metric(loads_after, "loraserve_adapter_loads_total", outcome="rejected")
        == metric(loads_before, "loraserve_adapter_loads_total", outcome="rejected") + 1
    )
    assert (
        metric(loads_after, "loraserve_adapter_load_seconds_count")
        == metric(loads_before, "loraserve_adapter_load_seconds_count") + 1
    )
    assert metric(loads_after, "loraserve_adapters_loaded") == len(httpx.get(server.url + "/adapters").json())
    assert httpx.delete(server.url + "/admin/adapters/metrics-probe", headers=server.admin_headers()).status_code == 200
    assert metric(metrics(server), "loraserve_adapters_loaded") == metric(loads_after, "loraserve_adapters_loaded") - 1


# -- 10. overload (own server) --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(tiny_model_dir, trained_adapters, tmp_path_factory, engine_process):
    """One running slot, one queue slot, batches of one, and no admin token configured."""
    log = tmp_path_factory.mktemp("live-small") / "server.log"
    with LiveServer(
        tiny_model_dir,
        trained_adapters.root,
        adapters={EN: EN},
        admin_token=None,
        log_path=log,
        max_running=1,
        max_queue=1,
        engine_process=engine_process,
    ) as live:
        yield live


def test_overload_answers_429_with_retry_after(small_server):
    server = small_server
    body = {"inputs": ENDLESS, "parameters": {"max_new_tokens": 400, "details": True}}
    routes = ["/generate"] * 6 + ["/generate_stream"] * 2

    async def burst():
        async with httpx.AsyncClient(
            base_url=server.url, timeout=TIMEOUT, limits=httpx.Limits(max_connections=16)
        ) as client:

            async def one(route):
                response = await client.post(route, json=body)  # a stream is read to its end
                return route, response

            return await asyncio.gather(*(one(route) for route in routes))

    results = asyncio.run(burst())
    statuses = [response.status_code for _, response in results]
    assert set(statuses) <= {200, 429}, [(r, s.status_code, s.text[:200]) for r, s in results]
    assert statuses.count(429) >= len(routes) - 2, statuses  # capacity: 1 running + 1 queued
    assert 1 <= statuses.count(200) <= 2, statuses
    for route, response in results:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert "error" in response.json()
            assert "event-stream" not in response.headers.get("content-type", "")
        elif route == "/generate_stream":  # ENDLESS really runs to the limit (the drain test relies on it)
            assert parse_sse(response.text.splitlines())[-1]["details"]["finish_reason"] == "length"
        else:
            assert response.json()["details"]["finish_reason"] == "length"
    row = rows_of(EN)[2]
    assert generate(server, ask(row, EN, max_new_tokens=64))["generated_text"] == row["output"]
    assert metric(metrics(server), "loraserve_requests_total", status="429") == statuses.count(429)


def test_admin_disabled_without_a_token(small_server):
    server = small_server
    for headers in ({}, {"Authorization": "Bearer test-admin-token"}, {"Authorization": "Bearer"}):
        response = post(server, "/admin/adapters", {"name": "y", "path": EN}, headers=headers)
        assert_client_error(response, 403)
        assert_client_error(httpx.delete(server.url + f"/admin/adapters/{EN}", headers=headers), 403)
    assert httpx.get(server.url + "/adapters/y").status_code == 404
    assert [a["name"] for a in httpx.get(server.url + "/adapters").json()] == [EN]


# -- 12. SIGTERM drain (own server) ---------------------------------------------------------------------------


@PLACEMENTS
def test_sigterm_drains_then_ends_streams_with_an_error_event(tiny_model_dir, tmp_path, placement):
    live = LiveServer(tiny_model_dir, drain_seconds=1, log_path=tmp_path / "server.log", engine_process=placement)
    try:
        live.wait_ready()
        body = {"inputs": ENDLESS, "parameters": {"max_new_tokens": 1000}}
        with httpx.stream("POST", live.url + "/generate_stream", json=body, timeout=TIMEOUT) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            seen = []
            while len(seen) < 2:
                line = next(lines)
                if line.startswith("data:"):
                    seen.append(json.loads(line[len("data:") :]))
            signalled = time.monotonic()
            live.proc.send_signal(signal.SIGTERM)

            def not_ready():
                try:
                    return httpx.get(live.url + "/ready", timeout=1).status_code == 503
                except httpx.TransportError:
                    return True

            assert wait_for(not_ready, timeout=2.0), "/ready did not turn 503 after SIGTERM"
            try:
                refused = post(live, "/generate", {"inputs": "hello", "parameters": {"max_new_tokens": 2}})
                assert refused.status_code == 503, refused.text
            except httpx.TransportError:
                pass  # already closed: also a refusal
            rest = parse_sse(lines)
        events = seen + rest
        assert "error" in events[-1], events[-3:]
        assert all("error" not in e for e in events[:-1])
        assert events[-2]["generated_text"] is None  # the generation did not finish normally
        assert len(events) < 1000
        assert live.proc.wait(timeout=10) == 0, live.log()[-3000:]
        assert time.monotonic() - signalled < 10
    finally:
        live.stop()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate_stream", {"inputs": ENDLESS, "parameters": {"max_new_tokens": 8}}),
        ("/v1/completions", {"model": "base", "prompt": ENDLESS, "max_tokens": 8, "stream": True, "temperature": 0}),
    ],
)
def test_sse_events_end_in_a_plain_blank_line(server, path, body):
    """Clients that split a read on `\\n\\n` (vLLM's benchmark client, many hand-written ones) lost the
    events of reads holding several when they ended in `\\r\\n\\r\\n`: events end in `\\n\\n`, as OpenAI's do."""
    if path.startswith("/v1"):
        body = {**body, "model": httpx.get(server.url + "/info", timeout=10).json()["model_id"]}
    with httpx.stream("POST", server.url + path, json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200, response.read()
        raw = response.read()
    events = [chunk for chunk in raw.split(b"\n\n") if chunk.strip()]
    assert b"\r" not in raw and len(events) >= 8, raw[:300]
    assert all(chunk.startswith((b"data:", b":")) for chunk in events)
