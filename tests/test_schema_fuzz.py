"""CI's short schema fuzz (bench/schema_fuzz.py): schemathesis against the checked-in spec and a live
server on the tiny model with both trained adapters. Every answer must be declared, fit its schema and
none be a 5xx. The full run (more examples per operation) is in bench/results/, NOTES.md there."""

from __future__ import annotations

import pytest

from bench.schema_fuzz import fuzz, report
from tests.live import LiveServer

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_5xx_and_nothing_undeclared(tiny_model_dir, trained_adapters):
    adapters = {name: name for name in trained_adapters.dirs}
    with LiveServer(tiny_model_dir, trained_adapters.root, adapters=adapters, max_new_tokens_cap="16") as server:
        figures = fuzz(server.url, token=server.admin_token, max_examples=8, seed=13)
        ready = server.proc.poll() is None
    print(report(figures))
    assert ready, "the server died under the fuzzer"
    assert figures.generated >= 500 and figures.requests >= 500, report(figures)  # the coverage phase alone
    assert len(figures.by_operation) == 17, sorted(figures.by_operation)  # every operation was reached
    assert figures.by_status[200] > 0, "no case got through: the run checked refusals only"
    assert figures.clean, report(figures)
