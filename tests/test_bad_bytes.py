"""CI's run of bench/bad_bytes.py against a live server on the tiny model: slowloris, bodies that stop or
never end, header floods, NUL and non-UTF-8 bytes in every string field, huge stop lists and deeply
nested JSON. Each must get a 4xx or a clean close in bounded time, and the server must keep serving.

Before its fixes, a body that stopped arriving held its connection open for ever (no answer after any
wait: now a 408 after BODY_TIMEOUT_SECONDS), and where httptools is installed (uvicorn prefers it) an
8 MB header was buffered and the request served (now h11 with MAX_HEADER_BYTES: a 400).
"""

from __future__ import annotations

import asyncio

import pytest

from bench.bad_bytes import report, run
from tests.live import LiveServer

pytestmark = pytest.mark.slow

BODY_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def results(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("no-adapters")  # the admin probes' paths name nothing: a 404 at best
    with LiveServer(tiny_model_dir, root, body_timeout_seconds=str(BODY_TIMEOUT)) as server:
        out = asyncio.run(run(server.url, token=server.admin_token, slow_clients=50, body_timeout=BODY_TIMEOUT))
        alive = server.proc.poll() is None
    print(report(out))
    assert alive, "the server died under the probes"
    return {r.probe: r for r in out}


def test_every_probe_is_refused_cleanly_and_the_server_keeps_serving(results):
    failed = [f"{r.probe}: {r.outcome} {r.note}" for r in results.values() if not r.ok]
    assert not failed, failed
    assert len(results) >= 40  # every string field of every route was probed


@pytest.mark.parametrize("probe", ["body that stops (Content-Length)", "chunked body that stops"])
def test_a_body_that_stops_arriving_gets_a_408_after_the_timeout(results, probe):
    outcome = results[probe].outcome
    assert outcome.status == 408 and BODY_TIMEOUT - 0.5 < outcome.seconds < BODY_TIMEOUT + 5, outcome


@pytest.mark.parametrize("probe", ["5,000 headers (0.5 MB)", "one 8 MB header"])
def test_headers_over_the_limit_never_reach_the_app(results, probe):
    assert results[probe].outcome.status in (None, 400), results[probe].outcome


def test_nul_in_prompt_text_is_generated_from(results):
    prompts = [r for name, r in results.items() if name.startswith("NUL in") and r.note]
    assert len(prompts) >= 5 and all(r.outcome.status == 200 for r in prompts), prompts
